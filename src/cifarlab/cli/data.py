"""``cifarlab data``: the data set at a glance (class counts, normalization, sample and augmentation grids)."""

from __future__ import annotations

import argparse

from .common import add_config_args, add_out_arg, config_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="show the data set: class counts, normalization, sample images",
                       description="Images per class in each split, the normalization statistics of the training "
                                   "split and a grid of the first training images; with --augment also the same "
                                   "images after the configured augmentation. Writes PNGs, data.json and "
                                   "data.html to --out.")
    add_config_args(p, training=False)  # no --epochs, --lr ...: nothing here trains
    p.add_argument("--augment", action="store_true", help="also draw the configured augmentation, several times "
                   "per image (use --config configs/cnn.yaml or --set data.augment_p=... to choose it)")
    p.add_argument("--draws", type=int, default=6, metavar="N", help="augmented draws per image (default: 6)")
    add_out_arg(p, "folder that receives the figures, data.json and data.html (default: data-overview)",
                default="data-overview")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..errors import ConfigError
    from ..report import data_overview

    if args.draws < 1:
        raise ConfigError(f"--draws must be >= 1, got {args.draws}")
    cfg = load_config(args.config, config_overrides(args))
    info = data_overview(cfg, args.out, augment=args.augment, draws=args.draws)
    splits = list(info["counts"])
    print(f"source: {info['source']} ({len(info['classes'])} classes, {info['image_size']}x{info['image_size']})")
    if info.get("layout"):
        print(f"layout: {info['layout']}")
    if info.get("carved"):
        print("carved from the training images (seeded, stratified): "
              + ", ".join("validation" if s == "val" else s for s in info["carved"]))
    for key, what in (("exclude", "excluded"), ("relabel", "relabelled")):
        if key in info.get("edits", {}):
            print(f"data.{key}: {info['edits'][key]['file']} ({info['edits'][key]['images']} images {what})")
    print(f"{'class':<14}" + "".join(f"{s:>12}" for s in splits))
    for i, c in enumerate(info["classes"]):
        print(f"{c:<14}" + "".join(f"{info['counts'][s][i]:>12}" for s in splits))
    print(f"{'total':<14}" + "".join(f"{info['totals'][s]:>12}" for s in splits))
    print("mean (RGB): " + ", ".join(f"{v:.4f}" for v in info["mean"]))
    print("std  (RGB): " + ", ".join(f"{v:.4f}" for v in info["std"]))
    print(f"augmentation: {info['augmentation']}")
    print(f"wrote {info['html']} (figures and data.json beside it)")
    return 0
