"""``cifarlab evaluate RUN_DIR``: test metrics of a run's best weights."""

from __future__ import annotations

import argparse
import dataclasses

from .common import DEVICE_HELP


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run on the test set",
                       description="Test loss, accuracy and per-class accuracy of RUN_DIR's best weights, with "
                                   "the run's test-time augmentation (train.tta, or --tta) and, beside it, with "
                                   "none (one view); writes RUN_DIR/test_metrics.json and RUN_DIR/test_logits.npz "
                                   "(the logits with TTA). A run trained with data.exclude is scored on its cleaned "
                                   "test split and, beside it, on the full one (test_acc_full).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", metavar="PATH", help="data location, if it moved since training")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--tta", choices=["none", "flip", "flip_translate"], help="test-time augmentation "
                   "(default: the run's train.tta)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..data import load_data
    from ..evaluation import evaluate_run, format_table

    data = full = None
    if args.data:
        cfg = load_config(f"{args.run_dir}/config.yaml", [f"data.path={args.data}"])
        data = load_data(cfg.data)
        if cfg.data.exclude:  # the full test split, for the accuracy beside the cleaned one
            full = load_data(dataclasses.replace(cfg.data, exclude=None))
    res = evaluate_run(args.run_dir, data=data, device=args.device, tta=args.tta, full_data=full)
    print(format_table(res))
    print(f"wrote {args.run_dir}/test_metrics.json and test_logits.npz")
    return 0
