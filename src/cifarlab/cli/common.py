"""Flags shared by several verbs."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="YAML", help="run config (e.g. configs/cnn.yaml); defaults if omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=0.001 (repeatable)")
    p.add_argument("--data", metavar="PATH_OR_NAME", help="a data set name (cifar10, cifar100, cifar100-coarse, mnist, "
                   "fashion-mnist, svhn, stl10: downloaded into $CIFARLAB_CACHE), an image folder (ROOT/<class>/* or "
                   "ROOT/train|val|test/<class>/*), cifar-10-python.tar.gz or cifar-10-batches-py/ "
                   "(default: $CIFARLAB_DATA, else cifar10)")
    p.add_argument("--labels", metavar="CSV", help="a labels file (path,label[,split] columns) for the images "
                   "under --data ROOT; short for --set data.labels=CSV")
    p.add_argument("--epochs", type=int, metavar="N", help="short for --set train.epochs=N")


def config_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.append(f"data.path={args.data}")
    if getattr(args, "labels", None):
        overrides.append(f"data.labels={args.labels}")
    if getattr(args, "epochs", None) is not None:
        overrides.append(f"train.epochs={args.epochs}")
    return overrides
