"""``cifarlab audit``: label issues, duplicates and leaks, odd images of a data set (docs/audit.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_config_args, add_out_arg, config_overrides

# The shipped recipes the audit trains its folds with by default: the fastest that fits the data.
RECIPES = Path(__file__).resolve().parents[3] / "configs"
# speedrun-cpu.yaml trains 9 epochs; the audit's default trains its folds for 3, so that 4 folds of CIFAR-10
# fit 20 minutes on a 2-core CPU: 4 folds x 30,000 training images x 3 epochs x ~2.1 ms an image (bf16) is
# ~12.6 min, plus ~4 min of decoding, predictions, neighbours and report (cifarlab.audit.run.RESERVE_PER_IMAGE).
# -c / --set / --time override it.
AUDIT_EPOCHS = 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="find label errors, duplicates, train/test leaks and odd images",
                       description="Out-of-sample probabilities for every image by K-fold cross-fitting (each fold "
                                   "an ordinary run under OUT/folds/, reused and resumed on rerun), or, given "
                                   "RUN_DIR, a trained run's model for its validation and test images; then label "
                                   "issues by confident learning, exact and near duplicates (leaks across train and "
                                   "validation/test first) and odd images. Writes label_issues.csv, duplicates.csv, "
                                   "outliers.csv and audit.html to --out.")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a trained run to audit with (no folds trained)")
    add_config_args(p)
    p.add_argument("--folds", type=int, default=4, metavar="K", help="folds of the cross-fitting (default: 4)")
    p.add_argument("--time", metavar="DURATION", help="the whole audit's time (90s, 20m, 1.5h): an estimate for "
                   "decoding, predictions, neighbours and the report is set aside, and each fold trains to an "
                   "equal share of the rest (its train.time_budget)")
    p.add_argument("--storage", metavar="URL", help="share the folds with audits on other machines through this "
                   "SQLAlchemy URL (postgresql://user:pass@host/db, sqlite:///path.db): every process started with "
                   "the same command claims folds no one holds; each fold is trained once; each process, once all "
                   "are done, writes the whole audit to its -o")
    p.add_argument("--heartbeat", type=int, default=10, metavar="SECONDS", help="with --storage: heartbeat "
                   "interval; a fold silent for 3 intervals goes back to the queue (default: 10)")
    p.add_argument("--rank", choices=["self_confidence", "normalized_margin"], default="self_confidence",
                   help="label quality score the issues are ranked by (default: self_confidence)")
    p.add_argument("--dup-threshold", type=float, default=0.1, metavar="D", help="largest combined distance "
                   "(the mean of the feature cosine distance and the shift-tolerant thumbnail distance) of a "
                   "near-duplicate pair (default: 0.1)")
    p.add_argument("--overwrite", action="store_true", help="train the folds again")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_out_arg(p, "folder for the CSVs, audit.html and the folds (default: audit)", default="audit")
    p.set_defaults(func=run)


def default_config(overrides: list[str]):
    """speedrun-cpu.yaml where the data are 32 px images (as its model is built and tuned for), else cnn.yaml."""
    from ..config import load_config
    from ..data.dataset import load_raw
    from ..errors import ConfigError

    if not (RECIPES / "speedrun-cpu.yaml").is_file():
        raise ConfigError(f"the shipped recipes are not at {RECIPES}: give one with -c")
    cfg = load_config(RECIPES / "speedrun-cpu.yaml", [f"train.epochs={AUDIT_EPOCHS}", *overrides])
    size = cfg.data.image_size or load_raw(cfg.data).train_x.shape[1]
    if size == 32:
        return cfg, f"speedrun-cpu.yaml (train.epochs={cfg.train.epochs})"
    return load_config(RECIPES / "cnn.yaml", overrides), "cnn.yaml"


def run(args: argparse.Namespace) -> int:
    from ..audit.run import audit_data, audit_run
    from ..config import load_config

    kw = {"method": args.rank, "dup_threshold": args.dup_threshold}
    if args.run_dir and (args.storage or args.time):
        from ..errors import CifarlabError

        raise CifarlabError(f"{'--storage shares' if args.storage else '--time shares the time of'} the folds of an "
                            f"audit by folds; an audit of RUN_DIR trains none")
    if args.run_dir:
        res = audit_run(args.run_dir, args.out, **kw)
    else:
        overrides = config_overrides(args)
        if args.config:
            cfg, name = load_config(args.config, overrides), args.config
        else:
            cfg, name = default_config(overrides)
        print(f"audit: {args.folds} folds of {name}")
        res = audit_data(cfg, args.out, folds=args.folds, overwrite=args.overwrite, quiet=args.quiet,
                         time=args.time, storage=args.storage, heartbeat=args.heartbeat, **kw)
    print(f"label issues: {res['label_issues']} (ranked: {', '.join(res['ranked_splits'])}); duplicate pairs: "
          f"{res['duplicates']} ({res['leaks']} leaks across train and validation/test); odd images: "
          f"{res['outliers']}")
    print(f"wrote {args.out}/label_issues.csv, duplicates.csv, outliers.csv and {res['html']}")
    return 0
