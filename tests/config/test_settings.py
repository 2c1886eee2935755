"""The effective settings as a person reads them on the summary page: written as in a config,
the device actually used in place of ``auto``."""

from __future__ import annotations

from evalharness.config.settings import EffectiveSettings, setting_text

ZNORM = {"name": "ZNormalization", "masking_method": None, "channel_wise": True}


def test_transform_specs_read_as_a_user_writes_them() -> None:
    assert setting_text([ZNORM]) == "ZNormalization(channel_wise)"
    clamp = {"name": "Clamp", "out_min": -100, "out_max": 200, "channel_wise": False}
    both = "ZNormalization(channel_wise) + Clamp(out_min=-100, out_max=200)"
    assert setting_text([ZNORM, clamp]) == both
    assert setting_text([1.0, 1.0, 2.5]) == "[1.0, 1.0, 2.5]" and setting_text([]) == "[]"
    assert setting_text(None) == "None" and setting_text("hann") == "hann"


def test_the_settings_line_names_the_device_used() -> None:
    settings = EffectiveSettings(
        apply_reorder=True,
        target_spacing_mm=(1.0, 1.0, 2.5),
        normalization=(ZNORM,),
        padding_mode=0,
        patch_size_vox=(32, 32, 16),
        overlap=0.5,
        aggregation="hann",
        keep_largest_component=True,
        threshold=0.5,
        batch_size=4,
        device="auto",
        amp=False,
        tta=False,
    )
    text = settings.as_text("cpu")
    assert "normalization=ZNormalization(channel_wise)" in text
    assert "device=cpu" in text and "auto" not in text
    assert "target_spacing_mm=[1.0, 1.0, 2.5]" in text and "'name'" not in text
    assert "device=auto" in settings.as_text()  # no device given: as configured
