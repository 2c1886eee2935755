"""Sweep groups on disk (`sweep.grouping`): which jobs share forward passes, one claimant per
group, waiting jobs get their outcome (or evaluate alone when the claimant is gone)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from evalharness.sweep import grouping
from evalharness.sweep.grouping import DoneRecord


def test_jobs_differing_only_after_the_forward_passes_share_a_group() -> None:
    jobs = [
        ["patch.overlap=0.25", "inference.aggregation=hann", "metrics.missing=nan"],
        ["patch.overlap=0.25", "inference.aggregation=crop", "metrics.missing=worst"],
        ["patch.overlap=0.5", "inference.aggregation=hann", "metrics.missing=nan"],
        ["patch.overlap=0.5", "+inference.aggregation=crop", "metrics.missing=nan"],
    ]
    planned = grouping.plan_jobs(jobs)
    assert [p.num for p in planned] == [0, 1, 2, 3]
    assert planned[0].group == planned[1].group  # aggregation and metric options: sharable
    assert planned[0].group != planned[2].group  # another patch grid
    assert planned[2].group != planned[3].group  # a `+key=` form decides the group
    assert planned[1].shared == ("inference.aggregation=crop", "metrics.missing=worst")


def test_a_job_finds_the_others_of_its_group_only_under_its_own_overrides(tmp_path: Path) -> None:
    jobs = [["inference.tta=false", "demo.size=tiny"], ["inference.tta=true", "demo.size=tiny"]]
    grouping.write_groups(tmp_path, grouping.plan_jobs(jobs))
    [other] = grouping.group_of(tmp_path, 0, jobs[0])
    assert other.num == 1 and other.shared == ("inference.tta=true",)
    assert grouping.group_of(tmp_path, 0, ["inference.tta=false"]) == []  # not the planned job
    assert grouping.group_of(tmp_path / "unplanned", 0, jobs[0]) == []


def test_one_claimant_per_group_and_waiting_jobs_get_their_record(tmp_path: Path) -> None:
    assert grouping.try_claim(tmp_path, "g", 0)
    assert not grouping.try_claim(tmp_path, "g", 1)
    record = DoneRecord(0, "run1", False, ("c0", "c1"))
    grouping.write_done(tmp_path, 1, record)
    assert grouping.wait_for(tmp_path, "g", 1) == record
    staged = grouping.staged_dir(tmp_path, 1)
    (staged / "plots").mkdir(parents=True)
    (staged / "per_case.csv").write_text("case\n")
    own = tmp_path / "1"
    grouping.take_outputs(tmp_path, 1, own)
    assert (own / "per_case.csv").read_text() == "case\n" and (own / "plots").is_dir()
    assert not staged.exists()
    grouping.release(tmp_path, "g")  # the claimant could not run the group: the others go alone
    assert grouping.wait_for(tmp_path, "g", 2) is None
    grouping.clear(tmp_path)
    assert grouping.try_claim(tmp_path, "g", 2)  # a new sweep in the same folder claims anew


def test_a_claim_whose_process_is_gone_is_not_waited_for(tmp_path: Path) -> None:
    assert grouping.try_claim(tmp_path, "g", 0)
    claim = tmp_path / ".evalharness" / "groups" / "g.claim"
    gone = subprocess.Popen(["true"])
    gone.wait()
    owner = json.loads(claim.read_text())
    claim.write_text(json.dumps({**owner, "pid": gone.pid}))
    assert grouping.wait_for(tmp_path, "g", 1) is None
    claim.write_text(json.dumps({**owner, "host": "elsewhere"}))
    old = claim.stat().st_mtime - grouping.STALE_AFTER_S - 1
    os.utime(claim, (old, old))  # another host's claimant without a heartbeat
    assert grouping.wait_for(tmp_path, "g", 1) is None
