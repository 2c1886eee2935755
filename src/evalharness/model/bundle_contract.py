"""What a bundle's checked ``preprocessing``, ``inferer`` and ``postprocessing`` mean for the
evaluation: a training configuration in the harness's vocabulary (so settings fall back to the
bundle's and differ from it as they would from a fastMONAI run's), the pipeline MONAI applies
per case (`BundlePipeline`), and the transforms the evaluation cannot apply (never dropped:
the checks report them as errors).

- ``preprocessing``: applied by MONAI itself; ``Orientationd(axcodes="RAS")`` is
  ``apply_reorder``, ``Spacingd(pixdim)`` is ``target_spacing``, the transforms of
  ``monai.transforms.intensity`` are ``normalization`` (``{"name": class, args...}``).
  Random transforms, transforms of keys other than the image's and transforms without keys
  cannot be applied.
- ``inferer``: ``SlidingWindowInferer`` (or ``...Adapt``): ``roi_size`` is ``patch_size``,
  ``overlap`` is ``patch_overlap``, ``mode`` ``constant``/``gaussian`` is ``aggregation_mode``
  ``average``/``gaussian`` (with MONAI's default ``sigma_scale`` 0.125, the harness's);
  ``sw_batch_size`` is kept as information (the batch does not change a prediction).
  Arguments left out take the class's own defaults (read from its signature).
- ``postprocessing``: ``Activationsd`` (softmax, or sigmoid for one channel), ``Invertd`` of
  the preprocessing (``nearest_interp``), ``AsDiscreted`` (argmax or threshold),
  ``KeepLargestConnectedComponentd``; ``SaveImaged`` is the harness's job and is never read;
  type conversions are ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from monai.transforms import Randomizable

from evalharness.errors import SourceError
from evalharness.model.bundle import OUTPUT_WRITERS, Bundle
from evalharness.model.bundle_safety import allowed_class, target_class
from evalharness.model.training_config import TrainingConfig

SOURCE = "bundle"
STRUCTURAL = {"LoadImaged", "EnsureChannelFirstd", "EnsureTyped", "ToTensord", "CastToTyped"}
IGNORED_POST = {"EnsureTyped", "ToTensord", "ToDeviced", "ToNumpyd", "CastToTyped"}
INFERERS = ("SlidingWindowInferer", "SlidingWindowInfererAdapt")
AGGREGATION = {"constant": "average", "gaussian": "gaussian"}
HARNESS_SIGMA_SCALE = 0.125
INFERER_KEPT = {"sw_device", "device", "progress", "cache_roi_weight_map", "cpu_thresh"}
INFERER_KEPT |= {"buffer_steps", "buffer_dim"}
_COMPONENT_KEYS = ("_target_", "_requires_", "_disabled_", "_desc_", "_mode_")


@dataclass(frozen=True)
class BundlePipeline:
    """What `predict.bundle_transforms` applies per case: the checked preprocessing (closed
    transform configs, keys narrowed to the image key; a trusted bundle's may hold the values
    its ``$`` expressions evaluated to), the image key, and how the output goes back."""

    preprocessing: Any  # [transform config], instantiated by MONAI per case
    image_key: str
    invert: bool  # Invertd of the preprocessing is in the postprocessing
    nearest_interp: bool  # Invertd's interpolation (False: bilinear probabilities)


@dataclass(frozen=True)
class BundleContract:
    training: TrainingConfig
    pipeline: BundlePipeline
    not_applicable: tuple[tuple[str, str], ...] = field(default=())  # (id, what and why)
    batch_size: int | None = None  # the inferer's sw_batch_size


def transform_name(item: Mapping[str, Any]) -> str:
    """The class name a transform config's ``_target_`` resolves to (``Spacingd``)."""
    return target_class(item).rsplit(".", 1)[-1]


def _args(item: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in _COMPONENT_KEYS}


def _transforms(closed: Any, where: str) -> list[tuple[str, Mapping[str, Any]]]:
    """(id, config) of each transform of a Compose (or of a single transform)."""
    if isinstance(closed, Mapping) and transform_name(closed) == "Compose":
        items = closed.get("transforms") or []
        where = f"{where}::transforms"
    elif isinstance(closed, list):
        items = closed
    else:
        return [(where, closed)]
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise SourceError(f"bundle id '{where}': expected a list of transforms")
    return [(f"{where}::{i}", item) for i, item in enumerate(items)]


def _keys(item: Mapping[str, Any]) -> list[str] | None:
    keys = item.get("keys")
    if keys is None:
        return None
    return [keys] if isinstance(keys, str) else [str(k) for k in keys]


def _is_random(item: Mapping[str, Any]) -> bool:
    cls = allowed_class(target_class(item))
    return cls is not None and issubclass(cls, Randomizable)


def is_intensity(item: Mapping[str, Any]) -> bool:
    """Whether a transform config is one of MONAI's intensity transforms."""
    return target_class(item).startswith("monai.transforms.intensity")


def normalization_spec(item: Mapping[str, Any]) -> dict[str, Any]:
    """An intensity transform config as a normalisation spec: ``{"name": class, args...}``."""
    args = {k: v for k, v in _args(item).items() if k not in ("keys", "allow_missing_keys")}
    return {"name": transform_name(item), **args}


def _call(name: str, args: Mapping[str, Any]) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


def _preprocessing(bundle: Bundle, notes: list, values: dict, unknown: dict):
    applied: list[dict] = []
    steps = _transforms(bundle.preprocessing, "preprocessing")
    first = steps[0][1] if steps else {}
    if not steps or transform_name(first) != "LoadImaged" or not _keys(first):
        raise SourceError(
            f"{bundle.root / bundle.config_file}: bundle id 'preprocessing': expected a "
            "Compose starting with LoadImaged(keys=<image key>)"
        )
    image_key = _keys(first)[0]
    values.update(apply_reorder=False, target_spacing=None, normalization=[])
    for where, item in steps:
        name, args, keys = transform_name(item), _args(item), _keys(item)
        if _is_random(item):
            notes.append(
                (where, f"{_call(name, args)} is random: the evaluation does not apply it")
            )
            continue
        if keys is None or image_key not in keys:
            notes.append(
                (where, f"{_call(name, args)} needs data other than the image ({image_key!r})")
            )
            continue
        narrowed = {**item, "keys": image_key}
        if name == "Orientationd":
            values["apply_reorder"] = True
            if str(args.get("axcodes", "RAS")).upper() != "RAS":
                unknown["orientation_axcodes"] = args.get("axcodes")
        elif name == "Spacingd":
            pixdim = args.get("pixdim")
            values["target_spacing"] = (
                [float(pixdim)] * 3
                if isinstance(pixdim, (int, float))
                else [float(p) for p in pixdim]
            )
        elif is_intensity(item):
            values["normalization"].append(normalization_spec(item))
        elif name not in STRUCTURAL:
            unknown.setdefault("preprocessing", []).append(name)
        applied.append(narrowed)
    return applied, image_key


def _inferer(bundle: Bundle, notes: list, values: dict, unknown: dict) -> int | None:
    item = bundle.inferer
    name = transform_name(item) if isinstance(item, Mapping) else type(item).__name__
    if name not in INFERERS:
        notes.append(("inferer", f"{name} is not a sliding-window inferer the harness runs"))
        return None
    cls = allowed_class(target_class(item))
    defaults = {
        k: p.default
        for k, p in inspect.signature(cls).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    args = {**defaults, **_args(item)}
    roi = args.get("roi_size")
    roi = [int(roi)] * 3 if isinstance(roi, int) else [int(r) for r in roi]
    if len(roi) != 3 or min(roi) <= 0:
        notes.append(("inferer::roi_size", f"roi_size={roi}: expected three positive sizes"))
    else:
        values["patch_size"] = roi
    values["patch_overlap"] = (
        float(args["overlap"])
        if not isinstance(args["overlap"], Sequence)
        else list(args["overlap"])
    )
    mode = str(args.get("mode", "constant"))
    if mode in AGGREGATION:
        values["aggregation_mode"] = AGGREGATION[mode]
    else:
        notes.append(("inferer::mode", f"mode={mode!r}: the harness blends constant or gaussian"))
    if mode == "gaussian" and args.get("sigma_scale") != HARNESS_SIGMA_SCALE:
        notes.append(
            (
                "inferer::sigma_scale",
                f"sigma_scale={args.get('sigma_scale')!r}: the harness's "
                f"gaussian uses {HARNESS_SIGMA_SCALE}",
            )
        )
    if str(args.get("padding_mode")) != "constant" or float(args.get("cval", 0)) != 0.0:
        notes.append(
            (
                "inferer::padding_mode",
                f"padding_mode={args.get('padding_mode')!r}, "
                f"cval={args.get('cval')!r}: the harness pads with zeros",
            )
        )
    if args.get("with_coord"):
        notes.append(
            ("inferer::with_coord", "with_coord=True: the network takes patch coordinates")
        )
    values["padding_mode"] = 0
    batch = args.get("sw_batch_size")
    unknown["sw_batch_size"] = batch
    return int(batch) if isinstance(batch, int) else None


def _postprocessing(bundle: Bundle, notes: list, values: dict, image_key: str):
    output: dict[str, Any] = {}
    invert = nearest = False
    activated = False
    for where, item in _transforms(bundle.postprocessing, "postprocessing"):
        name = transform_name(item)
        if name in OUTPUT_WRITERS or name in IGNORED_POST:
            continue
        args = _args(item)
        if name == "Activationsd":
            if args.get("softmax"):
                output["activation"] = "softmax"
            elif args.get("sigmoid"):
                output["activation"] = "sigmoid"
            if args.get("other") is not None:
                notes.append((where, f"{name}(other=...) is a function the harness does not apply"))
            activated = True
        elif name == "Invertd":
            if args.get("transform") != bundle.preprocessing or _keys(
                {"keys": args.get("orig_keys", image_key)}
            ) != [image_key]:
                notes.append(
                    (where, "Invertd of something other than the preprocessing of the image")
                )
                continue
            if not activated:
                notes.append(
                    (where, "Invertd before Activationsd: the harness restores probabilities")
                )
            invert, nearest = True, bool(args.get("nearest_interp", True))
        elif name == "AsDiscreted":
            if args.get("argmax"):
                output["decision"] = "argmax"
                values.setdefault("binary_threshold", 0.5)  # unused by argmax: nothing assumed
            elif args.get("threshold") is not None:
                output["decision"] = "threshold"
                values["binary_threshold"] = float(args["threshold"])
        elif name == "KeepLargestConnectedComponentd":
            values["keep_largest_component"] = True
        else:
            notes.append(
                (where, f"{_call(name, args)} is a post-processing the harness cannot apply")
            )
    values.setdefault("keep_largest_component", False)
    classes = _classes(bundle)
    if classes:
        output["classes"] = classes
    return invert, nearest, output


def _classes(bundle: Bundle) -> list[str]:
    outputs = (bundle.data_format or {}).get("outputs") or {}
    for spec in outputs.values():
        channels = spec.get("channel_def") if isinstance(spec, Mapping) else None
        if isinstance(channels, Mapping) and all(str(k).isdigit() for k in channels):
            return [str(channels[k]) for k in sorted(channels, key=lambda k: int(k))]
    return []


def bundle_contract(bundle: Bundle) -> BundleContract:
    """The training configuration, pipeline and inapplicable transforms of `bundle`."""
    notes: list[tuple[str, str]] = []
    values: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    applied, image_key = _preprocessing(bundle, notes, values, unknown)
    batch = _inferer(bundle, notes, values, unknown)
    invert, nearest, output = _postprocessing(bundle, notes, values, image_key)
    training = TrainingConfig(values=values, source=SOURCE, unknown=unknown, output=output or None)
    pipeline = BundlePipeline(
        preprocessing=applied,
        image_key=image_key,
        invert=invert,
        nearest_interp=nearest,
    )
    return BundleContract(training, pipeline, tuple(notes), batch)
