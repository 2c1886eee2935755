"""Where the aggregation buffers go when CUDA runs out of memory (`memory.with_cpu_fallback`)."""

from __future__ import annotations

import pytest
import torch

from evalharness.errors import CaseError
from evalharness.predict.memory import CPU, with_cpu_fallback


def test_out_of_gpu_memory_retries_on_the_cpu_then_fails_the_case() -> None:
    tried: list[torch.device] = []

    def aggregate(buffers: torch.device) -> str:
        tried.append(buffers)
        if buffers.type == "cuda" or len(tried) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return f"on {buffers}"

    assert with_cpu_fallback(aggregate, torch.device("cuda")) == "on cpu"
    assert tried == [torch.device("cuda"), CPU]
    with pytest.raises(CaseError, match="out of GPU memory with the aggregation on the CPU"):
        with_cpu_fallback(aggregate, CPU)
