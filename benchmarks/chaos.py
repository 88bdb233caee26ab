"""Kill a real `cifarlab train` process at random moments, resume it, and compare the end with a run that
was never interrupted.

    python benchmarks/chaos.py --kills 30 [--data PATH] [--seed S] [--work DIR]

A small run (the study's CNN, narrowed; a few hundred images of the JPEG folder; an EMA, a lookahead and a
per-step cosine schedule with warm-up, i.e. every piece of state a resume must restore; a checkpoint every
few steps) is trained once without interruption: its process life T (start to exit, data decode included)
is the window the kill moments are drawn from. Then, N times: start the run (``cifarlab train --name ...``,
or ``--resume RUN_DIR`` once the run directory holds a config.yaml), SIGKILL it at a moment drawn
uniformly over [0, T) after its start -- while Python imports torch, while the JPEGs are decoded and the
cache is written (each cycle starts on a cold, private CIFARLAB_CACHE), between the run directory's
creation and the first step, inside a checkpoint write, at the final summary -- and resume. A draw the
process outlives is no kill: that run has finished, it is compared with the uninterrupted one, and the next
cycle starts a new run (and when it lasted less than T, T becomes its life: the load of a shared machine
varies). ``exact`` counts the kills whose cycle ended with the same ``metrics.csv`` (the
wall-clock ``seconds`` column aside) and bit-identical best weights (every tensor of ``best.safetensors``;
the file's bytes differ because safetensors writes its metadata map in a random order).

Progress goes to stderr, one line per kill; the last line of stdout is JSON:
``{"kills": N, "exact": K, "moments_s": [...]}``. tests/test_chaos.py drives the same functions.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("CIFARLAB_TEST_DATA", REPO.parent / "shared" / "datasets" / "cifar10-jpeg"))
CLOCK = {"seconds"}  # wall-clock columns of metrics.csv: they differ between any two runs

# A few seconds of training on the CPU with every piece of resumable state (cf. tests/test_resume.py).
SETTINGS = {"data.train_size": 400, "data.val_size": 100, "train.epochs": 3, "train.batch_size": 8,
            "train.eval_batch_size": 256, "train.val_every": 1, "train.precision": "fp32", "train.device": "cpu",
            "train.num_threads": 1, "model.widths": "[8, 16, 32]", "model.hidden": 32, "train.ema": 0.9,
            "train.lookahead": 0.9, "train.lookahead_every": 3, "optim.schedule": "cosine",
            "optim.warmup_epochs": 0.5, "train.log_every": 5}


def make_subset(src: Path, dst: Path, n_train: int, n_test: int) -> Path:
    """An image folder of the first n images per class of ``src`` (symbolic links: nothing is copied)."""
    for split, n in (("train", n_train), ("test", n_test)):
        for cls_dir in sorted((src / split).iterdir()):
            out = dst / split / cls_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                (out / f.name).symlink_to(f)
    return dst


def train_command(data: Path, out: Path, name: str, checkpoint_every: int, **extra) -> list[str]:
    sets = {**SETTINGS, "data.path": str(data), "train.checkpoint_every_steps": checkpoint_every, **extra}
    return [sys.executable, "-m", "cifarlab", "train", "--config", str(REPO / "configs" / "cnn.yaml"), "--out",
            str(out), "--name", name, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def env_with(cache: Path) -> dict[str, str]:
    env = {**os.environ, "CIFARLAB_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("CIFARLAB_DATA", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    return env


def run_to_end(cmd: list[str], env: dict[str, str], log: Path, timeout: float = 600) -> float:
    """Run a command to its end; returns its life in seconds (raises on a non-zero exit)."""
    t0 = time.monotonic()
    with open(log, "ab") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {rc}; see {log}")
    return time.monotonic() - t0


def start_and_kill(cmd: list[str], env: dict[str, str], moment: float, log: Path) -> tuple[bool, int]:
    """Start ``cmd`` and SIGKILL it ``moment`` s after its start.

    Returns (killed, exit status); killed is False when the process ended before the moment came.
    """
    with open(log, "ab") as f:
        f.write(f"\n--- {' '.join(cmd[3:5])} ... (kill at {moment:.2f}s)\n".encode())
        f.flush()
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            return False, proc.wait(timeout=max(0.0, moment - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            return True, proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()


def cache_state(cache: Path) -> str:
    """The decode cache a kill left: none, whole, or temp files of a cut write."""
    npz = list(cache.glob("decoded/*/data.npz"))
    tmp = list(cache.glob("decoded/*/*.tmp"))
    state = "whole" if npz and list(cache.glob("decoded/*/meta.json")) else "not written yet"
    return f"cache {state}" + (f", {len(tmp)} temp file(s) of a cut cache write" if tmp else "")


def describe(run_dir: Path, cache: Path | None = None) -> str:
    """What a kill left in the run directory (and, before it exists, in the cache), in a few words."""
    if not run_dir.is_dir():
        return "no run dir" + (f" ({cache_state(cache)})" if cache is not None else "")
    names = sorted(p.name for p in run_dir.iterdir())
    real = [n for n in names if not (n.startswith(".") and n.endswith(".tmp"))]
    tmp = len(names) - len(real)
    if not real:
        what = "empty run dir"
    elif "last.pt" not in real and "last.prev.pt" not in real:
        what = "no checkpoint (" + ", ".join(real) + ")"
    else:
        try:
            if str(REPO / "src") not in sys.path:
                sys.path.insert(0, str(REPO / "src"))
            from cifarlab.train.resume import find_checkpoint

            state, path, _ = find_checkpoint(run_dir)
            st = state["train_state"] if state else None
            what = f"{path.name} at epoch {st['epoch']} step {st['step']}" if st else "no usable checkpoint"
        except Exception as e:  # the description is for people; the comparison decides
            what = f"checkpoint unreadable here ({type(e).__name__})"
        if "summary.json" in real:
            what += ", summary.json"
    return what + (f", {tmp} temp file(s) of a cut write" if tmp else "")


def metrics_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in CLOCK} for r in csv.DictReader(f)]


def same_result(a: Path, b: Path) -> list[str]:
    """The differences between two finished runs' results: metrics.csv (clock aside), best weights (every
    tensor, bit for bit), best.json, summary.json (clock aside). Empty when they are the same run."""
    from safetensors.torch import load_file
    import torch

    diffs = []
    if metrics_rows(a) != metrics_rows(b):
        diffs.append("metrics.csv")
    wa, wb = load_file(str(a / "best.safetensors")), load_file(str(b / "best.safetensors"))
    if sorted(wa) != sorted(wb) or any(not torch.equal(wa[k], wb[k]) for k in wa):
        diffs.append("best.safetensors")
    if json.loads((a / "best.json").read_text()) != json.loads((b / "best.json").read_text()):
        diffs.append("best.json")
    clock = {"train_seconds", "images_per_second", "wall_seconds", "run_dir"}
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    if {k: v for k, v in sa.items() if k not in clock} != {k: v for k, v in sb.items() if k not in clock}:
        diffs.append("summary.json")
    return diffs


@dataclass
class Kill:
    moment: float  # seconds after the start of the process it hit
    process: str  # "new" (train --name) or "resume"
    left: str  # what the run directory held afterwards
    cold: bool  # the cycle's cache was cold when its first process started

    def line(self) -> str:
        return f"kill at {self.moment:5.2f} s into {self.process:<6} -> {self.left}"


@dataclass
class Cycle:
    """One run taken through kills to its end."""

    kills: list[Kill] = field(default_factory=list)
    missed: list[float] = field(default_factory=list)  # moments the process outlived
    ran: float | None = None  # life of a first process that outlived its moment (start to exit)
    diffs: list[str] | None = None  # None: not compared yet


def chaos_cycle(new_cmd: list[str], run_dir: Path, env: dict[str, str], draw: Callable[[], float], kills: int,
                log: Path, say: Callable[[str], None] = lambda s: None, cold: bool = False) -> Cycle:
    cache = Path(env["CIFARLAB_CACHE"])
    """Kill the run ``kills`` times at moments from ``draw()`` (fewer if it finishes first), then resume it to
    its end. A process that ends before its moment counts no kill."""
    cycle = Cycle()
    resume_cmd = new_cmd[:3] + ["train", "--resume", str(run_dir)]
    while len(cycle.kills) < kills:
        started = (run_dir / "config.yaml").is_file()  # else: the run never wrote a file; run the command again
        cmd = resume_cmd if started else new_cmd
        moment = draw()
        t0 = time.monotonic()
        killed, rc = start_and_kill(cmd, env, moment, log)
        if not killed:
            if not cycle.kills:
                cycle.ran = time.monotonic() - t0
            if rc != 0:
                raise RuntimeError(f"{'resume' if started else 'run'} exited {rc} without a kill; see {log}")
            cycle.missed.append(moment)
            say(f"  draw {moment:5.2f} s: the {'resume' if started else 'run'} ended first")
            break
        k = Kill(moment, "resume" if started else "new", describe(run_dir, cache), cold and not cycle.kills)
        cycle.kills.append(k)
        say("  " + k.line())
    else:
        run_to_end(resume_cmd if (run_dir / "config.yaml").is_file() else new_cmd, env, log)
    return cycle


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=30, help="random kills in all (default 30)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the JPEG image folder of CIFAR-10")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--per-run", type=int, default=3, help="most kills before a run is let finish (default 3)")
    ap.add_argument("--epochs", type=int, default=6, help="epochs of the run (default 6: on a loaded 2-core CPU, "
                    "about half the process life is training)")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="cifarlab-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    try:
        data = make_subset(args.data, work / "data", 50, 10) if not (work / "data").is_dir() else work / "data"
        log = work / "log.txt"
        ref = work / "runs" / "clean"
        shutil.rmtree(ref, ignore_errors=True)
        epochs = {"train.epochs": args.epochs}
        life = run_to_end(train_command(data, work / "runs", "clean", 4, **epochs), env_with(work / "cache-clean"), log)
        say(f"uninterrupted run: {life:.1f} s from start to exit (cold cache); kill moments drawn from [0, {life:.1f}) s")
        moments, exact, n, where = [], 0, 0, {}
        while n < args.kills:
            name = f"run{n:03d}"
            every = rng.choice([1, 2, 3, 5])  # the checkpoint interval does not change the result
            cache = work / f"cache-{name}"  # each run starts on a cold cache of its own
            run_dir = work / "runs" / name
            kills = min(args.kills - n, rng.randint(1, args.per_run))
            say(f"{name}: checkpoint every {every} steps, up to {kills} kill(s), cold cache")
            cycle = chaos_cycle(train_command(data, work / "runs", name, every, **epochs), run_dir, env_with(cache),
                                lambda: rng.uniform(0, life), kills, log, say, cold=True)
            if cycle.ran is not None and cycle.ran < life:  # the machine got faster (a shared machine's load
                life = cycle.ran                             # varies): draw from the life seen now
                say(f"  a run now lasts {life:.1f} s: kill moments drawn from [0, {life:.1f}) s from here")
            if not cycle.kills:  # the only draw came after the run ended: draw again on a new run
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.rmtree(cache, ignore_errors=True)
                continue
            diffs = same_result(run_dir, ref)
            n += len(cycle.kills)
            moments += [round(k.moment, 2) for k in cycle.kills]
            for k in cycle.kills:
                w = ("before the run dir" if k.left.startswith("no run dir") else "no checkpoint yet"
                     if k.left.startswith(("empty", "no checkpoint")) else "after a checkpoint")
                where[w] = where.get(w, 0) + 1
            exact += 0 if diffs else len(cycle.kills)
            say(f"  {'exact' if not diffs else 'DIFFERS: ' + ', '.join(diffs)} ({n}/{args.kills} kills)")
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
        say("where the kills landed: " + ", ".join(f"{c} x {w}" for w, c in sorted(
            where.items(), key=lambda x: -x[1])))
        result = {"kills": n, "exact": exact, "moments_s": moments}
        print(json.dumps(result))
        return result
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
