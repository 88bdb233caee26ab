"""Time to accuracy: train a config and report when the test accuracy first reached each mark.

    python benchmarks/time_to_accuracy.py CONFIG [--target 0.94] [--budget-minutes M] [--seeds N]
                                          [--data PATH] [--set section.key=value ...]
    python benchmarks/time_to_accuracy.py CONFIG --probe STEPS    # throughput only, synthetic data
    python benchmarks/time_to_accuracy.py CONFIG --epochs-for-minutes M ...  # size the run to M minutes

Trains with ``cifarlab.train.fit`` on the config's split (the configs use the study's 40k/10k split)
and, after each epoch, scores the TEST set with that epoch's evaluation weights (the EMA when
``train.ema`` is on) and the configured test-time augmentation. The training clock is fit's own
per-epoch time (the ``seconds`` column of metrics.csv): test evaluation, checkpoint writing and
set-up (data loading, model build, whitening init) are outside it; evaluation is reported apart.
fit's validation runs only after the last epoch here, so that it costs no time in between.

Printed: one line per epoch, the training minutes at which the study's accuracies (0.73, 0.77,
0.78) and the target were first reached, the final test accuracy, and as the last line JSON:
{"config": PATH, "minutes_to": {"0.73": M_OR_NULL, "0.77": ..., "0.78": ..., "target": ...},
 "target": T, "final_test_acc": A, "train_minutes": M, "eval_minutes": M}
With ``--seeds N`` (seeds train.seed, +1, ...) the values are means over the seeds, a mark's time
is null unless every seed reached it, and the JSON adds per-seed values and standard deviations.

As in airbench (Jordan, 2024), results are reported over seeds as mean and spread.

``--probe STEPS`` sizes a recipe without data: it times STEPS training steps (after one warm-up step)
of the configured model, augmentation and optimizer on random images, and one test-time-augmented
forward pass of 1000 images, in wall and process CPU time, and prints the estimated minutes per
40k-image epoch and for the configured epochs. CPU time is the figure that survives a busy machine.

``--epochs-for-minutes M`` sizes the run as ``cifarlab train --time`` does, with the trainer's own plan
(:func:`cifarlab.train.budget.plan`): it times the first steps of the configured model on the loaded data, then
sets ``train.steps`` and ``train.epochs`` (the last one partial) so that the schedule, with its warm-up at the
same share, ends at M minutes; every seed trains that plan.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from cifarlab.config import RunConfig, load_config
from cifarlab.data import ImageData, load_data
from cifarlab.data.loader import DeviceBatches
from cifarlab.errors import CifarlabError
from cifarlab.evaluation.inference import evaluate
from cifarlab.models import build_model
from cifarlab.train import fit
from cifarlab.train.checkpoint import load_checkpoint, load_into
from cifarlab.train.runtime import setup_runtime

STUDY_MARKS = (0.73, 0.77, 0.78)  # the study's ViT, CNN and ResNet18 test accuracies


class BudgetExceeded(Exception):
    """Raised from fit's epoch callback to stop training once the time budget is spent."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="run config YAML, e.g. configs/speedrun.yaml")
    p.add_argument("--target", type=float, default=0.94, help="test accuracy to time (default 0.94)")
    p.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                   help="stop training at the first epoch end past M minutes of training")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="runs with seeds train.seed .. +N-1")
    p.add_argument("--data", metavar="PATH", help="data path (short for --set data.path=PATH)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override (repeatable)")
    p.add_argument("--eval-every", type=int, default=1, metavar="K",
                   help="score the test set every K epochs (and after the last); default 1")
    p.add_argument("--out", metavar="DIR", help="keep the run directories here (default: a temporary folder)")
    p.add_argument("--probe", type=int, default=0, metavar="STEPS",
                   help="only time STEPS training steps on synthetic data and estimate the run's minutes")
    p.add_argument("--epochs-for-minutes", type=float, default=None, metavar="M",
                   help="time the first steps on the data, then set train.steps and train.epochs to what fits in "
                        "M training minutes, scaling the warm-up with them (the plan of cifarlab train --time)")
    args = p.parse_args(argv)
    if not 0 < args.target <= 1:
        p.error("--target must be in (0, 1]")
    if args.seeds < 1 or args.eval_every < 1:
        p.error("--seeds and --eval-every must be >= 1")
    if args.probe < 0:
        p.error("--probe must be >= 1 (steps)")
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        p.error("--budget-minutes must be > 0")
    if args.epochs_for_minutes is not None and args.epochs_for_minutes <= 0:
        p.error("--epochs-for-minutes must be > 0")
    return args


def first_reached(curve: list[tuple[int, float, float]], mark: float) -> float | None:
    """Training minutes of the first (epoch, minutes, acc) point with acc >= mark, else None."""
    return next((minutes for _, minutes, acc in curve if acc >= mark), None)


def eval_weights(run_dir: Path, cfg: RunConfig, num_classes: int) -> torch.nn.Module:
    """The epoch's evaluation weights from the checkpoint fit has just written: the EMA when on."""
    ckpt = load_checkpoint(run_dir / "last.pt")
    model = build_model(cfg, num_classes)
    load_into(model, ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"], str(run_dir / "last.pt"))
    return model


def run_once(cfg: RunConfig, data: ImageData, out_dir: Path, name: str, target: float,
             budget_minutes: float | None, eval_every: int, log: Callable[[str], None] = print) -> dict:
    """Train once; returns the accuracy curve, the marks' minutes and the clocks."""
    cfg = copy.deepcopy(cfg)
    cfg.train.val_every = cfg.train.epochs  # validate only at the end: nothing but training between test scores
    rt = setup_runtime(cfg.train, cfg.model.name)
    norm = DeviceBatches(data.test_x[:0], data.test_y[:0], 1, mean=data.mean, std=data.std, device=rt.device)
    run_dir = out_dir / name
    clock = {"train": 0.0, "eval": 0.0}
    curve: list[tuple[int, float, float]] = []

    def on_epoch_end(epoch: int, row: dict) -> None:
        clock["train"] += float(row["seconds"])
        over = budget_minutes is not None and clock["train"] / 60 >= budget_minutes
        if epoch % eval_every == 0 or epoch == cfg.train.epochs or over:
            t0 = time.perf_counter()
            model = eval_weights(run_dir, cfg, data.num_classes).to(rt.device)
            if rt.channels_last:
                model = model.to(memory_format=torch.channels_last)
            _, acc, _ = evaluate(model, data.test_x, data.test_y, norm, rt, cfg.train.eval_batch_size, cfg.train.tta)
            seconds = time.perf_counter() - t0
            clock["eval"] += seconds
            curve.append((epoch, clock["train"] / 60, acc))
            log(f"epoch {epoch:>3}/{cfg.train.epochs} | train {clock['train'] / 60:7.2f} min | "
                f"train loss {row['train_loss']:.4f} | test acc {acc:.4f} (tta {cfg.train.tta}) | eval {seconds:.0f} s")
        if over:
            raise BudgetExceeded

    t0 = time.perf_counter()
    stopped = False
    try:
        fit(cfg, out_dir, name, data=data, on_epoch_end=on_epoch_end, quiet=True, overwrite=True)
    except BudgetExceeded:
        stopped = True
        log(f"budget of {budget_minutes} training minutes spent: stopped after epoch {curve[-1][0]}")
    wall = time.perf_counter() - t0
    marks = {f"{m:.2f}": first_reached(curve, m) for m in STUDY_MARKS}
    marks["target"] = first_reached(curve, target)
    return {"minutes_to": marks, "final_test_acc": curve[-1][2], "train_minutes": clock["train"] / 60,
            "eval_minutes": clock["eval"] / 60, "other_minutes": (wall - clock["train"] - clock["eval"]) / 60,
            "curve": curve, "stopped_by_budget": stopped}


def summarize(config: str, target: float, runs: list[dict]) -> dict:
    """The JSON line: the spec's keys; over several seeds, means plus per-seed values and spreads."""
    def mean(xs):
        return sum(xs) / len(xs)

    def rnd(x):
        return None if x is None else round(x, 4)

    keys = list(runs[0]["minutes_to"])
    minutes_to = {}
    for k in keys:
        vals = [r["minutes_to"][k] for r in runs]
        minutes_to[k] = rnd(mean(vals)) if all(v is not None for v in vals) else None
    out = {"config": config, "minutes_to": minutes_to, "target": target,
           "final_test_acc": rnd(mean([r["final_test_acc"] for r in runs])),
           "train_minutes": rnd(mean([r["train_minutes"] for r in runs])),
           "eval_minutes": rnd(mean([r["eval_minutes"] for r in runs]))}
    if len(runs) > 1:
        accs = [r["final_test_acc"] for r in runs]
        out["seeds"] = len(runs)
        out["final_test_acc_std"] = rnd(statistics.stdev(accs))
        out["final_test_accs"] = [rnd(a) for a in accs]
        out["minutes_to_per_seed"] = {k: [rnd(r["minutes_to"][k]) for r in runs] for k in keys}
    return out


def probe(cfg: RunConfig, steps: int, n_train: int = 40000, n_test: int = 10000) -> dict:
    """Time ``steps`` training steps and one TTA evaluation on random uint8 images (no data set needed)."""
    from cifarlab.data.augment import BatchAugment, progressive_cost
    from cifarlab.evaluation.inference import tta_logits
    from cifarlab.train.loop import soft_cross_entropy
    from cifarlab.train.optim import apply_decoupled_wd, build_optimizer, build_scheduler

    if cfg.data.image_size is None:  # no data is read: images of CIFAR-10's 32 px
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=32))
        cfg.validate()
    t = cfg.train
    rt = setup_runtime(t, cfg.model.name)
    n = t.batch_size * (steps + 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, cfg.data.image_size, cfg.data.image_size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    model = build_model(cfg, 10).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Timed at full size; progressive resizing's smaller epochs enter the run's estimate through their pixels.
    full_size = dataclasses.replace(cfg.data, progressive_size=0)
    batches = DeviceBatches(x, y, t.batch_size, mean=[0.5] * 3, std=[0.25] * 3, device=rt.device, shuffle=True,
                            drop_last=True, augment=BatchAugment(full_size, n, t.seed), channels_last=rt.channels_last)
    if hasattr(model, "init_whitening"):
        model.init_whitening(batches.normalize(x[:1000].to(rt.device)))
    optimizer = build_optimizer(model, cfg.optim)
    scheduler, _ = build_scheduler(optimizer, cfg.optim, 1, len(batches))
    model.train()
    for step, xb, yb in batches.epoch(0):  # batch preparation (augmentation) is timed too, as in fit
        if step == 1:
            w0, c0 = time.perf_counter(), time.process_time()
        with rt.autocast():
            loss = soft_cross_entropy(model(xb).float(), yb, t.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        apply_decoupled_wd(optimizer)
        optimizer.step()
        scheduler.step()
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    images = steps * t.batch_size
    model.eval()
    xe = batches.normalize(x[:1000].to(rt.device))
    if rt.channels_last:
        xe = xe.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), rt.autocast():
        tta_logits(model, xe[:100], t.tta)  # warm-up (kernel selection for the new shapes)
        e0, ec0 = time.perf_counter(), time.process_time()
        tta_logits(model, xe, t.tta)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        ewall, ecpu = time.perf_counter() - e0, time.process_time() - ec0
    epoch_min = n_train * wall / images / 60
    return {"threads": torch.get_num_threads(), "precision": rt.precision, "batch_size": t.batch_size,
            "train_ms_per_image": 1e3 * wall / images, "train_cpu_ms_per_image": 1e3 * cpu / images,
            "images_per_second": images / wall, "minutes_per_epoch": epoch_min,
            "cpu_minutes_per_epoch": n_train * cpu / images / 60,
            "run_minutes": epoch_min * t.epochs * progressive_cost(cfg.data, t.epochs),
            "eval_minutes_per_epoch": n_test * ewall / 1000 / 60,
            "eval_cpu_minutes_per_epoch": n_test * ecpu / 1000 / 60}


def size_to_minutes(cfg: RunConfig, data: ImageData, minutes: float) -> tuple[RunConfig, str]:
    """``cfg`` sized to ``minutes`` of training by the plan of ``--time`` (:func:`cifarlab.train.budget.plan`),
    timed on ``data`` with validation at the end only, as :func:`run_once` trains; and the line that says so.
    The sized config keeps ``train.time_budget`` and its planned ``train.steps``: ``fit`` trains that plan
    without timing again."""
    from cifarlab.train import budget
    from cifarlab.train.loop import setup

    cfg = copy.deepcopy(cfg)
    cfg.train.time_budget = minutes * 60
    cfg.train.val_every = cfg.train.epochs  # the plan prices one validation, at the end
    parts = setup(cfg, data)
    plan = budget.plan(parts, time.perf_counter())
    line = (f"sized: {cfg.train.batch_size / plan.step_seconds:.0f} images/s ({parts.rt.precision}, batch "
            f"{cfg.train.batch_size}), {plan.step_seconds * len(parts.batches):.1f} s per epoch -> "
            f"{cfg.train.epochs} epochs in {minutes} min (train.epochs={cfg.train.epochs} "
            + (f"optim.warmup_fraction={cfg.optim.warmup_fraction})" if cfg.optim.warmup_fraction else
               f"optim.warmup_epochs={cfg.optim.warmup_epochs})") + f", {plan.steps} steps")
    return cfg, line


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])
    cfg = load_config(args.config, overrides)
    if args.probe:
        res = probe(cfg, args.probe)
        print(f"{args.config}: {cfg.model.name}, {res['precision']}, batch {res['batch_size']}, "
              f"{res['threads']} thread(s): {res['images_per_second']:.0f} images/s "
              f"({res['train_ms_per_image']:.2f} ms, {res['train_cpu_ms_per_image']:.2f} CPU-ms per image) | "
              f"40k epoch {res['minutes_per_epoch']:.2f} min ({res['cpu_minutes_per_epoch']:.2f} CPU-min) | "
              f"{cfg.train.epochs} epochs {res['run_minutes']:.1f} min | test eval (tta {cfg.train.tta}) "
              f"{res['eval_minutes_per_epoch']:.2f} min ({res['eval_cpu_minutes_per_epoch']:.2f} CPU-min) per epoch")
        res = {"config": args.config, **{k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}}
        print(json.dumps(res), flush=True)
        return res
    data = load_data(cfg.data)
    if args.epochs_for_minutes:
        cfg, line = size_to_minutes(cfg, data, args.epochs_for_minutes)
        print(line, flush=True)
    print(f"{args.config}: {cfg.model.name}, {len(data.train_x)} train images, {len(data.test_x)} test images, "
          f"{cfg.train.epochs} epochs, tta {cfg.train.tta}, torch threads {torch.get_num_threads()}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="tta-") as tmp:
        out_dir = Path(args.out) if args.out else Path(tmp)
        for i in range(args.seeds):
            seed_cfg = copy.deepcopy(cfg)
            seed_cfg.train.seed = cfg.train.seed + i
            if args.seeds > 1:
                print(f"--- seed {seed_cfg.train.seed}", flush=True)
            res = run_once(seed_cfg, data, out_dir, f"{Path(args.config).stem}-seed{seed_cfg.train.seed}",
                           args.target, args.budget_minutes, args.eval_every, log=lambda s: print(s, flush=True))
            for k, v in res["minutes_to"].items():
                label = f"target {args.target}" if k == "target" else k
                print(f"  minutes to {label}: {'not reached' if v is None else f'{v:.2f}'}")
            print(f"  final test acc {res['final_test_acc']:.4f} | train {res['train_minutes']:.2f} min | "
                  f"eval {res['eval_minutes']:.2f} min | other (set-up, checkpoints, validation) "
                  f"{res['other_minutes']:.2f} min", flush=True)
            runs.append(res)
    summary = summarize(args.config, args.target, runs)
    if args.seeds > 1:
        print(f"mean final test acc {summary['final_test_acc']:.4f} +/- {summary['final_test_acc_std']:.4f} "
              f"over {args.seeds} seeds")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    try:
        main()
    except CifarlabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
