"""How closely the harness reproduces nnUNetv2_predict on the nnU-Net fixture, per setting.

For each reference setting of `tests/fixtures/nnunet_binary/reference_predictions` (default:
mirroring and step 0.5; no mirroring; step 0.25 without mirroring), each test case: the share
of voxels where the harness's label map equals nnUNetv2_predict's (nnU-Net 2.8.1, torch 2.14,
written on another machine) and the harness's DSC against nnUNetv2_evaluate_folder's Dice in
`summary.json`. The harness here runs nnU-Net's own inference code (`predict.nnunet`) with
the installed nnunetv2.

    PYTHONPATH=src python benchmarks/fidelity_nnunet.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from nnunet_fixture import MODEL, TEST_CASES, fixture_case, reference_dice, reference_labels  # noqa: E402

from evalharness.model.nnunet import read_model_folder  # noqa: E402
from evalharness.model.nnunet_network import build_fold_networks  # noqa: E402
from evalharness.predict.nnunet import NnunetRunner, NnunetSettings  # noqa: E402
from evalharness.predict.patch_outputs import ForwardCounts  # noqa: E402
from evalharness.score.metrics import case_metrics  # noqa: E402

SETTINGS = {
    "fold0_default": NnunetSettings(0.5, True, True, False),
    "fold0_disable_tta": NnunetSettings(0.5, False, True, False),
    "fold0_step0.25_disable_tta": NnunetSettings(0.25, False, True, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = read_model_folder(MODEL, [0])
    runner = NnunetRunner(model, build_fold_networks(model))
    inputs = {case_id: runner.load_inputs(fixture_case(case_id)) for case_id in TEST_CASES}
    rows = []
    for setting, options in SETTINGS.items():
        dice = reference_dice(setting)
        for case_id in TEST_CASES:
            counts = ForwardCounts()
            case = inputs[case_id]
            labels = runner.predict(case, options, torch.device("cpu"), counts=counts).labels
            reference = reference_labels(setting, case_id)
            spacing = case.prepared.native.spacing_mm
            ours = case_metrics(labels, case.gt_labels, spacing, [1])[0]["dsc"]
            row = {
                "setting": setting,
                "case": case_id,
                "agreement_pct": 100.0 * float((labels == reference).mean()),
                "voxels_differing": int((labels != reference).sum()),
                "dsc_harness": float(ours),
                "dice_nnunet": dice[case_id],
                "dsc_diff": float(ours) - dice[case_id],
                "forward_passes": counts.executed,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
