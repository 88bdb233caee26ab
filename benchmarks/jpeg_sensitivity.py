"""How much does JPEG compression of the images cost a recipe's accuracy? A proxy measurement.

    python benchmarks/jpeg_sensitivity.py CONFIG [--qualities 50 30] [--no-control] [--data PATH]
                                          [--set section.key=value ...]

The development copy of CIFAR-10 is stored as JPEG at quality 75 with 4:2:0 chroma subsampling, and the
original lossless archive is out of reach offline, so the cost of that first compression cannot be measured
directly. This measures the next best thing: the same recipe, in the same process, trained and tested on
the images as stored and on the images compressed once more (each split re-encoded through Pillow's JPEG
encoder at each quality, 4:2:0, then decoded), so each row differs from the first only by one more JPEG
pass, and the accuracy lost per pass, against the pixels it changed, shows how much the recipe feels JPEG
at all. Quality 95 with 4:4:4 chroma serves as the control (a near-lossless pass). A second pass at the
stored quality 75 is nearly idempotent (the same quantization tables land on the same coefficients: it
moves the pixels by ~0.16 / 255 on this copy), so lower qualities are the informative ones.

Printed: per condition the final test accuracy and its difference from the stored images'; the last line is
JSON: {"config": PATH, "epochs": E, "acc": {"stored": A, "q75": A, ...}, "drop_points": {"q75": D, ...}}.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifarlab.config import load_config
from cifarlab.data import ImageData, load_data
from cifarlab.errors import CifarlabError


def reencode(x: torch.Tensor, quality: int, subsampling: int = 2) -> torch.Tensor:
    """uint8 images (N, 3, H, W) through one JPEG encode and decode (Pillow; subsampling 2 = 4:2:0, 0 = 4:4:4)."""
    out = np.empty(tuple(x.shape), dtype=np.uint8)
    arr = x.permute(0, 2, 3, 1).contiguous().numpy()
    for i in range(len(arr)):
        buf = io.BytesIO()
        Image.fromarray(arr[i]).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("RGB")).transpose(2, 0, 1)
    return torch.from_numpy(out)


def reencoded(data: ImageData, quality: int, subsampling: int = 2) -> ImageData:
    """``data`` with every split passed through JPEG once more (labels, classes, normalization unchanged)."""
    return dataclasses.replace(data, train_x=reencode(data.train_x, quality, subsampling),
                               val_x=reencode(data.val_x, quality, subsampling),
                               test_x=reencode(data.test_x, quality, subsampling))


def _time_to_accuracy():
    path = Path(__file__).with_name("time_to_accuracy.py")
    spec = importlib.util.spec_from_file_location("time_to_accuracy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="run config YAML, e.g. configs/speedrun.yaml")
    p.add_argument("--qualities", type=int, nargs="+", default=[50, 30], metavar="Q",
                   help="JPEG qualities of the extra pass, 4:2:0 (default 50 30); the q95 4:4:4 control is added")
    p.add_argument("--no-control", action="store_true", help="skip the quality-95 4:4:4 control")
    p.add_argument("--data", metavar="PATH", help="data path (short for --set data.path=PATH)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    if any(not 1 <= q <= 100 for q in args.qualities):
        p.error("--qualities must be in 1..100")
    cfg = load_config(args.config, list(args.overrides) + ([f"data.path={args.data}"] if args.data else []))
    tta = _time_to_accuracy()
    data = load_data(cfg.data)
    conditions = [("stored", None, None)] + ([] if args.no_control else [("q95-444", 95, 0)])
    conditions += [(f"q{q}", q, 2) for q in args.qualities]
    print(f"{args.config}: {cfg.model.name}, {len(data.train_x)} train / {len(data.test_x)} test images, "
          f"{cfg.train.epochs} epochs, conditions {', '.join(c[0] for c in conditions)}", flush=True)
    acc = {}
    with tempfile.TemporaryDirectory(prefix="jpeg-") as tmp:
        for name, quality, subsampling in conditions:
            d = data if quality is None else reencoded(data, quality, subsampling)
            if quality is not None:
                mad = (d.test_x.float() - data.test_x.float()).abs().mean().item()
                print(f"{name}: mean absolute pixel change of the extra pass {mad:.2f} / 255", flush=True)
            res = tta.run_once(cfg, d, Path(tmp), name, target=1.0, budget_minutes=None,
                               eval_every=cfg.train.epochs, log=lambda s: print(f"  {s}", flush=True))
            acc[name] = round(res["final_test_acc"], 4)
            print(f"{name}: test acc {acc[name]:.4f} ({res['train_minutes']:.1f} training minutes)", flush=True)
    drop = {k: round(100 * (acc["stored"] - v), 2) for k, v in acc.items() if k != "stored"}
    for k, v in drop.items():
        print(f"one more JPEG pass, {k}: {v:+.2f} points lost")
    out = {"config": args.config, "epochs": cfg.train.epochs, "acc": acc, "drop_points": drop}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    try:
        main()
    except CifarlabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
