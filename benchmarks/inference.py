"""Inference on a CPU: PyTorch eager against fp32 ONNX and int8 ONNX (ONNX Runtime), per model, in one process.

    python benchmarks/inference.py --run cnn=runs/cnn --run resnet18=runs/r18 --run speednet=runs/sn --run vit=runs/v
    python benchmarks/inference.py --epochs 10 --out bench-inference   # trains the runs it is not given, then measures
    python benchmarks/inference.py --quick                             # tiny runs, a few repetitions: checks it works

For each model (cnn, resnet18, speednet, vit; ``--models`` picks), from one trained run:

* ``pytorch``: the run's best weights with its normalization in front (``cifarlab.export.Normalized``, the module
  the exports are traced from), fp32, eager, under ``torch.inference_mode``;
* ``onnx-fp32``: ``cifarlab export RUN --format onnx`` run with ONNX Runtime's CPU provider;
* ``onnx-int8``: ``cifarlab export RUN --format onnx --int8`` (static QDQ, int8 weights per channel, calibrated on
  ``--calibration-images`` training images), the same way.

Each gets: the latency of one image (p50 and p99 over ``--reps`` single-image calls, after a warm-up), images/s at
batch 64 (``--batch``; the mean over at least ``--seconds`` of back-to-back batches), the accuracy on the run's test
split (``--test-images`` of them drawn at random, seeded; one view, no TTA, the same images for all three) and the
file size (the run's ``best.safetensors`` for pytorch). PyTorch and ONNX Runtime get the same thread count
(``--threads``, default all cores; one inter-op thread). The input is the run's test images, float32 in [0, 1].

A model without ``--run NAME=RUN_DIR`` is trained first into ``--out/runs/NAME`` with its recipe (``--recipe
NAME=YAML``, default configs/cnn.yaml, resnet18.yaml, speedrun-cpu.yaml, vit.yaml) for ``--epochs`` (default: the
recipe's), on ``--data`` (default $CIFARLAB_DATA, else CIFAR-10); a run already there is reused. ``--quick`` trains
tiny runs (1,000 training images, one epoch) and measures briefly: it checks the script, its numbers mean nothing.

The issue's target: int8 at least 2x the fp32 ONNX images/s at batch 64, within 0.5 points of its accuracy, for
cnn, resnet18 and speednet (``target`` in the output). The last line printed is JSON:
{"machine": {...}, "threads": T, "batch": 64, "models": {"cnn": {"pytorch": {"p50_ms": .., "p99_ms": ..,
 "images_per_s": .., "test_acc": .., "file_mb": ..}, "onnx-fp32": {...}, "onnx-int8": {...},
 "int8_vs_fp32": {"speedup": .., "acc_points": .., "target_met": ..}}, ...}}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"cnn": "cnn.yaml", "resnet18": "resnet18.yaml", "speednet": "speedrun-cpu.yaml", "vit": "vit.yaml"}
TARGET_MODELS = ("cnn", "resnet18", "speednet")  # the int8 target; the ViT is measured, not held to it
TARGET_SPEEDUP, TARGET_POINTS = 2.0, 0.5
RUNTIMES = ("pytorch", "onnx-fp32", "onnx-int8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR", help="a trained run of a model")
    p.add_argument("--recipe", action="append", default=[], metavar="NAME=YAML",
                   help="the config that trains a model not given by --run (default: configs/cnn.yaml, "
                        "resnet18.yaml, speedrun-cpu.yaml, vit.yaml)")
    p.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--out", default="bench-inference", help="exports (and runs it trains) go here")
    p.add_argument("--data", help="data for the runs it trains (default: $CIFARLAB_DATA, else cifar10)")
    p.add_argument("--epochs", type=int, help="epochs of the runs it trains (default: the recipe's)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every runtime (default: all)")
    p.add_argument("--batch", type=int, default=64, help="batch size of the throughput measurement")
    p.add_argument("--reps", type=int, default=300, help="single-image calls for the latency percentiles")
    p.add_argument("--seconds", type=float, default=5.0, help="least time per throughput measurement")
    p.add_argument("--test-images", type=int, help="test images for the accuracies (default: the whole split)")
    p.add_argument("--calibration-images", type=int, default=512, help="int8 calibration images")
    p.add_argument("--quick", action="store_true", help="tiny runs and short measurements: checks that it works")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.seconds = min(args.reps, 20), min(args.seconds, 0.5)
        args.test_images = args.test_images or 500
        args.calibration_images = min(args.calibration_images, 128)
    return args


# --------------------------------------------------------------------------- runs
def get_runs(args) -> dict[str, Path]:
    given = {}
    for item in args.run:
        name, sep, path = item.partition("=")
        if not sep or name not in RECIPES:
            sys.exit(f"--run takes NAME=RUN_DIR with NAME one of {', '.join(RECIPES)}, got {item!r}")
        given[name] = Path(path)
    runs = {}
    for name in args.models:
        if name in given:
            runs[name] = given[name]
        else:
            runs[name] = train_run(name, args)
        if not (runs[name] / "best.safetensors").is_file():
            sys.exit(f"{runs[name]} has no best.safetensors: not a finished run")
    return runs


def train_run(name: str, args) -> Path:
    from cifarlab.config import load_config
    from cifarlab.train import fit

    run_dir = Path(args.out) / "runs" / name
    if (run_dir / "best.safetensors").is_file():
        print(f"{name}: reusing {run_dir}", file=sys.stderr)
        return run_dir
    overrides = ["train.device=cpu"]
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.quick:
        overrides += ["data.train_size=1000", "train.epochs=1", "train.val_every=1"]
        if name == "vit":  # the study's ViT takes minutes per epoch on a CPU even for 1,000 images
            overrides += ["model.patch_size=4", "model.num_encoder_layers=2"]
    recipes = dict(item.split("=", 1) for item in args.recipe if "=" in item)
    recipe = Path(recipes.get(name, REPO / "configs" / RECIPES[name]))
    cfg = load_config(recipe, overrides)
    if cfg.model.name != name:
        sys.exit(f"{recipe} trains {cfg.model.name!r}, not {name!r}")
    print(f"{name}: training {recipe} for {cfg.train.epochs} epochs into {run_dir}", file=sys.stderr)
    fit(cfg, run_dir.parent, name, overwrite=True, quiet=True)
    return run_dir


# --------------------------------------------------------------------------- runtimes
def pytorch_runner(run_dir: Path):
    import cifarlab
    from cifarlab.export import Normalized

    predictor = cifarlab.load(run_dir, tta="none", device="cpu")
    model = Normalized(predictor.model, predictor.meta["mean"], predictor.meta["std"]).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    return run


def onnx_runner(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["logits"], {"image": x})[0]


# --------------------------------------------------------------------------- measurements
def latency_ms(run, images: np.ndarray, reps: int) -> tuple[float, float]:
    """p50 and p99 of one-image calls, cycling through the images."""
    for i in range(min(10, reps)):
        run(images[i % len(images)][None])
    times = []
    for i in range(reps):
        x = images[i % len(images)][None]
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    q = np.percentile(np.array(times) * 1000, [50, 99])
    return float(q[0]), float(q[1])


def images_per_s(run, images: np.ndarray, batch: int, seconds: float) -> float:
    batches = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)] or [images[:batch]]
    for b in batches[:2]:
        run(b)
    n, t0 = 0, time.perf_counter()
    while True:
        for b in batches:
            run(b)
            n += len(b)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n / elapsed


def accuracy(run, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> float:
    preds = np.concatenate([run(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])
    return float((preds == labels).mean())


def machine() -> dict:
    import onnxruntime as ort

    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    # int8 GEMMs run at several times fp32's speed only with VNNI (AVX512-VNNI, AVX-VNNI) or AMX.
    return {"cpu": info.get("model name") or platform.processor(), "cores": os.cpu_count(), "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "int8_instructions": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})}


def measure(name: str, run_dir: Path, args, data) -> dict:
    from cifarlab.export import export_int8, export_run, test_subset

    out = Path(args.out) / "models" / name
    fp32 = export_run(run_dir, "onnx", out)
    int8, record = export_int8(run_dir, fp32, data, calibration=args.calibration_images,
                               test_images=args.test_images)
    xs, ys = test_subset(data, args.test_images)  # the images export_int8 scored (seeded)
    x = xs.numpy().astype(np.float32) / 255.0  # (N, 3, S, S) in [0, 1]
    y = ys.numpy()
    timing = x[:max(args.batch * 4, 64)]
    files = {"pytorch": run_dir / "best.safetensors", "onnx-fp32": fp32, "onnx-int8": int8}
    runners = {"pytorch": pytorch_runner(run_dir), "onnx-fp32": onnx_runner(fp32, args.threads),
               "onnx-int8": onnx_runner(int8, args.threads)}
    res = {}
    for rt in RUNTIMES:
        run = runners[rt]
        p50, p99 = latency_ms(run, timing, args.reps)
        res[rt] = {"p50_ms": round(p50, 4), "p99_ms": round(p99, 4),
                   "images_per_s": round(images_per_s(run, timing, args.batch, args.seconds), 1),
                   "test_acc": round(accuracy(run, x, y), 5), "file_mb": round(files[rt].stat().st_size / 2**20, 3)}
        print(f"  {name:9s} {rt:10s} done", file=sys.stderr)
    f32, i8 = res["onnx-fp32"], res["onnx-int8"]
    speedup = i8["images_per_s"] / f32["images_per_s"]
    points = 100 * (i8["test_acc"] - f32["test_acc"])
    res["int8_vs_fp32"] = {"speedup": round(speedup, 3), "acc_points": round(points, 3),
                           "target_met": (speedup >= TARGET_SPEEDUP and points >= -TARGET_POINTS)
                           if name in TARGET_MODELS else None,
                           "export_sidecar": record}
    return res


def table(results: dict, args) -> str:
    head = (f"{'model':9s} {'runtime':10s} {'file MB':>8s} {'p50 ms':>8s} {'p99 ms':>8s} "
            f"{f'img/s @{args.batch}':>11s} {'test acc':>9s}")
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        for rt in RUNTIMES:
            r = res[rt]
            lines.append(f"{name:9s} {rt:10s} {r['file_mb']:8.2f} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} "
                         f"{r['images_per_s']:11.1f} {r['test_acc']:9.4f}")
        c = res["int8_vs_fp32"]
        met = {True: "met", False: "NOT met", None: "not a target model"}[c["target_met"]]
        lines.append(f"{'':9s} int8/fp32  throughput x{c['speedup']:.2f}, accuracy {c['acc_points']:+.2f} points "
                     f"(target x{TARGET_SPEEDUP:g} within {TARGET_POINTS} points: {met})")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = get_runs(args)
    from cifarlab.export import run_data

    results = {}
    for name, run_dir in runs.items():
        print(f"{name}: measuring {run_dir}", file=sys.stderr)
        results[name] = measure(name, run_dir, args, run_data(run_dir, args.data))
    out = {"machine": machine(), "threads": args.threads, "batch": args.batch, "reps": args.reps,
           "quick": args.quick, "runs": {k: str(v) for k, v in runs.items()}, "models": results}
    print(table(results, args))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
