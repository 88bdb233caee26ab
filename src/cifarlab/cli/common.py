"""Flags shared by several verbs.

One meaning per flag name, on every verb that has it:

* ``-c/--config YAML``, ``--set SECTION.KEY=VALUE``, ``--data PATH``: the run config and the data;
* ``--model``, ``--epochs``, ``--lr``, ``--batch-size``, ``--seed``: short for their ``--set`` (verbs that train);
* ``-o/--out DIR``: the folder that receives what the verb writes (created if missing). ``train`` and
  ``sweep run`` write a run / sweep directory into it, the other verbs their files;
* ``--tracker NAME``: also log to an experiment tracker (repeatable);
* ``--device``: auto | cpu | cuda | cuda:N | mps.
"""

from __future__ import annotations

import argparse

DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps (auto: CUDA, else Apple's MPS, else the CPU)"

# Short flags of the verbs that train: (attribute, config key), applied after --set.
SHORT_FLAGS = [("epochs", "train.epochs"), ("lr", "optim.lr"), ("batch_size", "train.batch_size"),
               ("seed", "train.seed")]


def add_config_args(p: argparse.ArgumentParser, training: bool = True) -> None:
    """The config flags; ``training=False`` (``cifarlab data``) leaves out the ones only training reads."""
    p.add_argument("--config", "-c", metavar="YAML", help="run config (e.g. configs/cnn.yaml); defaults if omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=0.001 (repeatable)")
    p.add_argument("--data", metavar="PATH_OR_NAME", help="a data set name (cifar10, cifar100, cifar100-coarse, mnist, "
                   "fashion-mnist, svhn, stl10: downloaded into $CIFARLAB_CACHE), an image folder (ROOT/<class>/* or "
                   "ROOT/train|val|test/<class>/*), or a named set's official archive or extracted folder under any "
                   "name (cifar-10-python.tar.gz, cifar-100-python/, a folder of MNIST's IDX files ...) "
                   "(default: $CIFARLAB_DATA, else cifar10)")
    p.add_argument("--labels", metavar="CSV", help="a labels file (path,label[,split] columns) for the images "
                   "under --data ROOT; with an official archive the label set: coarse (CIFAR-100's 20 "
                   "superclasses), mnist or fashion-mnist (IDX files' class names); short for --set data.labels=...")
    if not training:
        return
    p.add_argument("--model", metavar="NAME", help="short for --set model.name=NAME, applied before --set: the "
                   "model section keeps only NAME's hyperparameters (cifarlab models lists them)")
    p.add_argument("--epochs", type=int, metavar="N", help="short for --set train.epochs=N (an absolute warm-up "
                   "is rescaled to the same share of the run, with a note)")
    p.add_argument("--lr", type=float, metavar="LR", help="short for --set optim.lr=LR (the peak learning rate)")
    p.add_argument("--batch-size", type=int, metavar="N", help="short for --set train.batch_size=N (per process)")
    p.add_argument("--seed", type=int, metavar="N", help="short for --set train.seed=N")


def add_out_arg(p: argparse.ArgumentParser, help: str, default: str | None = None) -> None:
    p.add_argument("-o", "--out", default=default, metavar="DIR", help=help)


def config_overrides(args: argparse.Namespace) -> list[str]:
    model = getattr(args, "model", None)
    overrides = ([f"model.name={model}"] if model else []) + list(args.overrides)
    if getattr(args, "data", None):
        overrides.append(f"data.path={args.data}")
    if getattr(args, "labels", None):
        overrides.append(f"data.labels={args.labels}")
    for attr, key in SHORT_FLAGS:
        if getattr(args, attr, None) is not None:
            overrides.append(f"{key}={getattr(args, attr)}")
    return overrides


def deprecated(old: str, new: str) -> None:
    from ..config import notice

    notice(f"{old} is deprecated: use {new}")
