"""The CUDA path: device and precision chosen automatically, training under bf16 / fp16 (with loss
scaling) / fp32, augmentation on the GPU, checkpoints that load on a CPU, mid-epoch resume and
prediction. Skipped where no CUDA device is present (CI); run on a GPU machine with
``python -m pytest tests/test_cuda.py``. The loss-scaler choice itself is checked on any machine.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch

import cifarlab.data.loader as loader
from cifarlab.config import load_config, RunConfig, TrainConfig
from cifarlab.data.augment import BatchAugment
from cifarlab.data.loader import DeviceBatches
from cifarlab.predict import Predictor
from cifarlab.models import build_model
from cifarlab.train import fit
from cifarlab.train.checkpoint import load_checkpoint
from cifarlab.evaluation.inference import predict_logits
from cifarlab.train.runtime import Runtime, setup_runtime

from .conftest import REPO, tiny_overrides

CPU = torch.device("cpu")


def needs_cuda(test):
    """Skipped without a CUDA device; marked ``cuda``, the one kind of skip CI allows (tests/ci_skips.py)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def test_grad_scaler_only_for_fp16():
    for precision in ("fp32", "bf16"):
        assert not Runtime(CPU, precision, False).scaler.is_enabled()


@needs_cuda
def test_auto_picks_cuda_and_half_precision():
    rt = setup_runtime(TrainConfig(), "resnet18")
    assert rt.device.type == "cuda"
    assert rt.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert rt.channels_last and not setup_runtime(TrainConfig(), "vit").channels_last
    assert Runtime(rt.device, "fp16", False).scaler.is_enabled()


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_training_on_cuda_learns_and_saves_cpu_loadable_weights(small_folder, tmp_path, precision):
    cfg = load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(
        small_folder, **{"train.device": "cuda", "train.precision": precision, "train.epochs": 4,
                         "optim.lr": 3e-3, "data.translate": 2, "data.cutout": 8, "data.flip": "alternating"}))
    summary = fit(cfg, tmp_path, "run", quiet=True)
    assert summary["device"].startswith("cuda") and summary["precision"] == precision
    losses = [float(r["train_loss"]) for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))]
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    weights = ckpt["model"]
    assert all(t.device.type == "cpu" and torch.isfinite(t.float()).all() for t in weights.values())
    assert losses[-1] < losses[0]  # learns (a tiny net on 400 images: its validation accuracy is noise)


@needs_cuda
def test_gpu_augmentations_keep_shape_device_and_range():
    cfg = RunConfig().data
    cfg.translate, cfg.cutout, cfg.flip, cfg.trivial_augment, cfg.augment_p = 4, 8, "alternating", True, 0.5
    n = 256
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    batches = DeviceBatches(x, torch.arange(n) % 10, 64, mean=[0.5] * 3, std=[0.25] * 3, device="cuda",
                            shuffle=True, augment=BatchAugment(cfg, n, 0))
    for _, xb, yb in batches.epoch(0):
        assert xb.device.type == "cuda" and yb.device.type == "cuda" and xb.shape == (64, 3, 32, 32)
        assert torch.isfinite(xb).all() and xb.min() >= -2.0 - 1e-4 and xb.max() <= 2.0 + 1e-4


@needs_cuda
def test_tta_logits_on_cuda_match_the_cpu():
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / "resnet18-strong.yaml")
    model = build_model(cfg, 10).eval()
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    norm = dict(mean=[0.5] * 3, std=[0.25] * 3)
    cpu = predict_logits(model, x, DeviceBatches(x[:0], x[:0], 1, device=CPU, **norm), Runtime(CPU, "fp32", False),
                         32, "flip_translate")
    gpu_model = model.to("cuda").to(memory_format=torch.channels_last)
    gpu = predict_logits(gpu_model, x, DeviceBatches(x[:0], x[:0], 1, device="cuda", **norm),
                         Runtime(torch.device("cuda"), "fp32", True), 32, "flip_translate")
    # TF32 convolutions on the GPU: close, not equal
    assert torch.allclose(gpu.cpu(), cpu, atol=2e-2 * cpu.abs().max().item(), rtol=0)


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mid_epoch_resume_on_cuda(small_folder, tmp_path, monkeypatch, precision):
    cfg = load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(
        small_folder, **{"train.device": "cuda", "train.precision": precision, "train.epochs": 2,
                         "train.checkpoint_every_steps": 2, "train.ema": 0.9}))
    real_epoch, armed = loader.DeviceBatches.epoch, [True]

    def crashing_epoch(self, epoch, start_step=0):
        for item in real_epoch(self, epoch, start_step):
            if armed[0] and epoch == 1 and item[0] == 3:
                armed[0] = False
                raise RuntimeError("simulated crash")
            yield item

    monkeypatch.setattr(loader.DeviceBatches, "epoch", crashing_epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(cfg, tmp_path, "run", quiet=True)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["train_state"]["epoch"] == 1
    assert (ckpt["scaler"] is not None) == (precision == "fp16")  # fp16's loss scale is resumed, not restarted
    summary = fit(cfg, tmp_path, "run", resume=True, quiet=True)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]["epoch"] == 2
    assert math.isfinite(summary["best_val_acc"])


@needs_cuda
def test_predictor_on_cuda_agrees_with_cpu(trained_run, small_folder):
    images = sorted((small_folder / "test").rglob("*.jpg"))[:50]
    on_cpu = Predictor.from_run(trained_run, device="cpu").logits(images)
    on_gpu = Predictor.from_run(trained_run, device="cuda").logits(images)
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-2, rtol=1e-2)
