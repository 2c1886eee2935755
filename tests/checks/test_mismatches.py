"""The `Mismatch` record and its reporting: the JSON report and run tags, the console table and
the summary line show every entry, coloured by severity where asked."""

from __future__ import annotations

import json

import numpy as np
from test_config_checks import check, settings
from test_probes import asymmetric

from evalharness.checks.mismatches import (
    Mismatch,
    format_table,
    report_json,
    report_tags,
    summary_line,
)
from evalharness.checks.probes import mirror_probe, spacing_check


def sample_entries() -> list[Mismatch]:
    gt = asymmetric()
    return [
        *check(settings(apply_reorder=False, aggregation="gaussian")),
        mirror_probe("case_1", np.flip(gt, 0), gt),
        spacing_check("case_2", (1.0, 1.0, 1.0), (1.0, 1.0, 3.0)),
    ]


def test_report_json_fields():
    entries = sample_entries()
    report = report_json(entries)
    json.dumps(report)  # serialisable
    assert [e["key"] for e in report["config"]] == [
        "preprocessing.apply_reorder",
        "inference.aggregation",
    ]
    assert [(e["key"], e["case"]) for e in report["data"]] == [
        ("mirror_probe", "case_1"),
        ("spacing_check", "case_2"),
    ]
    assert report["preprocessing_mismatch"] is True
    assert report["mismatch_count"] == 4
    assert set(report["config"][0]) == {
        "scope",
        "key",
        "case",
        "training",
        "evaluation",
        "severity",
        "message",
    }
    # info and spacing warnings alone are not a preprocessing mismatch, but are counted
    mild = [entries[1], entries[3]]
    assert report_json(mild)["preprocessing_mismatch"] is False
    assert report_json(mild)["mismatch_count"] == 2
    assert report_json([]) == {
        "config": [],
        "data": [],
        "split": [],
        "preprocessing_mismatch": False,
        "mismatch_count": 0,
        "leakage_count": 0,
    }


def test_leakage_has_its_own_list_and_count_and_is_no_preprocessing_mismatch():
    leak = Mismatch("split", "leakage", "train", "case id", "error", "m", case="a")
    report = report_json([leak, sample_entries()[1]])
    assert [e["case"] for e in report["split"]] == ["a"] and report["data"] == []
    assert (report["leakage_count"], report["mismatch_count"]) == (1, 2)
    assert report["preprocessing_mismatch"] is False
    assert report_tags(report)["evalharness.leakage_count"] == 1


def test_as_dict_is_json_friendly():
    entry = Mismatch("config", "k", (1.0, np.float32(2.0)), np.int64(3), "info", "m")
    assert entry.as_dict()["training"] == [1.0, 2.0]
    assert type(entry.as_dict()["evaluation"]) is int


def test_format_table_plain_and_coloured():
    entries = sample_entries()
    plain = format_table(entries, color=False)
    assert "\033[" not in plain
    lines = plain.splitlines()
    assert len(lines) == 1 + len(entries)
    assert lines[0].split()[:5] == ["scope", "key/case", "training", "evaluation", "severity"]
    assert "mirror_probe [case_1]" in plain and "preprocessing.apply_reorder" in plain
    # aligned: the severity column starts at the same place on every line
    starts = {line.index(m.severity) for line, m in zip(lines[1:], entries, strict=True)}
    assert len(starts) == 1 and lines[0].index("severity") in starts
    coloured = format_table(entries, color=True).splitlines()
    assert coloured[1].startswith("\033[31m") and coloured[1].endswith("\033[0m")  # error
    assert "\033[" not in coloured[2]  # info
    assert coloured[4].startswith("\033[33m")  # warning
    assert format_table([], color=True) == "no preprocessing mismatches"


def test_report_tags():
    entries = sample_entries()
    assert report_tags(report_json(entries)) == {
        "evalharness.preprocessing_mismatch": "true",
        "evalharness.mismatch_count": 4,
        "evalharness.leakage_count": 0,
    }
    assert report_tags(report_json([])) == {
        "evalharness.preprocessing_mismatch": "false",
        "evalharness.mismatch_count": 0,
        "evalharness.leakage_count": 0,
    }


def test_summary_line_counts_severities_and_flagged_cases():
    entries = sample_entries()  # config: 1 error, 1 info; data: 1 error (case_1), 1 warning
    line = summary_line(entries, color=False)
    assert line == (
        "Preprocessing checks: 2 error(s), 1 warning(s), 1 info; flagged cases: case_1 "
        "(checks/mismatches.json)"
    )
    assert summary_line(entries, color=True) == f"\033[31m{line}\033[0m"
    warning_only = summary_line([entries[3]], color=True)
    assert warning_only.startswith("\033[33m") and "flagged" not in warning_only
    assert "\033[" not in summary_line([entries[1]], color=True)  # info only
    assert summary_line([], color=True) == (
        "Preprocessing checks: no mismatch with the training configuration"
    )
