"""The sweep cache: byte-bounded LRU, and keys that change with the files and the settings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from evalharness.data.datasets import Case
from evalharness.data.nifti_io import write_nifti
from evalharness.predict.preprocess import PreprocessSettings
from evalharness.sweep.cache import Counters, SizedLRU, SweepCache


def test_lru_drops_the_least_recently_used_beyond_the_byte_budget() -> None:
    lru = SizedLRU(max_bytes=100)
    lru.put("a", "A", 40)
    lru.put("b", "B", 40)
    assert lru.get("a") == "A"  # "b" is now the least recently used
    lru.put("c", "C", 40)
    assert (lru.get("a"), lru.get("b"), lru.get("c")) == ("A", None, "C")
    assert lru.nbytes == 80
    lru.put("huge", "H", 101)  # larger than the whole budget: not kept, nothing evicted
    assert lru.get("huge") is None and lru.nbytes == 80
    lru.resize(50)
    assert lru.nbytes <= 50


def _case(folder: Path) -> Case:
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    write_nifti(folder / "img.nii.gz", rng.normal(size=(12, 10, 6)).astype(np.float32), affine)
    labels = np.zeros((12, 10, 6), dtype=np.uint8)
    labels[3:7, 3:6, 2:4] = 1
    write_nifti(folder / "lab.nii.gz", labels, affine)
    return Case("c1", folder / "img.nii.gz", folder / "lab.nii.gz")


def test_case_inputs_are_prepared_once_per_files_and_settings(tmp_path: Path) -> None:
    case = _case(tmp_path)
    settings = PreprocessSettings(
        True, (1.5, 1.5, 1.5), ({"name": "ZNormalization"},), 0, (8, 8, 8)
    )
    cache = SweepCache(max_bytes=2**30)
    first = cache.load_inputs(case, settings)
    assert cache.load_inputs(case, settings) is first
    assert cache.counters() == Counters(case_loads=1, case_hits=1)
    bigger_patch = PreprocessSettings(
        True, (1.5, 1.5, 1.5), ({"name": "ZNormalization"},), 0, (32, 32, 32)
    )
    padded = cache.load_inputs(case, bigger_patch)  # padding to the patch: another entry
    assert padded.prepared.tensor.shape[1:] == (32, 32, 32)
    stat = case.image.stat()
    os.utime(case.image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # file rewritten
    assert cache.load_inputs(case, settings) is not first
    assert cache.counters() == Counters(case_loads=3, case_hits=1)
    assert cache.nbytes > 0


def test_zero_budget_keeps_nothing(tmp_path: Path) -> None:
    case = _case(tmp_path)
    settings = PreprocessSettings(False, None, (), 0, None)
    cache = SweepCache(max_bytes=0)
    cache.load_inputs(case, settings)
    cache.load_inputs(case, settings)
    assert cache.counters() == Counters(case_loads=2) and cache.nbytes == 0
