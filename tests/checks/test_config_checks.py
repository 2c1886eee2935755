"""Config-level preprocessing-mismatch checks: the classic configuration failures are flagged,
legitimate differences are not (the report of the entries: test_mismatches.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from evalharness.checks.config_checks import config_mismatches
from evalharness.checks.mismatches import Mismatch, has_errors
from evalharness.config.settings import EffectiveSettings

ZNORM = {"name": "ZNormalization", "masking_method": None, "channel_wise": True}
CONTRACT = {"activation": "softmax", "decision": "argmax", "classes": [0, 1]}


def training_values() -> dict:
    return {
        "patch_size": [32, 32, 16],
        "patch_overlap": 0.5,
        "aggregation_mode": "hann",
        "apply_reorder": True,
        "target_spacing": [1.0, 1.0, 2.5],
        "padding_mode": 0,
        "keep_largest_component": True,
        "binary_threshold": 0.5,
        "normalization": [dict(ZNORM)],
        "sampler_type": "label",
    }


def settings(**changes) -> EffectiveSettings:
    base = EffectiveSettings(
        apply_reorder=True,
        target_spacing_mm=(1.0, 1.0, 2.5),
        normalization=(dict(ZNORM),),
        padding_mode=0,
        patch_size_vox=(32, 32, 16),
        overlap=0.5,
        aggregation="hann",
        keep_largest_component=True,
        threshold=0.5,
        batch_size=4,
        device="cpu",
        amp=False,
        tta=False,
    )
    return replace(base, **changes)


def check(s: EffectiveSettings, training: dict | None = None, **kwargs) -> list[Mismatch]:
    kwargs.setdefault("n_output_channels", 2)
    kwargs.setdefault("dataset_labels", [0, 1])
    kwargs.setdefault("output_contract", CONTRACT)
    values = training_values() if training is None else training
    return config_mismatches(s, values, "mlflow", {}, **kwargs)


def by_key(found: list[Mismatch]) -> dict[str, Mismatch]:
    keys = [m.key for m in found]
    assert len(keys) == len(set(keys)), keys
    return {m.key: m for m in found}


# ---------------------------------------------------------------------------------- config


def test_clean_config_gives_no_entries():
    assert check(settings()) == []
    # the same values written differently: overlap in voxels, spec keys reordered,
    # channel_wise left to its default, spacing with float noise, tuples for lists
    same = settings(
        overlap=[16, 16, 8],
        normalization=({"masking_method": None, "name": "ZNormalization"},),
        target_spacing_mm=(1.0000001, 1.0, 2.5),
    )
    assert check(same) == []
    assert check(settings(), n_output_channels=1, dataset_labels=[0, 1], output_contract=None) == []


def test_reorientation_disabled_is_an_error():
    found = by_key(check(settings(apply_reorder=False)))
    entry = found["preprocessing.apply_reorder"]
    assert (entry.training, entry.evaluation, entry.severity) == (True, False, "error")
    assert "mirrored or rotated" in entry.message
    assert has_errors(list(found.values()))


def test_wrong_target_spacing_names_the_axis():
    entry = by_key(check(settings(target_spacing_mm=(1.0, 1.0, 1.0))))[
        "preprocessing.target_spacing"
    ]
    assert entry.severity == "error"
    assert "z (axis 2)" in entry.message and "2.5" in entry.message
    assert "x (axis 0)" not in entry.message and "y (axis 1)" not in entry.message
    native = by_key(check(settings(target_spacing_mm=None)))["preprocessing.target_spacing"]
    assert native.severity == "error" and "keeps native spacing" in native.message


def test_missing_normalisation_is_an_error():
    entry = by_key(check(settings(normalization=())))["preprocessing.normalization"]
    assert entry.severity == "error"
    assert entry.evaluation == []
    assert "no normalisation" in entry.message and "ZNormalization" in entry.message


def test_normalisation_with_other_arguments_is_an_error():
    other = dict(ZNORM, masking_method="foreground")
    entry = by_key(check(settings(normalization=(other,))))["preprocessing.normalization"]
    assert entry.severity == "error" and "masking_method" in entry.message
    not_channel_wise = dict(ZNORM, channel_wise=False)
    entry = by_key(check(settings(normalization=(not_channel_wise,))))[
        "preprocessing.normalization"
    ]
    assert "channel_wise" in entry.message
    renamed = {"name": "RescaleIntensity", "out_min_max": (0, 1)}
    entry = by_key(check(settings(normalization=(renamed,))))["preprocessing.normalization"]
    assert "RescaleIntensity" in entry.message


@pytest.mark.parametrize(
    ("channels", "labels", "severity"),
    [
        (2, [0, 1, 2], "error"),  # 2-channel softmax cannot predict label 2
        (1, [0, 1, 2], "error"),  # 1-channel model, two foreground labels
        (1, [0, 2], "error"),  # 1-channel model predicts 1, the data's foreground is 2
        (3, [0, 1], "info"),  # a class the test data lacks: reported, not failing
        (3, [0, 1, 2], None),
        (1, [0, 1], None),
    ],
)
def test_output_channels_against_dataset_labels(channels, labels, severity):
    found = by_key(
        check(settings(), n_output_channels=channels, dataset_labels=labels, output_contract=None)
    )
    if severity is None:
        assert "model.out_channels" not in found
    else:
        entry = found["model.out_channels"]
        assert (entry.severity, entry.evaluation, entry.training) == (severity, channels, labels)


def test_output_contract_against_channel_count():
    entry = by_key(check(settings(), n_output_channels=1, dataset_labels=[0, 1]))[
        "model.output_contract"
    ]
    assert entry.severity == "error" and "1 output channel" in entry.message
    sigmoid = {"activation": "sigmoid", "decision": "threshold", "classes": [0, 1]}
    entry = by_key(check(settings(), output_contract=sigmoid))["model.output_contract"]
    assert entry.severity == "error" and "2 output channels" in entry.message
    three = dict(CONTRACT, classes=[0, 1, 2])
    assert "model.output_contract" in by_key(check(settings(), output_contract=three))


@pytest.mark.parametrize(("channels", "severity"), [(1, "error"), (2, "info"), (None, "warning")])
def test_threshold_matters_only_for_one_channel_models(channels, severity):
    found = check(settings(threshold=0.3), n_output_channels=channels, output_contract=None)
    entry = by_key(found)["inference.threshold"]
    assert (entry.training, entry.evaluation, entry.severity) == (0.5, 0.3, severity)


def test_sweep_dimensions_are_info_only():
    s = settings(
        patch_size_vox=(48, 48, 16),
        overlap=0.25,
        aggregation="gaussian",
        keep_largest_component=False,
        batch_size=8,
    )
    training = dict(training_values(), batch_size=2)
    found = by_key(check(s, training))
    assert set(found) == {
        "patch.size",
        "patch.overlap",
        "inference.aggregation",
        "inference.keep_largest_component",
        "inference.batch_size",
    }
    assert {m.severity for m in found.values()} == {"info"}
    assert found["patch.overlap"].training == [24, 24, 8]
    assert found["patch.overlap"].evaluation == [12, 12, 4]
    assert not has_errors(list(found.values()))
    # without a training batch size there is nothing to compare
    assert "inference.batch_size" not in by_key(check(settings(batch_size=8)))


def test_missing_training_config_is_one_entry_listing_assumptions():
    """Guessing the training preprocessing (reorientation, spacing, normalisation) can make an
    evaluation silently wrong: an error-class entry. Guessing only inference settings: a
    warning."""
    assumed = {"apply_reorder": True, "patch_overlap": 0.5}
    found = config_mismatches(settings(), {}, "none", assumed)
    assert len(found) == 1
    (entry,) = found
    assert (entry.key, entry.severity, entry.training) == ("training_config", "error", None)
    assert "apply_reorder=True" in entry.message and "patch_overlap=0.5" in entry.message
    assert "(apply_reorder guessed, not known: set preprocessing.*" in entry.message
    assert entry.evaluation == assumed
    assert has_errors(found)
    (mild,) = config_mismatches(settings(), {}, "none", {"patch_overlap": 0.5})
    assert mild.severity == "warning" and "guessed" not in mild.message


def test_missing_training_field_is_a_warning_naming_it():
    training = training_values()
    del training["target_spacing"]
    found = by_key(
        config_mismatches(
            settings(target_spacing_mm=None), training, "mlflow", {"target_spacing": None}
        )
    )
    entry = found["preprocessing.target_spacing"]
    assert entry.severity == "warning"
    assert "'target_spacing'" in entry.message and "default None" in entry.message
    assert not has_errors(list(found.values()))


def test_padding_mode_difference_is_a_warning():
    entry = by_key(check(settings(padding_mode="edge")))["preprocessing.padding_mode"]
    assert entry.severity == "warning"


def test_overlap_is_compared_in_voxels_at_the_evaluation_patch():
    # same voxels, written differently: no entry
    assert check(settings(overlap=[17, 16, 9])) == [] == check(settings(overlap=[16, 16, 8]))
    # a new patch size alone is reported as patch.size: the overlap setting (0.5 -> 16 voxels
    # at the evaluation's patch) is the same as 17 voxels there
    bigger = check(settings(patch_size_vox=(32, 32, 32), overlap=17))
    assert [m.key for m in bigger] == ["patch.size"]
