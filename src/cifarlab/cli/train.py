"""``cifarlab train``: train a model from a config and write its run directory."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..config import load_config
from ..errors import CifarlabError
from ..trackers import TRACKER_NAMES
from .common import DEVICE_HELP, add_config_args, add_out_arg, config_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model", description="Train a model and write runs/<name>/.")
    add_config_args(p)
    add_out_arg(p, "folder that receives the run directory OUT/NAME (default: runs)")
    p.add_argument("--name", metavar="NAME", help="run directory name (default: <model>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its last checkpoint (or start it from its config.yaml if "
                        "it had none); takes the run's own config: --epochs may add epochs, --set may change "
                        "only how it runs (device, precision, threads, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--seeds", type=int, metavar="N", help="train N seeds (train.seed = base + K) as a group "
                   "OUT/NAME/seed-K/; running the same command again skips finished seeds and resumes the rest")
    p.add_argument("--device", help=f"{DEVICE_HELP}; short for --set train.device=...")
    p.add_argument("--precision", help="auto | fp32 | bf16 | fp16 (short for --set train.precision=...)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images and count them")
    p.add_argument("--checkpoint-every-steps", type=int, metavar="N", help="also checkpoint every N steps")
    p.add_argument("--time", metavar="DURATION", help="train to a time budget (90s, 10m, 1.5h): the steps, epochs "
                   "and schedule are sized to it from the measured step cost (data decoding excluded); short "
                   "for --set train.time_budget=...")
    p.add_argument("--nan-policy", choices=["stop", "skip-batch"], help="what a non-finite loss does")
    p.add_argument("--evaluate", action="store_true", help="evaluate the best weights on the test set at the end")
    p.add_argument("--report", action="store_true", help="evaluate and write the HTML report at the end")
    p.add_argument("--tracker", action="append", default=[], choices=TRACKER_NAMES,
                   help="also log to an experiment tracker (repeatable): wandb (offline unless logged in), "
                        "mlflow (sqlite:///OUT/mlflow.db or $MLFLOW_TRACKING_URI), tensorboard (RUN_DIR/tensorboard)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import distributed as dist
    from ..trackers import Trackers

    trackers = Trackers(args.tracker)  # a missing extra fails here, before any training
    try:
        with trackers:
            _run(args, trackers)
    finally:
        dist.cleanup()  # under torchrun: every rank leaves the process group
    return 0


def _run(args: argparse.Namespace, trackers) -> None:
    from ..train import distributed as dist
    from ..train import fit

    overrides = config_overrides(args)
    for flag, key in (("device", "train.device"), ("precision", "train.precision"),
                      ("checkpoint_every_steps", "train.checkpoint_every_steps"), ("nan_policy", "train.nan_policy"),
                      ("time", "train.time_budget")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.skip_bad_images:
        overrides.append("data.skip_bad_images=true")
    if args.seeds is not None or (args.resume and (Path(args.resume) / "group.json").is_file()):
        return _run_group(args, overrides, trackers)
    if args.resume:
        from ..train.resume import resume_config

        run_dir = Path(args.resume)
        # These name another run than RUN_DIR's own: refused rather than ignored (issue 20).
        given = [flag for flag, value in (("--config", args.config), ("--out", args.out), ("--name", args.name),
                                          ("--overwrite", args.overwrite)) if value]
        if given:
            raise CifarlabError(f"--resume {run_dir} continues that run with its own config.yaml, folder and name: "
                                f"drop {', '.join(given)} (or start a new run without --resume)")
        cfg, notes = resume_config(run_dir, overrides)
        if os.environ.get("RANK", "0") == "0":  # before fit, torchrun's process group is not up yet
            for note in notes:
                print(f"resume: {note}")
        out, name = run_dir.parent, run_dir.name
    else:
        cfg = load_config(args.config, overrides)
        out, name = Path(args.out or "runs"), args.name
    summary = fit(cfg, out, name, resume=bool(args.resume), overwrite=args.overwrite, trackers=trackers)
    if not dist.is_main():  # under torchrun, rank 0 alone evaluates and writes the report
        return
    if args.evaluate or args.report:
        from ..evaluation import evaluate_run, format_table

        res = evaluate_run(summary["run_dir"])
        print(format_table(res))
    if args.report:
        from ..report import make_report

        make_report(summary["run_dir"])


def _run_group(args: argparse.Namespace, overrides: list[str], trackers) -> None:
    """``--seeds N`` (or ``--resume GROUP_DIR``): train or finish a seeds group (cifarlab.train.group)."""
    import json

    from ..train import distributed as dist
    from ..train.group import train_group

    if len(trackers):
        raise CifarlabError("--tracker is not supported with --seeds (one tracker run per process)")
    if dist.world_size() > 1:
        raise CifarlabError("--seeds runs its seeds one after another in one process; start it without torchrun")
    if args.resume:
        group_dir = Path(args.resume)
        info = json.loads((group_dir / "group.json").read_text())
        from ..config import RunConfig

        cfg = RunConfig.from_dict(info["config"])
        cfg.apply_overrides(overrides)
        cfg.validate()
        out, name, seeds = group_dir.parent, group_dir.name, args.seeds or int(info["seeds"])
    else:
        cfg = load_config(args.config, overrides)
        if not args.name:
            raise CifarlabError("--seeds needs --name NAME (the group directory OUT/NAME, and what a rerun continues)")
        out, name, seeds = Path(args.out or "runs"), args.name, args.seeds
    train_group(cfg, out, name, seeds, overwrite=args.overwrite, evaluate=args.evaluate or args.report)
    if args.report:
        from ..report import make_report

        make_report(out / name)
