"""Summary pages a person reads first: self-contained HTML that MLflow's artifact view renders.

Pure functions from values to text: no MLflow, no files. A page holds its own CSS and its
figures as base64 PNG (``data:`` URIs), loads nothing from the network and runs no script, so
it reads the same in the MLflow UI (which shows ``.html`` artifacts in a sandboxed frame),
downloaded, or mailed. Markdown would not do: the UI's Markdown view drops ``data:`` images
and cannot reach a run's other artifacts by relative link.

`run_page`: headline metrics (with their 95 % intervals where the summary holds
``<metric>_mean_ci95_low/_high``), the preprocessing findings, the per-case table, the figures
and the gallery of the worst cases. `sweep_page`: the comparison table, the best setting and
the settings tied with it (``tied_with_best`` in the statistics, where present), the paired
tests, the accuracy-against-cost figure where there is one and the other figures.
`run_note`: the three-line description (``mlflow.note.content``) of an evaluation run.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

HEADLINE = ("dsc", "hd95_mm", "sens", "ldr", "rve")
METRIC_TITLES = {
    "dsc": "DSC",
    "hd95_mm": "HD95 (mm)",
    "sens": "Sensitivity",
    "ldr": "Lesion detection rate",
    "rve": "Relative volume error",
    "precision": "Precision",
    "assd_mm": "ASSD (mm)",
    "nsd_1mm": "NSD at 1 mm",
    "hd95_vox": "HD95 (voxels)",
}
CASE_COLUMNS = ("case", "label", *HEADLINE, "status", "error", "flags")
COMPARISON_COLUMNS = (
    "setting",
    "status",
    *(f"{m}_mean" for m in HEADLINE),
    "n_failed_cases",
    "seconds_per_case",
    "preprocessing_mismatch",
    "error",
)
STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 1.2em; color: #1f2328; }
h1 { font-size: 1.45em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
div.table { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
td { max-width: 32em; overflow-wrap: break-word; }
th { overflow-wrap: normal; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { font-weight: bold; background: #eaf5ea; } tr.tied td { background: #f3faf3; }
tr.bad td { background: #fff4f4; }
.facts td:first-child { color: #57606a; } .note { color: #57606a; font-size: 0.9em; }
.sev-error { color: #cf222e; font-weight: bold; } .sev-warning { color: #9a6700; }
figure { margin: 0.8em 0; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 0.9em; }
"""


@dataclass(frozen=True)
class Figure:
    """A PNG to show inline, with its caption."""

    caption: str
    png: bytes


# --------------------------------------------------------------------------------------------
# the run


def run_page(
    title: str,
    facts: Mapping[str, str],
    summary: Mapping[str, float],
    per_case: pd.DataFrame,
    findings: Sequence[Mapping[str, Any]],
    figures: Sequence[Figure] = (),
    gallery: Sequence[Figure] = (),
) -> str:
    """The page of one evaluation run (see the module doc). `findings` are
    `Mismatch.as_dict()` entries; `per_case` has the columns of ``per_case.csv``."""
    parts = [f"<h1>{_e(title)}</h1>", _facts(facts), "<h2>Headline metrics</h2>"]
    parts.append(_headline_table(summary))
    parts.append("<h2>Preprocessing checks</h2>")
    parts.append(_findings(findings))
    parts.append("<h2>Per case</h2>")
    parts.append(_case_table(per_case))
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [_figure(f) for f in figures]
    if gallery:
        parts.append("<h2>Worst cases</h2>")
        parts.append(
            '<p class="note">Per label, the cases with the lowest DSC: the three planes through '
            "each case's largest error (reference: wide green outline; prediction: thin dashed "
            "red outline on top).</p>"
        )
        parts += [_figure(f) for f in gallery]
    return _document(title, parts)


def run_note(
    summary: Mapping[str, float],
    worst: tuple[str, float] | None,
    findings: Sequence[Mapping[str, Any]],
) -> str:
    """Three Markdown lines (one list item each) for ``mlflow.note.content``: mean DSC with its
    interval, the worst case (`worst`: case id and its mean DSC over labels), the mismatches."""
    n_cases, failed = int(summary.get("n_cases", 0)), int(summary.get("n_failed_cases", 0))
    dsc = summary.get("dsc_mean", math.nan)
    interval = _interval(summary, "dsc")
    first = f"**Mean DSC {_num(dsc)}**" + (f" (95% CI {interval})" if interval else "")
    first += f" over {n_cases} case{'s' if n_cases != 1 else ''}"
    first += f", {failed} failed" if failed else ""
    second = f"Worst case: {worst[0]} (DSC {_num(worst[1])})" if worst else "Worst case: none"
    return "\n".join([f"- {first}", f"- {second}", f"- {mismatch_line(findings)}"])


def mismatch_line(findings: Sequence[Mapping[str, Any]]) -> str:
    """``Preprocessing mismatches: 2 (1 error, 1 warning, 0 info)``."""
    if not findings:
        return "Preprocessing mismatches: 0"
    counts = {s: sum(f.get("severity") == s for f in findings) for s in ("error", "warning")}
    info = len(findings) - counts["error"] - counts["warning"]
    return (
        f"Preprocessing mismatches: {len(findings)} ({counts['error']} error(s), "
        f"{counts['warning']} warning(s), {info} info)"
    )


def _headline_table(summary: Mapping[str, float]) -> str:
    has_ci = any(f"{m}_mean_ci95_low" in summary for m in METRIC_TITLES)
    header = ["metric", "mean", *(["95% CI"] if has_ci else []), "std", "median"]
    rows = []
    for metric in (*HEADLINE, *(m for m in METRIC_TITLES if m not in HEADLINE)):
        if f"{metric}_mean" not in summary:
            continue
        cells = [_e(METRIC_TITLES[metric]), _num_cell(summary.get(f"{metric}_mean"))]
        if has_ci:
            cells.append(f'<td class="num">{_e(_interval(summary, metric) or "")}</td>')
        cells += [
            _num_cell(summary.get(f"{metric}_std")),
            _num_cell(summary.get(f"{metric}_median")),
        ]
        rows.append(f"<tr><td>{cells[0]}</td>{''.join(cells[1:])}</tr>")
    counts = (
        f'<p class="note">{int(summary.get("n_cases", 0))} case(s), '
        f"{int(summary.get('n_failed_cases', 0))} failed; "
        f"{_num(summary.get('seconds_per_case', math.nan), 2)} s per case. Means over every "
        "scored (case, label) row.</p>"
    )
    return _table(header, rows) + counts


def _interval(summary: Mapping[str, float], metric: str) -> str | None:
    low = summary.get(f"{metric}_mean_ci95_low")
    high = summary.get(f"{metric}_mean_ci95_high")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return None
    return f"{_num(low)}–{_num(high)}"


def _findings(findings: Sequence[Mapping[str, Any]]) -> str:
    line = f"<p>{_e(mismatch_line(findings))}</p>"
    if not findings:
        return line + '<p class="note">No mismatch with the training configuration.</p>'
    rows = [
        f'<tr><td class="sev-{_e(f.get("severity", ""))}">{_e(f.get("severity", ""))}</td>'
        f"<td>{_e(f.get('scope', ''))}</td><td>{_e(f.get('key', ''))}</td>"
        f"<td>{_e(f.get('case') or '')}</td><td>{_e(f.get('message', ''))}</td></tr>"
        for f in sorted(findings, key=lambda f: ("error", "warning", "info").index(f["severity"]))
    ]
    return line + _table(["severity", "scope", "check", "case", "message"], rows)


def _case_table(per_case: pd.DataFrame) -> str:
    columns = [c for c in CASE_COLUMNS if c in per_case.columns]
    rows = []
    for record in per_case[columns].to_dict("records"):
        bad = record.get("status") not in ("ok", "no_label")
        cells = "".join(_cell(record[c], _digits(c)) for c in columns)
        rows.append(f"{_row_start('bad' if bad else '')}{cells}</tr>")
    return _table(columns, rows)


# --------------------------------------------------------------------------------------------
# the sweep


def sweep_page(
    title: str,
    facts: Mapping[str, str],
    table: pd.DataFrame,
    stats: Mapping[str, Any],
    cost_figures: Sequence[Figure] = (),
    figures: Sequence[Figure] = (),
) -> str:
    """The page of a sweep's parent run (see the module doc)."""
    primary = str(stats.get("primary_metric", "dsc_mean"))
    best = stats.get("best") or {}
    tied = [
        t.get("setting") if isinstance(t, Mapping) else t for t in stats.get("tied_with_best") or []
    ]
    parts = [f"<h1>{_e(title)}</h1>", _facts(facts), "<h2>Best setting</h2>"]
    if best:
        how = _direction_text(stats.get("direction"))
        parts.append(
            f"<p><b>{_e(best.get('setting', ''))}</b> by {_e(primary)} ({_e(how)} is better): "
            f"{_num(best.get('value'), 4)} (run {_e(best.get('run_id', ''))})</p>"
        )
        if "tied_with_best" in stats:
            text = ", ".join(_e(str(t)) for t in tied) if tied else "none"
            parts.append(f"<p>Settings tied with the best: {text}</p>")
    else:
        parts.append(f"<p>None ({_e(stats.get('note', 'no results yet'))})</p>")
    parts.append("<h2>Comparison</h2>")
    parts.append(_comparison_table(table, primary, str(best.get("setting", "")), set(tied)))
    parts.append(_tests(stats))
    if cost_figures:
        parts.append("<h2>Accuracy against cost</h2>")
        parts += [_figure(f) for f in cost_figures]
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [_figure(f) for f in figures]
    return _document(title, parts)


def _comparison_table(table: pd.DataFrame, primary: str, best: str, tied: set) -> str:
    wanted = [*COMPARISON_COLUMNS[:2], primary, *COMPARISON_COLUMNS[2:]]
    columns = [c for c in dict.fromkeys(wanted) if c in table.columns]
    header = [
        f"{c} [95% CI]" if f"{c}_ci95_low" in table.columns else c for c in columns
    ]  # an interval beside its mean, in the same cell: a narrower table
    rows = []
    for record in table.to_dict("records") if columns else []:
        setting = record.get("setting")
        kind = "best" if setting == best else "tied" if setting in tied else ""
        kind = kind or ("bad" if record.get("status") not in ("finished", "skipped") else "")
        cells = "".join(_comparison_cell(record, c) for c in columns)
        rows.append(f"{_row_start(kind)}{cells}</tr>")
    return _table(header, rows)


def _comparison_cell(record: Mapping[str, Any], column: str) -> str:
    """A comparison table cell: a mean with 4 decimals and its interval where there is one."""
    value = record[column]
    low, high = record.get(f"{column}_ci95_low"), record.get(f"{column}_ci95_high")
    interval = _pair([low, high]) if low is not None and high is not None else ""
    if not interval or _num(value, 4) in ("", "n/a"):
        return _cell(value, _digits(column, fine=True))
    return f'<td class="num">{_e(_num(value, 4))} [{_e(interval)}]</td>'


def _tests(stats: Mapping[str, Any]) -> str:
    tests = stats.get("tests") or []
    if not tests:
        return ""
    rows = [
        f"<tr><td>{_e(t.get('setting', ''))}</td>{_num_cell(t.get('n_cases'), 0)}"
        f"{_num_cell(t.get('median_difference'), 4)}"
        f'<td class="num">{_e(_pair(t.get("median_difference_ci95")))}</td>'
        f"{_num_cell(t.get('p_value'), 3)}{_num_cell(t.get('p_holm'), 3)}</tr>"
        for t in tests
    ]
    metric = stats.get("test_metric", "")
    caption = (
        f'<p class="note">Paired Wilcoxon signed-rank test of the best setting against each '
        f"other one, per-case {_e(metric)} (mean over labels). Holm p: adjusted over the "
        f"{len(tests)} tests, the p that decides the ties (at least 0.05).</p>"
    )
    header = ["setting", "cases", "median best − other", "95% CI", "p", "Holm p"]
    return caption + _table(header, rows)


def _pair(values: Any) -> str:
    """``-0.0011 – 0.0042`` of a [low, high] interval; "" when undefined."""
    if not isinstance(values, Sequence) or len(values) != 2:
        return ""
    low, high = (_num(v, 4) for v in values)
    return "" if "n/a" in (low, high) else f"{low} – {high}"


def _direction_text(direction: Any) -> str:
    return {"max": "higher", "min": "lower", "min_abs": "smaller |value|"}.get(str(direction), "?")


# --------------------------------------------------------------------------------------------
# HTML pieces


def _document(title: str, parts: Sequence[str]) -> str:
    body = "\n".join(p for p in parts if p)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _facts(facts: Mapping[str, str]) -> str:
    if not facts:
        return ""
    rows = [f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in facts.items()]
    return f'<div class="table"><table class="facts">{"".join(rows)}</table></div>'


def _row_start(css_class: str) -> str:
    return f'<tr class="{css_class}">' if css_class else "<tr>"


def _table(header: Sequence[str], rows: Sequence[str]) -> str:
    """A table inside a box that scrolls sideways when the page is narrower (long cells wrap)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return f'<div class="table">{table}</div>'


def _figure(figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    return (
        f'<figure><img alt="{_e(figure.caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(figure.caption)}</figcaption></figure>"
    )


def _digits(column: str, fine: bool = False) -> int:
    """Decimals shown in `column`: none for counts, two for seconds, else three (`fine`: four,
    for means whose settings may differ in the third decimal)."""
    if column.startswith(("n_", "cache.")) or column == "label":
        return 0
    if column.startswith("seconds"):
        return 2
    return 4 if fine else 3


def _cell(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{_e('' if value is None else str(value).lower())}</td>"
    if isinstance(value, (int, float)):
        return _num_cell(value, 0 if isinstance(value, int) else digits)
    return f"<td>{_e(str(value))}</td>"


def _num_cell(value: Any, digits: int = 3) -> str:
    return f'<td class="num">{_e(_num(value, digits))}</td>'


def _num(value: Any, digits: int = 3) -> str:
    """`value` with `digits` decimals; "" for a missing value, "n/a" for NaN, ±inf as such."""
    if value is None or value == "":
        return ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "n/a"
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    return f"{number:.{digits}f}"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)
