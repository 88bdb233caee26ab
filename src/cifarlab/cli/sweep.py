"""``cifarlab sweep``: run a W&B-format sweep on Optuna (run), narrow it (narrow), report it (report),
and print its best config (best)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_config_args, config_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="hyperparameter sweeps (W&B sweep files, run offline on Optuna)",
                       description="Hyperparameter sweeps in W&B's sweep format, run on Optuna with no server.")
    verbs = p.add_subparsers(dest="sweep_verb", metavar="ACTION", parser_class=type(p))
    verbs.required = True

    r = verbs.add_parser("run", help="run or continue a sweep", description="Run (or continue) a sweep: trials are "
                         "training runs under OUT/STUDY/trials/; the budget counts across workers and reruns.")
    r.add_argument("sweep_file", metavar="SWEEP.yaml", help="sweep file in W&B's format (configs/sweeps/*.yaml)")
    r.add_argument("--trials", type=int, metavar="N", help="total trials of the study (default: run_cap of the file)")
    r.add_argument("--workers", type=int, default=1, metavar="K", help="worker processes on this machine (default 1)")
    r.add_argument("--storage", metavar="URL", help="SQLAlchemy URL shared by workers on several machines, e.g. "
                   "postgresql://user@host/db (default: SQLite file OUT/STUDY/study.db)")
    r.add_argument("--study", metavar="NAME", help="study name (default: the file's name key, else its file name)")
    r.add_argument("--out", default="sweeps", metavar="DIR", help="folder of sweep directories (default: sweeps)")
    r.add_argument("--heartbeat", type=int, default=10, metavar="SECONDS",
                   help="heartbeat interval; a trial silent for 3 intervals is failed and queued again (default 10)")
    r.add_argument("--seed", type=int, help="seed of the samplers (default: random)")
    r.add_argument("--wandb", action="store_true", help="also log every trial to W&B in offline mode "
                   "(needs pip install 'cifarlab[wandb]'; upload later with wandb sync)")
    add_config_args(r)
    r.set_defaults(func=run_cmd)

    for name, helptext in (("narrow", "write a second-stage sweep around the best trials"),
                           ("report", "export the trials to CSV and draw charts"),
                           ("best", "print the best trial's run config as YAML")):
        q = verbs.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        q.add_argument("study", metavar="STUDY", help="sweep directory (sweeps/NAME), or a study name with --storage")
        q.add_argument("--storage", metavar="URL", help="storage URL (default: the one recorded in the directory)")
        if name == "narrow":
            q.add_argument("--top", type=int, required=True, metavar="N", help="cover the N best completed trials")
            q.add_argument("-o", "--output", metavar="FILE", help="file to write (default: STUDY/narrow-topN.yaml)")
        elif name == "report":
            q.add_argument("--out", metavar="DIR", help="output folder (default: STUDY/report)")
        else:
            q.add_argument("-o", "--output", metavar="FILE", help="write the YAML to FILE instead of printing it")
        q.set_defaults(func={"narrow": narrow_cmd, "report": report_cmd, "best": best_cmd}[name])


def run_cmd(args: argparse.Namespace) -> int:
    from ..sweep import run_sweep

    summary = run_sweep(args.sweep_file, trials=args.trials, workers=args.workers, storage=args.storage,
                        study=args.study, out=args.out, config=args.config, overrides=config_overrides(args),
                        heartbeat=args.heartbeat, seed=args.seed, wandb=args.wandb)
    print(f"next: cifarlab sweep report {summary['sweep_dir']}")
    return 0


def narrow_cmd(args: argparse.Namespace) -> int:
    from ..sweep import narrow, open_study

    s = open_study(args.study, args.storage)
    text, _ = narrow(s, args.top)
    out = Path(args.output) if args.output else (s.sweep_dir or Path(".")) / f"narrow-top{args.top}.yaml"
    from ..train.checkpoint import atomic_write_text

    atomic_write_text(out, text)
    print(out)
    return 0


def report_cmd(args: argparse.Namespace) -> int:
    from ..sweep import open_study
    from ..sweep.charts import write_report

    files = write_report(open_study(args.study, args.storage), args.out)
    for path in files.values():
        print(path)
    return 0


def best_cmd(args: argparse.Namespace) -> int:
    from ..sweep import best_config_yaml, open_study

    text = best_config_yaml(open_study(args.study, args.storage))
    if args.output:
        from ..train.checkpoint import atomic_write_text

        atomic_write_text(args.output, text)
        print(args.output)
    else:
        sys.stdout.write(text)
    return 0

