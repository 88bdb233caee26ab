"""``cifarlab lr-find``: the learning-rate range test on a run config; prints a suggested ``optim.lr``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lr-find", help="learning-rate range test: suggest optim.lr for a config",
                       description="Smith's learning-rate range test (as fastai's lr_find): train the config's "
                                   "model for a few hundred steps with an exponentially growing lr, stop when the "
                                   "loss diverges, write the loss curve and print a suggested optim.lr. Nothing "
                                   "is trained for real: the model and optimizer are left as built.")
    from .common import add_config_args

    add_config_args(p)
    p.add_argument("--start-lr", type=float, default=1e-7, metavar="LR", help="first lr (default: 1e-7)")
    p.add_argument("--end-lr", type=float, default=10.0, metavar="LR", help="last lr (default: 10)")
    p.add_argument("--steps", type=int, default=200, metavar="N", help="steps of the sweep (default: 200)")
    from .common import add_out_arg

    add_out_arg(p, "folder that receives lr_find.png and lr_find.csv (default: the current folder)", default=".")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (short for --set train.device=...)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..errors import ConfigError
    from ..io import atomic_write_text
    from ..train.lr_finder import lr_find, plot
    from .common import config_overrides

    if not (0 < args.start_lr < args.end_lr):
        raise ConfigError(f"--start-lr {args.start_lr} and --end-lr {args.end_lr}: need 0 < start < end")
    if args.steps < 10:
        raise ConfigError(f"--steps {args.steps}: need at least 10 steps")
    overrides = config_overrides(args) + ([f"train.device={args.device}"] if args.device else [])
    cfg = load_config(args.config, overrides)
    res = lr_find(cfg, start_lr=args.start_lr, end_lr=args.end_lr, num_it=args.steps, log=print)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / "lr_find.png"
    plot(res, out, title=f"lr range test: {cfg.model.name}" + (f" ({args.config})" if args.config else ""))
    atomic_write_text(out.with_suffix(".csv"), res.csv_text())
    stop = (f"stopped at step {len(res.lrs)}: the loss diverged at lr {res.lrs[-1]:.2e}" if res.diverged
            else "no divergence: try a larger --end-lr")
    print(f"lr-find: {len(res.lrs)} of {res.num_it} steps, lr {args.start_lr:.1e} -> {args.end_lr:.1e} ({stop})")
    s = res.suggestions
    print(f"suggested optim.lr: {res.suggestion:.2e} (valley; minimum/10: {s['minimum']:.2e}, "
          f"steepest: {s['steep']:.2e})")
    print(f"plot: {out}  curve: {out.with_suffix('.csv')}")
    return 0
