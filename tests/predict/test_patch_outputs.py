"""The forward key (`patch_outputs.forward_key`): what decides a case's patch outputs."""

from __future__ import annotations

from dataclasses import replace

import torch

from evalharness.config.settings import EffectiveSettings
from evalharness.predict.patch_outputs import forward_key

CPU = torch.device("cpu")
BASE = EffectiveSettings(
    apply_reorder=True,
    target_spacing_mm=None,
    normalization=(),
    padding_mode=0,
    patch_size_vox=(16, 16, 8),
    overlap=0.5,
    aggregation="hann",
    keep_largest_component=False,
    threshold=0.5,
    batch_size=4,
    device="cpu",
    amp=False,
    tta=False,
)


def test_settings_that_differ_after_the_forward_passes_share_a_key() -> None:
    key = forward_key("model", BASE, CPU)
    assert BASE.overlap_vox == (8, 8, 4)
    same = [
        replace(BASE, aggregation="gaussian", keep_largest_component=True, threshold=0.3),
        replace(BASE, overlap=[8, 8, 4]),  # the same overlap, in voxels
        replace(BASE, overlap=[9, 8, 5]),  # odd counts lose a voxel, as TorchIO needs
        replace(BASE, restore="labels", tta=True),
    ]
    assert {forward_key("model", s, CPU) for s in same} == {key}
    for other in (replace(BASE, overlap=0.25), replace(BASE, batch_size=2)):
        assert forward_key("model", other, CPU) != key
    assert forward_key("other model", BASE, CPU) != key
    cuda = torch.device("cuda")
    assert forward_key("model", BASE, cuda) != key
    assert forward_key("model", replace(BASE, amp=True), cuda) != forward_key("model", BASE, cuda)
    assert forward_key("model", replace(BASE, amp=True), CPU) == key  # bf16 only on CUDA
