"""Does flushing denormal floats to zero speed up training steps of a trained model on the CPU?

    python benchmarks/denormals.py RUN_DIR --data PATH [--steps 6] [--rounds 3]

Loads RUN_DIR/last.pt (model and optimizer state of a run, e.g. one kept by
``time_to_accuracy.py --out``), then times training steps on real training images with
``torch.set_flush_denormal(False)`` (torch's default) and ``True``, alternating A, B, A, B...
in the same process so that machine noise hits both. Trained networks can produce values below
fp32's smallest normal number (1.2e-38): e.g. attention probabilities of a sharpened softmax
(exp(-88) is already denormal). x86 CPUs handle those in slow microcode unless flushed to zero.

Prints ms per step for each setting and the ratio; the last line is JSON:
``{"run": DIR, "model": NAME, "ms_per_step": {"keep": A, "flush": B}, "speedup": A / B}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cifarlab.config import RunConfig  # noqa: E402
from cifarlab.data.dataset import load_data  # noqa: E402
from cifarlab.data.loader import DeviceBatches  # noqa: E402
from cifarlab.train.checkpoint import load_checkpoint  # noqa: E402
from cifarlab.models import build_model  # noqa: E402
from cifarlab.train.optim import build_optimizer  # noqa: E402
from cifarlab.train.runtime import setup_runtime  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=6, help="timed training steps per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per setting (alternating)")
    args = p.parse_args(argv)

    ckpt = load_checkpoint(args.run_dir / "last.pt")
    cfg = RunConfig.from_dict(ckpt["config"])
    cfg.data.path = args.data
    rt = setup_runtime(cfg.train, cfg.model.name)
    data = load_data(cfg.data)
    model = build_model(cfg, data.num_classes).to(rt.device)
    model.load_state_dict(ckpt["model"])
    if rt.channels_last:  # as fit does
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.optim)
    opt.load_state_dict(ckpt["optimizer"])
    model.train()

    bs = cfg.train.batch_size
    loader = DeviceBatches(data.train_x, data.train_y, bs, mean=data.mean, std=data.std, device=rt.device,
                           shuffle=True, channels_last=rt.channels_last)  # normalized, not augmented
    batches = list(itertools.islice(loader, args.steps))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with rt.autocast():
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.train.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(*batches[0])  # warm-up (allocator, oneDNN primitives)
    times: dict[str, list[float]] = {"keep": [], "flush": []}
    for r in range(args.rounds):
        for name in ("keep", "flush"):
            torch.set_flush_denormal(name == "flush")
            t0 = time.perf_counter()
            for x, y in batches:
                step(x, y)
            times[name].append((time.perf_counter() - t0) * 1000 / len(batches))
            print(f"round {r + 1}: {name:5s} {times[name][-1]:8.1f} ms per step of {bs}", flush=True)
    torch.set_flush_denormal(False)
    ms = {k: round(statistics.median(v), 1) for k, v in times.items()}
    out = {"run": str(args.run_dir), "model": cfg.model.name, "ms_per_step": ms,
           "speedup": round(ms["keep"] / ms["flush"], 3)}
    print(f"median ms per step: keep denormals {ms['keep']}, flush to zero {ms['flush']}: "
          f"{out['speedup']}x")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
