"""``cifarlab study STUDY.yaml``: sweeps, narrowing, best config, seeds, evaluation and one report, resumable."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="run a whole study (sweeps, seeds, evaluation, report) as one resumable command",
                       description="For every model of STUDY.yaml: a stage-1 sweep, a stage-2 sweep narrowed around "
                                   "its top trials, the best configuration trained with N seeds, the test set; then "
                                   "one study report (OUT/NAME/report/study.html). Kill it and run it again: finished "
                                   "stages and trials are reused (docs/study.md).")
    p.add_argument("study_file", metavar="STUDY.yaml", help="study file (configs/studies/*.yaml)")
    p.add_argument("-o", "--out", metavar="DIR", help="folder of study directories (default: the file's out, else studies)")
    p.add_argument("--storage", metavar="URL", help="SQLAlchemy URL for every sweep of the study and its final seeds, "
                   "shared by machines (e.g. postgresql://user@host/db; default: a SQLite file per sweep)")
    p.add_argument("--workers", type=int, default=1, metavar="K", help="sweep worker processes (default 1)")
    p.add_argument("--heartbeat", type=int, metavar="SECONDS", help="sweep heartbeat interval (default 10)")
    p.add_argument("--sampler-seed", type=int, default=0, help="seed of the sweeps' samplers (default 0), as in "
                   "sweep run")
    p.add_argument("--time", metavar="DURATION", help="total wall-clock budget of the study (30m, 6h), shared out "
                   "over its runs as train.time_budget (default: the file's time, else none; docs/study.md)")
    p.add_argument("--no-report", action="store_true", help="run the stages but do not write the report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..study import run_study

    state = run_study(args.study_file, out=args.out, storage=args.storage, workers=args.workers,
                      heartbeat=args.heartbeat, seed=args.sampler_seed, report=not args.no_report,
                      time=args.time)
    if state.get("report"):
        print(f"wrote {state['report']}")
    return 0
