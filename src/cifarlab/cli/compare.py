"""``cifarlab compare RUN_DIR [RUN_DIR ...]``: curves, scores and ROC curves of several runs side by side."""

from __future__ import annotations

import argparse

from .common import add_out_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare runs trained on the same data",
                       description="Training curves of all runs on shared axes, a table of test loss, accuracy, "
                                   "macro AUC, ECE, parameters, training time and images per second, and the ROC "
                                   "curves of all runs on one chart; for every pair the accuracy difference with a "
                                   "paired bootstrap 95% interval and McNemar's exact test (groups: over seeds and "
                                   "per seed). Runs with different data or classes are refused. Writes "
                                   "comparison.html, comparison.json and PNGs.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories or seeds groups (train --seeds N)")
    add_out_arg(p, "folder that receives comparison.html, comparison.json and the PNGs "
                   "(default: comparison/ beside the first run)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..report import compare_runs
    from ..report.html import fmt

    path = compare_runs(args.run_dirs, args.out)
    result = json.loads((Path(path).parent / "comparison.json").read_text())
    rows = result["runs"]
    cols = [("run", "run", 20, 0), ("test_loss", "test loss", 10, 4), ("test_acc", "accuracy", 10, 4),
            ("tta", "TTA", 16, 0), ("top2_acc", "top-2", 8, 4), ("macro_auc", "macro AUC", 10, 4),
            ("macro_f1", "macro F1", 10, 4), ("ece", "ECE", 8, 4), ("params", "params", 12, 0),
            ("train_seconds", "train s", 10, 1), ("images_per_second", "images/s", 10, 1)]
    print("".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (_, h, w, _) in enumerate(cols)))
    for r in rows:
        print("".join(f"{fmt(r[k], d):>{w}}" if i else f"{r[k]:<{w}}" for i, (k, _, w, d) in enumerate(cols)))
    for pair in result["significance"]:
        ci = pair.get("over_seeds") or pair["bootstrap"]
        lo, hi = ci.get("ci_low"), ci.get("ci_high")
        interval = f" [{lo:+.4f}, {hi:+.4f}]" if lo is not None else ""
        print(f"{pair['a']} - {pair['b']}: accuracy {pair['acc_diff']:+.4f}{interval}, McNemar n01={pair['mcnemar']['n01']} "
              f"n10={pair['mcnemar']['n10']}: {pair['verdict']}")
    print(f"wrote {path}")
    return 0
