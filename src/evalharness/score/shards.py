"""A setting evaluated in shards (``data.shard=<k>/<n>``) as one row of the comparison.

The jobs of a sweep that differ only in ``data.shard`` become one job record and one run's
data, whose per-case table is the union of the shards' tables and whose summary metrics are
computed from that union (`score.table.summarize`), so the comparison, its paired tests and its
figures see one setting over all its cases. Pure pandas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from evalharness.score.comparison import (
    CACHE_COUNTERS,
    SCORED,
    SHARD_KEY,
    TOTALS,
    JobRecord,
    RunData,
)
from evalharness.score.table import summarize


def merge_shards(
    records: Sequence[JobRecord], runs: Mapping[str, RunData]
) -> tuple[list[JobRecord], dict[str, RunData]]:
    """One record (and run) per setting: the jobs of a setting that differ only in
    ``data.shard`` become one, whose per-case table is the union of theirs and whose metrics
    are computed from that union (never an average of averages). The cases of a shard that did
    not score them (it failed) are rows with status ``missing``, so they count as failed cases
    and never vanish; the row's status is then ``cases_failed`` (``failed`` if no shard
    scored)."""
    groups: dict[str, list[JobRecord]] = {}
    for record in records:
        groups.setdefault(record.setting if record.shard else f"\0{record.num}", []).append(record)
    merged_records, merged_runs = [], dict(runs)
    for key, group in groups.items():
        if key.startswith("\0"):
            merged_records.extend(group)
            continue
        record, data = _merge_group(sorted(group, key=lambda r: r.num), runs)
        merged_records.append(record)
        merged_runs[record.run_id or ""] = data
    return merged_records, merged_runs


def _merge_group(group: list[JobRecord], runs: Mapping[str, RunData]) -> tuple[JobRecord, RunData]:
    frames, notes, scored = [], [], 0
    for record in group:
        data = runs.get(record.run_id or "")
        table = data.per_case if data is not None and record.status in SCORED else None
        done = set() if table is None else set(table["case"])
        if table is not None:
            frames.append(table)
            scored += 1
        missing = [case for case in record.cases if case not in done]
        if record.status not in SCORED:
            notes.append(f"shard {record.shard}: {record.error or record.status}")
            if not record.cases:
                notes.append(f"shard {record.shard}: its cases are unknown (it failed first)")
        if missing:
            frames.append(_missing_rows(missing, f"shard {record.shard} did not score it"))
    union = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not union.empty:
        union = union.sort_values(["case", "label"], kind="stable", ignore_index=True)
    metrics: dict[str, float] = summarize(union) if scored else {}
    datas = [runs[r.run_id] for r in group if r.run_id in runs]
    for name in (*TOTALS, *CACHE_COUNTERS):
        metrics[name] = float(sum(d.metrics.get(name, 0.0) for d in datas))
    metrics["peak_device_memory_mb"] = max(
        (d.metrics.get("peak_device_memory_mb", math.nan) for d in datas), default=math.nan
    )
    statuses = {r.status for r in group}
    failed = bool(statuses - {"finished", "skipped"})
    status = (
        ("failed" if not scored else "cases_failed")
        if failed
        else "skipped"
        if statuses == {"skipped"}
        else "finished"
    )
    mismatch = any(
        d.tags.get("evalharness.preprocessing_mismatch", "").lower() == "true" for d in datas
    )
    record = JobRecord(
        num=group[0].num,
        setting=group[0].setting,
        params={k: v for k, v in group[0].params.items() if k != SHARD_KEY},
        status=status,
        code=max(r.code for r in group),
        run_id=",".join(r.run_id or "-" for r in group),
        error="; ".join(notes),
        shard=",".join(r.shard for r in group),
        cases=sorted({c for r in group for c in r.cases}),
    )
    tags = {"evalharness.preprocessing_mismatch": str(mismatch).lower()}
    return record, RunData(metrics, tags, union if not union.empty else None)


def _missing_rows(cases: Sequence[str], why: str) -> pd.DataFrame:
    """Per-case rows of cases no shard scored: status ``missing``, metrics NaN."""
    return pd.DataFrame({"case": list(cases), "label": -1, "status": "missing", "error": why})
