"""Streaming vs in-memory training throughput on a data set larger than the device budget.

A generated data set (default 100,000 images at 64 px, 10 classes: 1.2 GB of uint8) is written once into
cifarlab's decode cache (memory-mappable .npy files), then the same training run is made twice per round in
fresh processes: with the whole training split gathered into memory, and streamed from the memory map with a
``data.device_memory`` budget (default 256 MiB). Each mode's training images/s (from the run's summary) and
peak resident memory are printed; the last line is JSON with the ratio streamed / in-memory.

    python benchmarks/streaming.py [--images 100000] [--size 64] [--budget-mib 256] [--train-size 20000]
                                   [--epochs 1] [--rounds 2]

The generated images are in the page cache after they are written: the figure is the cost of the gather,
pinning and prefetch path, not of a disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

SPEC = "generated:"


def register_generated_source() -> None:
    """A source for ``--data generated:N:SIZE``: images written straight into the decode cache."""
    from cifarlab.data.cache import cached, fingerprint
    from cifarlab.data.registry import RawData, Source, register_source

    @register_source("generated")
    def _resolve(spec, cfg):
        if not (spec or "").startswith(SPEC):
            return None
        n, size = (int(v) for v in spec[len(SPEC):].split(":"))

        def build() -> RawData:
            rng = np.random.default_rng(0)
            y = np.arange(n) % 10
            x = np.empty((n, size, size, 3), np.uint8)
            base = rng.integers(0, 256, (10, size, size, 3), dtype=np.uint8)
            for i in range(0, n, 4096):  # class patterns plus noise, in chunks
                noise = rng.integers(-40, 40, (min(4096, n - i), size, size, 3))
                x[i:i + 4096] = np.clip(base[y[i:i + 4096]].astype(np.int64) + noise, 0, 255)
            t = max(n // 10, 10)
            return RawData(x[t:], y[t:].astype(np.int64), x[:t], y[:t].astype(np.int64),
                           [f"c{k}" for k in range(10)], source=spec)

        return Source("generated", None, lambda c: cached(Path(spec.replace(":", "_")),
                                                          fingerprint([], kind="generated", n=n, size=size), build))


def run_mode(args: argparse.Namespace) -> None:
    """One training run in this process; prints a JSON line."""
    register_generated_source()
    from cifarlab.config import load_config
    from cifarlab.train import fit

    overrides = [f"data.path={SPEC}{args.images}:{args.size}", f"data.train_size={args.train_size}",
                 "data.val_size=1000", f"train.epochs={args.epochs}", "train.device=cpu", "train.batch_size=256",
                 "train.val_every=1000", "model.widths=[32,64,128]"]
    if args.mode == "stream":
        overrides.append(f"data.device_memory={args.budget_mib}")
    cfg = load_config(HERE.parent / "configs" / "cnn.yaml", overrides)
    with tempfile.TemporaryDirectory() as out:
        s = fit(cfg, out, args.mode, quiet=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": args.mode, "images_per_s": s["images_per_second"], "peak_rss_mib": peak_mib,
                      "train_images": s["train_images"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--budget-mib", type=float, default=256)
    p.add_argument("--train-size", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--mode", choices=["mem", "stream"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return run_mode(args)
    os.environ.setdefault("CIFARLAB_CACHE", str(Path(tempfile.gettempdir()) / "cifarlab-bench-streaming"))
    gb = args.images * args.size * args.size * 3 / 1e9
    print(f"data: {args.images} images at {args.size} px ({gb:.2f} GB uint8); budget {args.budget_mib:g} MiB; "
          f"cache {os.environ['CIFARLAB_CACHE']}", flush=True)
    t0 = time.time()
    results: dict[str, list[dict]] = {"mem": [], "stream": []}
    for r in range(args.rounds):
        for mode in (("mem", "stream") if r % 2 == 0 else ("stream", "mem")):  # alternate: drift cancels
            cmd = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            res = json.loads(out)
            results[mode].append(res)
            print(f"round {r + 1} {mode:>6}: {res['images_per_s']:8.1f} images/s, peak RSS {res['peak_rss_mib']:7.0f} "
                  f"MiB ({time.time() - t0:.0f} s)", flush=True)
    mean = {m: float(np.mean([x["images_per_s"] for x in v])) for m, v in results.items()}
    peak = {m: float(max(x["peak_rss_mib"] for x in v)) for m, v in results.items()}
    print(f"in memory {mean['mem']:.1f} images/s, streamed {mean['stream']:.1f} images/s: "
          f"ratio {mean['stream'] / mean['mem']:.3f}")
    print(json.dumps({"images": args.images, "size": args.size, "budget_mib": args.budget_mib,
                      "mem_images_per_s": mean["mem"], "stream_images_per_s": mean["stream"],
                      "ratio": mean["stream"] / mean["mem"], "peak_rss_mib": peak}))


if __name__ == "__main__":
    main()
