"""``cifarlab export RUN_DIR --format onnx|torchscript|safetensors``: the best weights for other runtimes."""

from __future__ import annotations

import argparse

from .common import add_out_arg, deprecated


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's best weights (ONNX, TorchScript, safetensors)",
                       description="Write RUN_DIR's best weights as ONNX or TorchScript (input: float32 RGB "
                                   "N x 3 x S x S in [0, 1], normalization inside; output: logits) or as a "
                                   "safetensors state dict, each with a JSON file of classes and preprocessing. "
                                   "An ONNX file is checked with onnxruntime against PyTorch on the run's test set.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "safetensors"])
    add_out_arg(p, "folder that receives model.<ext> and its JSON sidecar (default: RUN_DIR/export)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="ONNX: skip the onnxruntime comparison on the test set")
    p.add_argument("--check-images", type=int, metavar="N", help="ONNX: compare on the first N test images only")
    p.add_argument("--data", metavar="PATH", help="data location for the check, if it moved since training")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from pathlib import Path

    from ..errors import DataError
    from ..export import FORMATS, MIN_AGREEMENT, ExportError, check_onnx, export_run, run_test_images, sidecar
    from ..predict import Predictor, run_tta

    if args.out and Path(args.out).suffix == FORMATS[args.format] and not Path(args.out).is_dir():
        deprecated(f"-o {args.out} (a file)", f"-o DIR, which receives model{FORMATS[args.format]}")
    path = export_run(args.run_dir, args.format, args.out)
    print(f"wrote {path} and {sidecar(path, args.format)}")
    tta = run_tta(args.run_dir)
    print("note: test-time augmentation is not part of the exported model: one view per image"
          + (f"; the run's test accuracy was measured with tta {tta} (its test_acc_no_tta is what this model "
             f"scores; average the logits of the flipped and shifted views to reproduce test_acc)"
             if tta != "none" else ""))
    if args.format != "onnx" or not args.check:
        return 0
    try:
        images = run_test_images(args.run_dir, args.data, args.check_images)
    except DataError as e:
        print(f"not checked: the run's test set cannot be loaded ({e}); pass --data PATH", file=sys.stderr)
        return 0
    res = check_onnx(path, Predictor.from_run(args.run_dir, device="cpu"), images)
    print(f"onnxruntime vs PyTorch on {res['images']} test images: labels agree on {res['agreement']:.2%}, "
          f"largest probability difference {res['max_prob_diff']:.2e}")
    if res["agreement"] < MIN_AGREEMENT:
        raise ExportError(f"the ONNX file agrees with PyTorch on only {res['agreement']:.2%} of labels "
                          f"(at least {MIN_AGREEMENT:.1%} expected); {path} is kept for inspection")
    return 0
