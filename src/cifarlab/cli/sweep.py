"""``cifarlab sweep``: run a W&B-format sweep on Optuna (run), narrow it (narrow), report it (report),
and print its best config (best)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..trackers import TRACKER_NAMES
from .common import add_config_args, add_out_arg, config_overrides, deprecated


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
    add_out_arg(r, "folder that receives the sweep directory OUT/STUDY (default: sweeps)", default="sweeps")
    r.add_argument("--time", metavar="DURATION", help="total wall-clock budget of the sweep (90s, 10m, 2h), shared "
                   "out: each trial trains to train.time_budget = DURATION / ceil(trials / workers) (default: the "
                   "file's cifarlab.time, else none)")
    r.add_argument("--heartbeat", type=int, default=10, metavar="SECONDS",
                   help="heartbeat interval; a trial silent for 3 intervals is failed and queued again (default 10)")
    r.add_argument("--sampler-seed", type=int, metavar="N", help="seed of the samplers (default: random); "
                   "--seed is the trials' train.seed, as in cifarlab train")
    r.add_argument("--tracker", action="append", default=[], choices=TRACKER_NAMES,
                   help="also log every trial to an experiment tracker (repeatable): wandb (offline, one group "
                        "per study; upload later with wandb sync), mlflow, tensorboard (TRIAL_DIR/tensorboard)")
    r.add_argument("--wandb", action="store_true", help=argparse.SUPPRESS)  # deprecated: --tracker wandb
    r.add_argument("--new-study", action="store_true", help="when the study exists with another base config "
                   "(--config, --set, --epochs ...), start a new one (STUDY-2, STUDY-3, ...) instead of refusing")
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
            add_out_arg(q, "folder that receives narrow-topN.yaml (default: STUDY)")
        elif name == "report":
            add_out_arg(q, "folder that receives trials.csv and the charts (default: STUDY/report)")
        else:
            add_out_arg(q, "folder that receives best.yaml (default: print the YAML)")
        if name != "report":  # deprecated: the file to write (-o FILE.yaml still works, with a note)
            q.add_argument("--output", metavar="FILE", help=argparse.SUPPRESS)
        q.set_defaults(func={"narrow": narrow_cmd, "report": report_cmd, "best": best_cmd}[name])

    d = verbs.add_parser("dashboard", help="open the sweep's storage in optuna-dashboard (live view of its trials)",
                         description="Serve optuna-dashboard on the sweep's storage, on 127.0.0.1 only "
                                     "(needs pip install 'cifarlab[dashboard]').")
    d.add_argument("study", metavar="DIR", help="sweep directory (sweeps/NAME), or a study name with --storage")
    d.add_argument("--storage", metavar="URL", help="storage URL (default: the one recorded in the directory)")
    d.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080)")
    d.set_defaults(func=dashboard_cmd)


def run_cmd(args: argparse.Namespace) -> int:
    from ..sweep import run_sweep

    trackers = list(args.tracker)
    if args.wandb:
        deprecated("--wandb", "--tracker wandb")
        trackers.append("wandb")
    summary = run_sweep(args.sweep_file, trials=args.trials, workers=args.workers, storage=args.storage,
                        study=args.study, out=args.out, config=args.config, overrides=config_overrides(args),
                        heartbeat=args.heartbeat, seed=args.sampler_seed, trackers=trackers,
                        new_study=args.new_study, time=args.time)
    print(f"next: cifarlab sweep report {summary['sweep_dir']}")
    return 0


def narrow_cmd(args: argparse.Namespace) -> int:
    from ..sweep import narrow, open_study

    s = open_study(args.study, args.storage)
    text, _ = narrow(s, args.top)
    out = _output_file(args, f"narrow-top{args.top}.yaml") or (s.sweep_dir or Path(".")) / f"narrow-top{args.top}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    from ..io import atomic_write_text

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
    out = _output_file(args, "best.yaml")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        from ..io import atomic_write_text

        atomic_write_text(out, text)
        print(out)
    else:
        sys.stdout.write(text)
    return 0


def _output_file(args: argparse.Namespace, name: str) -> Path | None:
    """``-o DIR`` -> DIR/name; the old ``-o FILE.yaml`` / ``--output FILE`` still name the file, with a note."""
    if args.output:
        deprecated("--output FILE", "-o DIR")
        return Path(args.output)
    if args.out is None:
        return None
    if Path(args.out).suffix in (".yaml", ".yml") and not Path(args.out).is_dir():
        deprecated(f"-o {args.out} (a file)", f"-o DIR, which receives {name}")
        return Path(args.out)
    return Path(args.out) / name


def dashboard_cmd(args: argparse.Namespace) -> int:
    import json

    from ..errors import CifarlabError

    try:
        import optuna_dashboard
    except ImportError:
        raise CifarlabError("sweep dashboard needs optuna-dashboard: pip install 'cifarlab[dashboard]'") from None
    ref = Path(args.study)
    if args.storage:
        url = args.storage
    elif (ref / "study.json").is_file():
        url = json.loads((ref / "study.json").read_text())["storage"]
    else:
        raise CifarlabError(f"{ref} is not a sweep directory (no study.json); give sweeps/NAME or --storage URL")
    from ..sweep.storage import open_storage, redact

    store = open_storage(url)
    print(f"optuna-dashboard on http://127.0.0.1:{args.port}/dashboard (storage {redact(url)}); Ctrl-C stops it",
          flush=True)
    optuna_dashboard.run_server(store, host="127.0.0.1", port=args.port)  # loopback only: no auth in the dashboard
    return 0
