"""DistributedDataParallel for real: two gloo processes on the CPU, started by torchrun.

The equivalence being tested: K processes with batch B each take, at every step, the same
global batch of K*B images that one process with batch K*B takes (see DeviceBatches.order),
and DDP averages their gradients, which is the gradient of that global batch. So with no
randomness inside a step (dropout 0, no augmentation) and no BatchNorm (whose statistics
would be per process), both runs follow the same trajectory up to float summation order.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifarlab.config import load_config
from cifarlab.data.loader import DeviceBatches
from cifarlab.train import fit
from cifarlab.train.checkpoint import load_checkpoint

from .conftest import tiny_overrides

# A ViT without dropout on the default config (no augmentation): no BatchNorm, no randomness inside a step.
VIT = {"model.name": "vit", "model.widths": None, "model.hidden": None, "model.patch_size": 4, "model.embed_dim": 32,
       "model.num_encoder_layers": 2, "model.num_heads": 2, "model.head_dim": 16, "model.hidden_layer_depth": 64,
       "model.mlp_head_hidden_layer_depth": 64, "model.dropout": 0.0, "optim.lr": 0.003,
       "data.train_size": 256, "data.val_size": 100, "train.epochs": 3}
B = 32  # per process; the single process takes 2 * B
# Float32 sums in another order, 12 AdamW steps: observed differences are ~1e-7 in the losses and ~1e-6
# in the weights; a run that sees other batches differs by ~1e-3 in the losses (checked below).
LOSS_TOL = 2e-5
WEIGHT_TOL = 1e-4
WORLD = 2


def _overrides(data: Path, batch: int, **extra) -> list[str]:
    return tiny_overrides(data, **{**VIT, "train.batch_size": batch, **extra})


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items() if k not in ("seconds",) and v != ""} for r in csv.DictReader(f)]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if sys.platform == "linux":  # gloo on the loopback device: CI containers' host names may not resolve
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)  # a deadlock guard


def _max_curve_diff(a: list[dict], b: list[dict]) -> float:
    assert len(a) == len(b)
    keys = ("train_loss", "val_loss")
    return max(abs(ra[k] - rb[k]) for ra, rb in zip(a, b) for k in keys)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_batches_together_are_the_single_process_batch(world):
    n = 200
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    y = torch.arange(n)
    kw = dict(mean=[0.5] * 3, std=[0.25] * 3, device="cpu", shuffle=True, drop_last=True, seed=7)
    single = DeviceBatches(x, y, 8 * world, **kw)
    ranks = [DeviceBatches(x, y, 8, rank=r, world_size=world, **kw) for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)
    for epoch in (0, 1):
        per_rank = [[yb for _, _, yb in r.epoch(epoch)] for r in ranks]
        for k, (_, _, yb) in enumerate(single.epoch(epoch)):
            union = torch.cat([batches[k] for batches in per_rank])
            assert sorted(union.tolist()) == sorted(yb.tolist())
            assert len(set(union.tolist())) == len(union)  # no image twice in a global batch


def test_two_gloo_processes_match_one_process_with_the_global_batch(small_folder, tmp_path):
    single = fit(load_config(None, _overrides(small_folder, WORLD * B)), tmp_path / "single", "run", quiet=True)
    # A control run that sees other batches (B instead of 2B): the tolerance must be able to tell them apart.
    other = fit(load_config(None, _overrides(small_folder, B)), tmp_path / "other", "run", quiet=True)

    out = tmp_path / "ddp"
    sets = [a for o in _overrides(small_folder, B) for a in ("--set", o)]
    proc = _torchrun(["-m", "cifarlab", "train", *sets, "--out", str(out), "--evaluate"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # every rank used rank 0's timestamped run name
    ddp = runs[0]
    assert (ddp / "test_metrics.json").is_file()  # --evaluate ran (on rank 0) after the DDP run
    assert "2 processes" in proc.stdout + proc.stderr

    a, b = _metrics(Path(single["run_dir"])), _metrics(ddp)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2, 3]
    assert _max_curve_diff(a, b) < LOSS_TOL, (a, b)
    for ra, rb in zip(a, b):
        assert ra["train_acc"] == rb["train_acc"] and ra["val_acc"] == rb["val_acc"]
    assert _max_curve_diff(a, _metrics(Path(other["run_dir"]))) > 50 * LOSS_TOL

    wa = load_checkpoint(Path(single["run_dir"]) / "last.pt")
    wb = load_checkpoint(ddp / "last.pt")
    for k, v in wa["model"].items():
        torch.testing.assert_close(wb["model"][k], v, rtol=0, atol=WEIGHT_TOL, msg=k)
    assert wb["train_state"]["global_step"] == wa["train_state"]["global_step"] == 3 * (256 // (WORLD * B))


RESUME_SCRIPT = """
import sys
import cifarlab.data.loader as loader
from cifarlab.config import load_config
from cifarlab.train import distributed as dist, fit

out, overrides = sys.argv[1], sys.argv[2:]
real_epoch, armed = loader.DeviceBatches.epoch, [True]


def crashing_epoch(self, epoch, start_step=0):  # every rank crashes at the same step, after a checkpoint
    for item in real_epoch(self, epoch, start_step):
        if armed[0] and epoch == 1 and item[0] == 2:
            armed[0] = False
            raise RuntimeError("simulated crash")
        yield item


loader.DeviceBatches.epoch = crashing_epoch
cfg = load_config(None, overrides)
try:
    try:
        fit(cfg, out, "run", quiet=True)
        raise SystemExit("the crash did not happen")
    except RuntimeError:
        pass
    fit(cfg, out, "run", resume=True, quiet=True)
finally:
    dist.cleanup()
"""


@pytest.mark.slow
def test_ddp_resume_mid_epoch_continues_the_same_trajectory(small_folder, tmp_path):
    """A DDP run that crashes mid-epoch 2 (checkpoint every 3 steps) and resumes ends where one process does.

    The epoch it resumes in sums the loss of the steps before the crash (saved summed over ranks) and after.
    """
    straight = fit(load_config(None, _overrides(small_folder, WORLD * B)), tmp_path / "straight", "run", quiet=True)
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    proc = _torchrun([str(script), str(tmp_path / "ddp"),
                      *_overrides(small_folder, B, **{"train.checkpoint_every_steps": 3})], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "run" / "last.pt")
    assert ckpt["train_state"]["epoch"] == 3
    a, b = _metrics(Path(straight["run_dir"])), _metrics(tmp_path / "ddp" / "run")
    assert _max_curve_diff(a, b) < LOSS_TOL, (a, b)
