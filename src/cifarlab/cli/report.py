"""``cifarlab report RUN_DIR``: a run's figures, metrics.json and report.html."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="figures, metrics and an HTML page for a run",
                       description="Confusion matrices, ROC curves, per-class scores, calibration, training curves "
                                   "and the most confidently wrong test images of RUN_DIR, from its saved test "
                                   "logits (evaluated first if missing). Writes RUN_DIR/report/: PNGs, "
                                   "metrics.json and report.html.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or a seeds group (train --seeds N)")
    p.add_argument("--data", metavar="PATH", help="where the run's data lies now, if it moved since training "
                   "(only the image grid needs the images)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.groups import is_group
    from ..report import make_report

    if is_group(args.run_dir):  # a seeds group (cifarlab train --seeds N)
        from ..report.groups import make_group_report

        path = make_group_report(args.run_dir)
    else:
        path = make_report(args.run_dir, data_path=args.data)
    print(f"wrote {path} (figures and metrics.json beside it)")
    return 0
