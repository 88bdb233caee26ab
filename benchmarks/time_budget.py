"""How close ``cifarlab train --time`` lands to its budget, and what it costs in accuracy against a run of
whole epochs of about the same length.

    python benchmarks/time_budget.py --data ../shared/datasets/cifar10-jpeg --config configs/speedrun-cpu.yaml \
        --time 2m [--seeds 1] [--set KEY=VALUE ...]

Per seed, in one process, one after the other: (A) the recipe with ``--time`` (the trainer plans its steps);
(B) the same recipe with ``train.epochs`` = A's planned steps rounded to whole epochs and no budget; (C) the
same recipe with no budget and A's final plan written as a fixed length (``train.epochs`` and ``train.steps``
as A ended with them): the same length exactly, at any budget, so C against A is the budget's own cost in
accuracy (its timed copies, its re-plan) and B against A what a time-sized length buys over whole epochs.
All are evaluated on the test split. Wall time is measured around ``fit`` here, less the data loading, which the
budget excludes by design (the data is decoded once, before both runs). Run it on a quiet machine: the
plan times steps, so a busy machine plans fewer. Prints a table and a JSON last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from cifarlab.coerce import parse_duration
from cifarlab.config import load_config
from cifarlab.data import load_data
from cifarlab.evaluation import evaluate_run
from cifarlab.train import fit

REPO = Path(__file__).resolve().parents[1]


def one(cfg, data, out: Path, name: str) -> dict:
    t0 = time.perf_counter()
    summary = fit(cfg, out, name, data=data, quiet=True)
    wall = time.perf_counter() - t0
    test = evaluate_run(summary["run_dir"], data=data)
    saved = load_config(Path(summary["run_dir"]) / "config.yaml")
    per_epoch = summary["train_images"] // saved.train.batch_size  # drop_last: whole batches
    return {"wall_seconds": round(wall, 1), "epochs": summary["epochs"], "steps": saved.train.steps or None,
            "steps_per_epoch": per_epoch,
            "val_acc": summary["best_val_acc"], "test_acc": round(test["test_acc"], 4)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default=str(REPO / "configs" / "speedrun-cpu.yaml"))
    ap.add_argument("--time", default="2m")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    budget = parse_duration("--time", args.time)
    base = [f"data.path={args.data}", *args.set]
    t0 = time.perf_counter()
    data = load_data(load_config(args.config, base).data)
    print(f"data loaded in {time.perf_counter() - t0:.1f}s (excluded from both runs' walls)", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cifarlab-budget-") as tmp:
        for seed in range(args.seeds):
            a = one(load_config(args.config, base + [f"train.seed={seed}", f"train.time_budget={args.time}"]), data,
                    Path(tmp), f"time-{seed}")
            epochs = max(1, round(a["steps"] / a["steps_per_epoch"])) if a["steps"] else a["epochs"]
            b = one(load_config(args.config, base + [f"train.seed={seed}", f"train.epochs={epochs}"]), data,
                    Path(tmp), f"epochs-{seed}")
            c = one(load_config(args.config, base + [f"train.seed={seed}", f"train.epochs={a['epochs']}",
                                                     f"train.steps={a['steps'] or 0}"]),
                    data, Path(tmp), f"steps-{seed}")
            rows.append({"seed": seed, "budget": budget, "time": a, "epochs": b, "same_steps": c,
                         "off_budget": round(a["wall_seconds"] / budget - 1, 4)})
            print(f"seed {seed}: --time {args.time}: {a['wall_seconds']}s ({rows[-1]['off_budget']:+.1%} of the "
                  f"budget), {a['steps']} steps, test acc {a['test_acc']} | {epochs} whole epochs: "
                  f"{b['wall_seconds']}s, test acc {b['test_acc']} | the same {c['steps']} steps fixed: "
                  f"{c['wall_seconds']}s, test acc {c['test_acc']}")
    out = {"benchmark": "time_budget", "config": Path(args.config).name, "budget_seconds": budget, "runs": rows,
           "max_abs_off_budget": max(abs(r["off_budget"]) for r in rows),
           "mean_test_acc_time": round(sum(r["time"]["test_acc"] for r in rows) / len(rows), 4),
           "mean_test_acc_epochs": round(sum(r["epochs"]["test_acc"] for r in rows) / len(rows), 4),
           "mean_test_acc_same_steps": round(sum(r["same_steps"]["test_acc"] for r in rows) / len(rows), 4)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
