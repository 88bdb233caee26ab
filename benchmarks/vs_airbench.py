"""cifarlab's speedrun against airbench94, side by side: the same images, the same machine, one process.

    python benchmarks/vs_airbench.py                    # full: airbench94's 9.9 epochs, speedrun-cpu's 9
    python benchmarks/vs_airbench.py --quick            # both 2 epochs (under 15 min on 2 quiet CPU cores)
    python benchmarks/vs_airbench.py [--seeds N] [--data PATH] [--epochs E] [--device cpu|cuda]
    python benchmarks/vs_airbench.py --seeds 3 --score-from 9  # the recorded verdict (~100 min on 2 cores)
    python benchmarks/vs_airbench.py --config configs/speedrun.yaml   # the 40k-split recipe's 18 epochs

The peer is Keller Jordan's airbench94 (``pip install airbench==0.1.8``, or ``pip install -e '.[bench]'``),
trained by its own ``train94`` with its own hyperparameters through ``benchmarks/airbench_adapter.py``
(its code unmodified; on a CPU its CUDA calls pointed at the CPU and bf16 autocast per forward where the
CPU has native bf16, the whitening stem in fp32; on a GPU as published). cifarlab trains
``configs/speedrun-cpu.yaml`` (``--config`` for another recipe) through ``cifarlab.train.fit`` on all the training
images (``data.val_size=0``).

Data: the training and test images of ``--data`` (default $CIFARLAB_DATA, else ../shared/datasets/
cifar10-jpeg beside the repository) decoded once by cifarlab's loader, the training images shuffled once
by ``--data-seed`` (airbench initialises its whitening layer from the first 5000, and the folder is sorted
by class); both sides get those images in that order.

Per run, after every pass over the training set, the test set is scored off the clock: airbench's with
``evaluate`` at its TTA level (2: mirror + translate), cifarlab's with its own TTA (``train.tta``, the
same six views and weights); ``--score-from P`` scores only from pass P on (and always the last pass), which
saves ~35 s a pass a side on a CPU. Training seconds exclude evaluation, checkpoint writes and set-up (model,
optimizer, whitening init) on both sides. The process-wide settings cifarlab's runtime makes (glibc
keeps freed memory; on CUDA cuDNN autotuning, TF32) are made once at the start, so both sides run
under them. Each side first trains a couple of steps untimed (kernels, allocator); then, per seed, one
run of each, the order alternating from seed to seed so that a machine's drift slows both alike.

``--quick`` shortens both schedules to the same length (2 epochs; ``--epochs E`` for another length):
airbench94's ``train94(epochs=E)`` with the rest of its ``hyp``, the speedrun with ``train.epochs=E``
and its warm-up kept at the same share of the run.

Printed: progress on stderr; on stdout a table per pass (mean over seeds) and as the last line JSON:
{"device": D, "airbench": {"acc": A, "train_s": T, "epochs": E},
 "cifarlab": {"acc": A, "train_s": T, "epochs": E, "s_to_airbench_acc": S_OR_NULL},
 "ratio_time_to_acc": S/T_OR_NULL}
``acc`` is the final test accuracy and ``train_s`` the training seconds, means over the seeds;
``s_to_airbench_acc`` is cifarlab's training seconds at the end of the first epoch whose mean test
accuracy reaches airbench's mean final accuracy (null if none does; with ``--score-from`` the first scored
such epoch, so an upper bound), and ``ratio_time_to_acc`` that over airbench's ``train_s``: below 1, cifarlab
got to airbench94's accuracy in less training time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the adapter and the other benchmarks beside this file

import torch  # noqa: E402

from airbench_adapter import require_airbench, train_airbench94, write_loader_files  # noqa: E402
from cifarlab.config import RunConfig, load_config  # noqa: E402
from cifarlab.data import ImageData, load_data  # noqa: E402
from cifarlab.data.dataset import apply_data_defaults  # noqa: E402
from cifarlab.data.loader import DeviceBatches  # noqa: E402
from cifarlab.errors import CifarlabError  # noqa: E402
from cifarlab.evaluation.inference import evaluate  # noqa: E402
from cifarlab.train import fit  # noqa: E402
from cifarlab.train.checkpoint import load_checkpoint  # noqa: E402
from cifarlab.train.runtime import setup_runtime  # noqa: E402
from throughput import data_path, device_name  # noqa: E402
from time_to_accuracy import eval_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPEEDRUN = REPO / "configs" / "speedrun-cpu.yaml"  # airbench94's settings, batch 512, 9 epochs
QUICK_EPOCHS = 2  # 2 x ~98 s per epoch per side on 2 quiet cores, plus 4 TTA scorings of ~35 s: ~9 min


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"both sides {QUICK_EPOCHS} epochs (sized for under 15 min on 2 quiet cores)")
    p.add_argument("--epochs", type=int, default=None, metavar="E", help="both sides E epochs (implies --quick's "
                   "equal schedules); default airbench94's 9.9 and the recipe's own (speedrun-cpu: 9)")
    p.add_argument("--config", type=Path, default=SPEEDRUN, metavar="YAML",
                   help="cifarlab's recipe (default configs/speedrun-cpu.yaml)")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="runs per side, seeds 0 .. N-1 (default 1)")
    p.add_argument("--data", metavar="PATH", help="data set (default: $CIFARLAB_DATA, else ../shared/datasets/"
                   "cifar10-jpeg beside the repository)")
    p.add_argument("--score-from", type=int, default=1, metavar="P", help="score the test set after pass P "
                   "and later ones only (the last pass always); default 1, every pass")
    p.add_argument("--data-seed", type=int, default=0, metavar="S", help="seed of the one shuffle of the "
                   "training images both sides get (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="both sides (default their own 1024); for tiny test runs")
    p.add_argument("--widths", metavar="W1,W2,W3", help="both nets' block widths (default both recipes' "
                   "64,256,256); for tiny test runs")
    p.add_argument("--no-warm-up", action="store_true", help="skip the untimed warm-up steps of each side")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override on cifarlab's side (repeatable), e.g. --set train.epochs=12")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.score_from < 1:
        p.error("--score-from must be >= 1")
    if not args.config.is_file():
        p.error(f"--config: no such file: {args.config}")
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.widths is not None:
        try:
            args.widths = [int(w) for w in args.widths.split(",")]
        except ValueError:
            args.widths = []
        if len(args.widths) != 3 or min(args.widths) < 1:
            p.error("--widths takes three positive integers, e.g. 64,256,256")
    if args.quick and args.epochs is None:
        args.epochs = QUICK_EPOCHS
    return args


# ============================================================================ data
def shuffled_data(cfg: RunConfig, device: torch.device, data_seed: int) -> ImageData:
    """All training images (no validation split) and the test images, the training images in one seeded order."""
    data = load_data(cfg.data, device)
    perm = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(data_seed))
    return dataclasses.replace(data, train_x=data.train_x[perm], train_y=data.train_y[perm])


def speedrun_config(args: argparse.Namespace, path: str | None, device: torch.device) -> RunConfig:
    over = ["data.val_size=0", f"train.device={device}"]
    if path:
        over.append(f"data.path={path}")
    if args.batch_size:
        over.append(f"train.batch_size={args.batch_size}")
    if args.widths:
        over.append(f"model.widths={args.widths}")
    if args.epochs is not None:  # the shortened schedule: load_config keeps the warm-up at its share of the run
        over.append(f"train.epochs={args.epochs}")
    cfg = load_config(args.config, over + list(args.overrides))
    cfg.train.val_every = cfg.train.epochs
    cfg.validate()
    return cfg


# ============================================================================ cifarlab's side
def run_cifarlab(cfg: RunConfig, data: ImageData, out_dir: Path, name: str, log, score_from: int = 1) -> dict:
    """One fit; after each epoch from ``score_from`` on (and the last) its evaluation weights score the test set
    with ``train.tta``, off the clock; the passes before have accuracy NaN."""
    rt = setup_runtime(cfg.train, cfg.model.name)
    norm = DeviceBatches(data.test_x[:0], data.test_y[:0], 1, mean=data.mean, std=data.std, device=rt.device)
    rows: list[tuple[float, float, float]] = []
    clock = {"train": 0.0, "eval": 0.0, "loss": float("nan")}

    def on_epoch_end(epoch: int, row: dict) -> None:
        clock["train"] += float(row["seconds"])
        clock["loss"] = float(row["train_loss"])
        if epoch < score_from and epoch < cfg.train.epochs:
            rows.append((float(epoch), clock["train"], math.nan))
            log(f"cifarlab   | epoch {epoch:5d}/{cfg.train.epochs} | train {clock['train']:7.1f} s | not scored "
                f"| train loss {row['train_loss']:.4f}")
            return
        t0 = time.perf_counter()
        model = eval_weights(out_dir / name, cfg, data.num_classes).to(rt.device)
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        _, acc, _ = evaluate(model, data.test_x, data.test_y, norm, rt, cfg.train.eval_batch_size, cfg.train.tta)
        clock["eval"] += time.perf_counter() - t0
        rows.append((float(epoch), clock["train"], acc))
        log(f"cifarlab   | epoch {epoch:5d}/{cfg.train.epochs} | train {clock['train']:7.1f} s | test acc {acc:.4f} "
            f"(tta {cfg.train.tta}) | train loss {row['train_loss']:.4f}")

    summary = fit(cfg, out_dir, name, data=data, on_epoch_end=on_epoch_end, quiet=True, overwrite=True)
    steps = load_checkpoint(out_dir / name / "last.pt")["train_state"]["global_step"]
    return {"rows": rows, "acc": rows[-1][2], "train_s": clock["train"], "epochs": cfg.train.epochs,
            "eval_s": clock["eval"], "train_loss": clock["loss"], "steps": steps, "precision": summary["precision"]}


def run_airbench(data_dir: Path, device: torch.device, seed: int, args: argparse.Namespace, bf16: bool, log) -> dict:
    epochs = None if args.epochs is None else float(args.epochs)
    r = train_airbench94(data_dir, device, seed=seed, epochs=epochs, batch_size=args.batch_size, bf16=bf16,
                         widths=args.widths, score_from=args.score_from, log=log)
    return {"rows": r.rows, "acc": r.acc, "train_s": r.train_s, "epochs": r.epochs, "eval_s": r.eval_s,
            "steps": r.steps, "setup_s": r.setup_s, "weights_moved": r.weights_moved}


def warm_up(cfg: RunConfig, data: ImageData, data_dir: Path, device: torch.device, bf16: bool, out_dir: Path,
            batch_size: int, widths: list[int] | None) -> None:
    """A couple of untimed steps of each side (allocator, kernel selection, cuDNN autotuning) on a subset."""
    n = min(len(data.train_x), 2 * batch_size)
    sub = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])
    wcfg = copy.deepcopy(cfg)
    wcfg.train.epochs = wcfg.train.val_every = 1
    fit(wcfg, out_dir, "warm-up", data=sub, quiet=True, overwrite=True)
    train_airbench94(data_dir, device, epochs=1, batch_size=min(batch_size, n), bf16=bf16, score_from=math.inf,
                     subset=n, widths=widths)


# ============================================================================ summary
def mean_curve(runs: list[dict]) -> list[tuple[float, float, float]]:
    """(epochs, training seconds, test accuracy) per pass, averaged over the seeds' runs."""
    k = min(len(r["rows"]) for r in runs)
    return [tuple(sum(r["rows"][i][j] for r in runs) / len(runs) for j in range(3)) for i in range(k)]


def seconds_to(curve: list[tuple[float, float, float]], acc: float) -> float | None:
    """Training seconds at the end of the first pass whose accuracy is at least ``acc``, else None."""
    return next((s for _, s, a in curve if a >= acc), None)


def summarize(device: str, airbench: list[dict], cifarlab: list[dict]) -> dict:
    a_curve, c_curve = mean_curve(airbench), mean_curve(cifarlab)
    a_acc, a_s = a_curve[-1][2], a_curve[-1][1]
    s_to = seconds_to(c_curve, a_acc)

    def rnd(x, n):
        return None if x is None else round(x, n)

    return {"device": device,
            "airbench": {"acc": rnd(a_acc, 4), "train_s": rnd(a_s, 1), "epochs": airbench[0]["epochs"]},
            "cifarlab": {"acc": rnd(c_curve[-1][2], 4), "train_s": rnd(c_curve[-1][1], 1),
                         "epochs": cifarlab[0]["epochs"], "s_to_airbench_acc": rnd(s_to, 1)},
            "ratio_time_to_acc": rnd(None if s_to is None else s_to / a_s, 3)}


def table(airbench: list[dict], cifarlab: list[dict]) -> list[str]:
    """A row per pass; a pass not scored (``--score-from``) shows its accuracy as '-'."""
    a, c = mean_curve(airbench), mean_curve(cifarlab)
    head = ("pass", "airbench epochs", "airbench test acc", "airbench train s", "cifarlab epochs",
            "cifarlab test acc", "cifarlab train s")

    def acc(x: float) -> str:
        return "-" if math.isnan(x) else f"{x:.4f}"

    rows = []
    for i in range(max(len(a), len(c))):
        ra = (f"{a[i][0]:.2f}", acc(a[i][2]), f"{a[i][1]:.1f}") if i < len(a) else ("", "", "")
        rc = (f"{c[i][0]:.0f}", acc(c[i][2]), f"{c[i][1]:.1f}") if i < len(c) else ("", "", "")
        rows.append((str(i + 1), *ra, *rc))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return ["  ".join(str(v).rjust(w) for v, w in zip(row, widths)) for row in (head, *rows)]


# ============================================================================ run
def main(argv: list[str] | None = None, record: dict | None = None) -> dict:
    """Run the comparison; returns the JSON line's dict. ``record`` (a dict) receives each side's runs."""
    args = parse_args(argv)
    require_airbench()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 progress on stderr, results on stdout
    path = data_path(args.data)
    probe_cfg = load_config(args.config, [f"train.device={args.device}"])
    rt = setup_runtime(probe_cfg.train, probe_cfg.model.name)  # the device, and the process-wide settings, once
    device = rt.device
    bf16 = device.type == "cpu" and rt.precision == "bf16"  # airbench on a GPU: its own fp16
    cfg = speedrun_config(args, path, device)
    data = shuffled_data(cfg, device, args.data_seed)
    apply_data_defaults(cfg, data)
    dev = device_name(device)
    mode = "bf16 autocast (whitening stem fp32)" if bf16 else "fp32" if device.type == "cpu" else "as published"
    log(f"data: {len(data.train_x)} train / {len(data.test_x)} test images from {data.source}, shuffled with seed "
        f"{args.data_seed}; device {dev}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"airbench94 {mode}; cifarlab {rt.precision}")
    airbench_runs: list[dict] = []
    cifarlab_runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vs-airbench-") as tmp:
        tmp = Path(tmp)
        data_dir = write_loader_files(tmp / "airbench-data", data.train_x.cpu(), data.train_y.cpu(),
                                      data.test_x.cpu(), data.test_y.cpu(), data.classes)
        if not args.no_warm_up:
            warm_up(cfg, data, data_dir, device, bf16, tmp / "runs", cfg.train.batch_size, args.widths)
        for seed in range(args.seeds):
            scfg = copy.deepcopy(cfg)
            scfg.train.seed = cfg.train.seed + seed

            def side_a():
                airbench_runs.append(run_airbench(data_dir, device, seed, args, bf16, log))

            def side_b():
                cifarlab_runs.append(run_cifarlab(scfg, data, tmp / "runs", f"speedrun-seed{scfg.train.seed}", log,
                                                  args.score_from))

            for side in ((side_a, side_b) if seed % 2 == 0 else (side_b, side_a)):
                side()
    summary = summarize(dev, airbench_runs, cifarlab_runs)
    if record is not None:
        record.update(airbench=airbench_runs, cifarlab=cifarlab_runs)
    recipe = args.config.resolve()
    recipe = recipe.relative_to(REPO) if recipe.is_relative_to(REPO) else recipe
    print(f"# vs_airbench: airbench94 (train94, its hyp) against {recipe} on the same "
          f"{len(data.train_x)} training and {len(data.test_x)} test images; device {dev}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.seeds} seed(s), means per pass; test acc with each side's TTA, "
          f"training seconds without evaluation")
    for line in table(airbench_runs, cifarlab_runs):
        print(line)
    for i, (a, c) in enumerate(zip(airbench_runs, cifarlab_runs)):
        print(f"# seed {i}: airbench acc {a['acc']:.4f} in {a['train_s']:.1f} s ({a['steps']} steps, set-up "
              f"{a['setup_s']:.1f} s, eval {a['eval_s']:.0f} s) | cifarlab acc {c['acc']:.4f} in {c['train_s']:.1f} s "
              f"({c['steps']} steps, {c['precision']}, eval {c['eval_s']:.0f} s)")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    try:
        main()
    except (CifarlabError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
