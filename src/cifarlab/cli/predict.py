"""``cifarlab predict RUN_DIR IMAGE_OR_FOLDER...``: top-k classes of new images."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from .common import DEVICE_HELP


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify new images with a trained run",
                       description="Print the top-k classes and probabilities of each image (any format Pillow "
                                   "reads, any size, grayscale or RGBA), using RUN_DIR's best weights and "
                                   "preprocessing. Folders are searched recursively and processed in batches.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or an exported .safetensors file)")
    p.add_argument("images", metavar="IMAGE_OR_FOLDER", nargs="+")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="classes per image (default: 3)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table", help="output format")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per forward pass")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--tta", choices=["none", "flip", "flip_translate"], help="test-time augmentation (default: "
                   "what cifarlab evaluate used for the run, so the predictions match its accuracy)")
    p.add_argument("--explain", metavar="DIR", help="also write one PNG per image into DIR (named after the image): "
                   "the image and, beside it, its Grad-CAM heatmap for the predicted class (where the model found "
                   "the evidence for it); Captum computes it when installed (pip install 'cifarlab[explain]')")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import CifarlabError
    from ..predict import Predictor, expand_inputs

    if args.batch_size < 1:
        raise CifarlabError(f"--batch-size must be >= 1, got {args.batch_size}")
    from ..evaluation.evaluate import tta_label

    predictor = Predictor.from_run(args.run_dir, device=args.device, tta=args.tta)
    if args.explain:
        predictor.check_explainable()  # before any output: a model with no layer to explain is a one-line error
    print(f"predict: {tta_label(predictor.tta)}" + (" (as cifarlab evaluate; --tta none for one view)"
          if args.tta is None and predictor.tta != "none" else ""), file=sys.stderr)
    items = expand_inputs(args.images)
    preds = predictor.iter_predict(items, top_k=args.top_k, batch_size=args.batch_size)
    done: list = []  # the predictions written, for --explain's overlays
    try:
        _write(_keep(preds, done), args.format, sys.stdout)
    except BrokenPipeError:  # `cifarlab predict ... | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        preds.close()  # closes the progress bar
    if args.explain:
        from ..predict import write_overlays

        files = write_overlays(predictor, done, items[:len(done)], args.explain, batch_size=min(args.batch_size, 64))
        print(f"predict: {len(files)} Grad-CAM overlays (image | heatmap of the predicted class) in {args.explain}",
              file=sys.stderr)
    return 0


def _keep(preds, done: list):
    for p in preds:
        done.append(p)
        yield p


def _write(preds, fmt: str, out) -> None:
    if fmt == "json":
        json.dump([p.to_dict() for p in preds], out, indent=2)
        out.write("\n")
    elif fmt == "csv":
        w = csv.writer(out)
        w.writerow(["image", "rank", "label", "prob"])
        for p in preds:
            for r, (lab, pr) in enumerate(zip(p.labels, p.probs), 1):
                w.writerow([p.source, r, lab, f"{pr:.6f}"])
    else:
        for p in preds:
            out.write(f"{p.source}\n")
            for lab, pr in zip(p.labels, p.probs):
                out.write(f"  {lab:<14}{pr:>8.4f}\n")
