"""``cifarlab export RUN_DIR --format onnx|torchscript|safetensors [--int8]``: the best weights for other runtimes."""

from __future__ import annotations

import argparse

from .common import add_out_arg, deprecated


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's best weights (ONNX, int8 ONNX, TorchScript, safetensors)",
                       description="Write RUN_DIR's best weights as ONNX or TorchScript (input: float32 RGB "
                                   "N x 3 x S x S in [0, 1], normalization inside; output: logits) or as a "
                                   "safetensors state dict, each with a JSON file of classes and preprocessing. "
                                   "An ONNX file is checked with onnxruntime against PyTorch on the run's test "
                                   "set; --int8 adds a quantized copy and its test accuracy beside the fp32 file's.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "safetensors"])
    add_out_arg(p, "folder that receives model.<ext> and its JSON sidecar (default: RUN_DIR/export)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="ONNX: skip the onnxruntime comparison on the test set")
    p.add_argument("--check-images", type=int, metavar="N",
                   help="ONNX: compare on the first N test images only (--int8: score on N drawn at random)")
    p.add_argument("--data", metavar="PATH", help="data location for the check, if it moved since training")
    p.add_argument("--int8", action="store_true",
                   help="ONNX: also write model.int8.onnx, statically quantized (QDQ, int8 weights per channel) and "
                        "calibrated on the run's training images; its test accuracy and the fp32 file's go into "
                        "its JSON sidecar")
    p.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                   help="--int8: warn when int8 loses more than this many points of test accuracy (default: 1.0)")
    p.add_argument("--calibration-images", type=int, default=None, metavar="N",
                   help="--int8: training images that calibrate the activation ranges (default: 512)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from pathlib import Path

    from ..errors import DataError
    from ..export import (CALIBRATION_IMAGES, FORMATS, MAX_DROP, MIN_AGREEMENT, ExportError, check_onnx, export_int8,
                          export_run, require, run_data, run_test_images, sidecar)
    from ..predict import Predictor, run_tta

    if args.int8 and args.format != "onnx":
        raise ExportError(f"--int8 quantizes an ONNX file: use --format onnx (not {args.format})")
    if not args.int8 and (args.max_drop is not None or args.calibration_images is not None):
        raise ExportError("--max-drop and --calibration-images go with --int8")
    max_drop = MAX_DROP if args.max_drop is None else args.max_drop
    n_calib = CALIBRATION_IMAGES if args.calibration_images is None else args.calibration_images
    if max_drop < 0 or n_calib < 1:
        raise ExportError(f"--max-drop must be >= 0 and --calibration-images >= 1, got {max_drop} and {n_calib}")
    if args.int8:
        require(["onnxruntime"], "int8 export")
    if args.out and Path(args.out).suffix == FORMATS[args.format] and not Path(args.out).is_dir():
        deprecated(f"-o {args.out} (a file)", f"-o DIR, which receives model{FORMATS[args.format]}")
    path = export_run(args.run_dir, args.format, args.out)
    print(f"wrote {path} and {sidecar(path, args.format)}")
    tta = run_tta(args.run_dir)
    print("note: test-time augmentation is not part of the exported model: one view per image"
          + (f"; the run's test accuracy was measured with tta {tta} (its test_acc_no_tta is what this model "
             f"scores; average the logits of the flipped and shifted views to reproduce test_acc)"
             if tta != "none" else ""))
    if args.format != "onnx" or not (args.check or args.int8):
        return 0
    try:  # int8 needs the training images too (calibration): load the whole data set once
        data = run_data(args.run_dir, args.data) if args.int8 else None
        images = data.test_x[:args.check_images or len(data.test_x)] if data is not None else \
            run_test_images(args.run_dir, args.data, args.check_images)
    except DataError as e:
        if args.int8:
            raise ExportError(f"--int8 calibrates on the run's training images, which cannot be loaded ({e}); "
                              f"pass --data PATH") from None
        print(f"not checked: the run's test set cannot be loaded ({e}); pass --data PATH", file=sys.stderr)
        return 0
    if args.check:
        res = check_onnx(path, Predictor.from_run(args.run_dir, device="cpu"), images)
        print(f"onnxruntime vs PyTorch on {res['images']} test images: labels agree on {res['agreement']:.2%}, "
              f"largest probability difference {res['max_prob_diff']:.2e}")
        if res["agreement"] < MIN_AGREEMENT:
            raise ExportError(f"the ONNX file agrees with PyTorch on only {res['agreement']:.2%} of labels "
                              f"(at least {MIN_AGREEMENT:.1%} expected); {path} is kept for inspection")
    if args.int8:
        path8, acc = export_int8(args.run_dir, path, data, calibration=n_calib, test_images=args.check_images)
        print(f"wrote {path8} and {sidecar(path8, 'onnx')} (int8, calibrated on {min(n_calib, len(data.train_x))} "
              f"training images)")
        print(f"test accuracy on {acc['images']} images, one view: fp32 {acc['fp32']:.4f}, int8 {acc['int8']:.4f} "
              f"({-acc['drop_points']:+.2f} points)")
        if acc["drop_points"] > max_drop:
            print(f"warning: int8 loses {acc['drop_points']:.2f} points of test accuracy, more than --max-drop "
                  f"{max_drop:g}: serve the fp32 {path.name}, or calibrate on more images (--calibration-images)",
                  file=sys.stderr)
    return 0
