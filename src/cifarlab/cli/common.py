"""Flags shared by several verbs."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="YAML", help="run config (e.g. configs/cnn.yaml); defaults if omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=0.001 (repeatable)")
    p.add_argument("--data", metavar="PATH", help="image folder, cifar-10-python.tar.gz or cifar-10-batches-py/ "
                   "(default: $CIFARLAB_DATA, else download into $CIFARLAB_CACHE)")
    p.add_argument("--epochs", type=int, metavar="N", help="short for --set train.epochs=N")


def config_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.append(f"data.path={args.data}")
    if getattr(args, "epochs", None) is not None:
        overrides.append(f"train.epochs={args.epochs}")
    return overrides
