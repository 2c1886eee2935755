"""Reuse across the jobs of a sweep in one process: the loaded model and each case's inputs.

Hydra's default launcher runs a sweep's jobs one after another in one process, so a sweep over
K inference settings would otherwise load the model K times and read and preprocess every case
K times. `SweepCache` keeps both in one least-recently-used store bounded by bytes
(`sweep.cache_mb`, default `DEFAULT_CACHE_MB`; 0 turns caching off), and counts loads and hits
so a sweep can show each case was prepared once.

Keys say exactly what decides a value, so a hit can never serve something stale:

- model: the artifact's sha256 plus the loading options (`rules.MODEL_LOADING_OPTIONS`);
- case: its id, both files' paths, sizes and modification times, and every preprocessing
  setting including ``min_shape_vox`` (volumes are padded to the patch size, so another patch
  size is another entry);
- patch outputs (forward-pass sharing, `patch_outputs`): the case key, the forward key
  (`pipeline.forward_key`: model checksum and loading options, patch size, overlap, batch
  size, device, precision) and the mirror flip. One entry holds every patch of one case under
  one flip, float32 on the CPU: about (patches x patch voxels x K') x 4 bytes, K' the output
  channels (1 for two classes) -- for an overlap of half the patch about 8 times the case's
  probability volume. A case whose entry does not fit the budget is recomputed. A sweep
  group (`sweep.group_pass`, case by case) needs one case's entries at a time; settings that
  share one after another (sweepers other than the basic one) need every case's to stay.

Cached values are shared, never copied: consumers must treat them as read-only (the pipeline
does). Process-parallel launchers (joblib, submitit) get one cache per worker process.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from evalharness.config.rules import MODEL_LOADING_OPTIONS
from evalharness.config.schema import ModelConfig
from evalharness.config.settings import stable_hash
from evalharness.data.datasets import Case
from evalharness.model.loaders import LoadedModel, load_resolved_model
from evalharness.model.sources import ResolvedModel
from evalharness.predict.family import ModelFamily
from evalharness.predict.patch_outputs import Flip, PatchOutputs
from evalharness.predict.pipeline import CaseInputs, load_case_inputs
from evalharness.predict.preprocess import PreprocessSettings

DEFAULT_CACHE_MB = 2048
"""Default budget of the in-process cache: 2 GiB (models plus preprocessed cases)."""

T = TypeVar("T")


@dataclass(frozen=True)
class Counters:
    """Loads (misses) and hits of the cache, for the model and for case inputs."""

    model_loads: int = 0
    model_hits: int = 0
    case_loads: int = 0
    case_hits: int = 0
    patch_stores: int = 0
    patch_hits: int = 0

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            *(getattr(self, f.name) - getattr(other, f.name) for f in dataclasses.fields(self))
        )

    def __add__(self, other: Counters) -> Counters:
        return Counters(
            *(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self))
        )

    def as_metrics(self) -> dict[str, float]:
        """``cache.<counter>`` metrics of one child run."""
        return {f"cache.{f.name}": float(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        return (
            f"model {self.model_loads} load(s), {self.model_hits} hit(s); "
            f"cases {self.case_loads} load(s), {self.case_hits} hit(s); "
            f"patch outputs {self.patch_stores} stored, {self.patch_hits} reused"
        )


class SizedLRU:
    """Values by key; the least recently used go once the total exceeds `max_bytes`.

    A value larger than the whole budget is not kept. Thread-safe (the case loop prefetches
    on a thread).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._items.values())

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            self._items.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        with self._lock:
            self._items.pop(key, None)
            if nbytes <= self.max_bytes:
                self._items[key] = (value, nbytes)
            self._evict()

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = max_bytes
            self._evict()

    def _evict(self) -> None:
        total = sum(size for _, size in self._items.values())
        while total > self.max_bytes:
            _, (_, size) = self._items.popitem(last=False)
            total -= size


class SweepCache:
    """The model and case inputs of a sweep's jobs in this process (see the module doc)."""

    def __init__(self, max_bytes: int) -> None:
        self._store = SizedLRU(max_bytes)
        self._counts = {f.name: 0 for f in dataclasses.fields(Counters)}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._store.nbytes

    def resize(self, max_bytes: int) -> None:
        self._store.resize(max_bytes)

    def counters(self) -> Counters:
        with self._lock:
            return Counters(**self._counts)

    def load_model(self, resolved: ResolvedModel, source: ModelConfig) -> LoadedModel:
        """`model.loaders.load_resolved_model`, once per artifact checksum and loading options
        (an ensemble: once per member)."""
        options = {k: getattr(source, k) for k in MODEL_LOADING_OPTIONS}
        key = ("model", resolved.sha256, stable_hash(options))
        return self._get(key, "model", lambda: load_resolved_model(resolved, source), _model_nbytes)

    def load_inputs(
        self, case: Case, settings: PreprocessSettings, family: ModelFamily | None = None
    ) -> CaseInputs:
        """`pipeline.load_case_inputs` (or a model `family`'s own), once per case files,
        preprocessing settings and family inputs key."""
        if family is None:
            key = ("case", *_case_key(case, settings))
            load = load_case_inputs
        else:
            key = ("case", family.name, family.inputs_key(), *_case_key(case, settings))
            load = family.load_inputs
        return self._get(key, "case", lambda: load(case, settings), _inputs_nbytes)

    def patch_outputs(
        self, case: Case, settings: PreprocessSettings, forward_key: str
    ) -> CaseOutputs:
        """The store of this case's patch outputs under `forward_key` (`OutputStore`)."""
        return CaseOutputs(self, ("patch", *_case_key(case, settings), forward_key))

    def _get(
        self, key: Hashable, kind: str, load: Callable[[], T], nbytes: Callable[[T], int]
    ) -> T:
        value = self._store.get(key)
        if value is not None:
            self._count(f"{kind}_hits")
            return value
        value = load()  # errors propagate and nothing is kept: the next job tries again
        self._count(f"{kind}_loads")
        self._store.put(key, value, nbytes(value))
        return value

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1


class CaseOutputs:
    """One case's patch outputs per flip in the sweep cache (`predict.patch_outputs`)."""

    def __init__(self, cache: SweepCache, key: tuple) -> None:
        self._cache, self._key = cache, key

    @property
    def capacity_bytes(self) -> int:
        return self._cache._store.max_bytes

    def get(self, flip: Flip) -> PatchOutputs | None:
        entry = self._cache._store.get((*self._key, flip))
        if entry is not None:
            self._cache._count("patch_hits")
        return entry

    def put(self, flip: Flip, outputs: PatchOutputs) -> None:
        self._cache._count("patch_stores")
        self._cache._store.put((*self._key, flip), outputs, outputs.nbytes)


def _case_key(case: Case, settings: PreprocessSettings) -> tuple:
    """A case's files (path, size, mtime) and its preprocessing settings."""
    return (
        case.case_id,
        _file_identity(case.image),
        _file_identity(case.label),
        stable_hash(dataclasses.asdict(settings)),
    )


def _file_identity(path: Path | None) -> tuple[str, int, int] | None:
    """(path, size, mtime in ns): a rewritten file is another key; a missing one has none."""
    if path is None:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return (str(path), -1, -1)
    return (str(path), stat.st_size, stat.st_mtime_ns)


def _tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.element_size() * tensor.nelement()


def _model_nbytes(loaded: LoadedModel) -> int:
    network = loaded.network
    return sum(_tensor_nbytes(t) for t in (*network.parameters(), *network.buffers()))


def _inputs_nbytes(inputs: CaseInputs) -> int:
    labels = 0 if inputs.gt_labels is None else int(inputs.gt_labels.nbytes)
    return _tensor_nbytes(inputs.prepared.tensor) + labels


_SHARED: SweepCache | None = None


def shared_cache(max_mb: float) -> SweepCache:
    """This process's cache, created on first use and resized to `max_mb` MiB."""
    global _SHARED
    max_bytes = int(max_mb * 2**20)
    if _SHARED is None:
        _SHARED = SweepCache(max_bytes)
    else:
        _SHARED.resize(max_bytes)
    return _SHARED
