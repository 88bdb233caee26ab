"""SpeedNet (airbench-style): forward/backward, patch-whitening init, BN settings, its place in fit,
and the time-to-accuracy benchmark end to end on a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cifarlab.config import load_config
from cifarlab.errors import ConfigError
from cifarlab.models import create_model, list_models
from cifarlab.train.checkpoint import load_weights
from cifarlab.train.loop import whitening_sample

from .conftest import REPO, load_benchmark, tiny_overrides

NARROW = {"widths": [8, 16, 16]}


def smooth_images(n=64, seed=0) -> torch.Tensor:
    """Images with strongly correlated neighbouring pixels and channels, like natural images."""
    g = torch.Generator().manual_seed(seed)
    base = F.avg_pool2d(torch.randn(n, 1, 36, 36, generator=g), 5, stride=1)  # (n, 1, 32, 32), smooth
    color = torch.randn(n, 3, 32, 32, generator=g) * 0.2
    return base.expand(n, 3, 32, 32) * torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1) + color


def stem_outputs(model, x) -> torch.Tensor:
    """The whitening conv's outputs (before bias), one row per patch position."""
    out = F.conv2d(x, model.whiten.weight)
    return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]).double()


def test_registered_with_the_other_families():
    assert "speednet" in list_models()


def test_forward_backward_on_cpu():
    torch.manual_seed(0)
    model = create_model("speednet", 10)  # default widths 64/256/256
    x = torch.randn(4, 3, 32, 32)
    model.init_whitening(x)
    logits = model(x)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert model.whiten.weight.grad is None  # frozen stem
    assert model.whiten.bias.grad is not None
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.97e6, rel=0.02)  # airbench94: ~2M


def test_stem_runs_in_fp32_under_bf16_autocast():
    """The whitening filters amplify weak patch directions ~45x: the stem must not round its input to bf16."""
    torch.manual_seed(0)
    model = create_model("speednet", 10, **NARROW)
    x = torch.randn(2, 3, 32, 32)
    model.init_whitening(x)
    seen = {}
    model.whiten.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert seen["dtype"] == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what it would be without the guard
        assert model.whiten._conv_forward(x, model.whiten.weight, model.whiten.bias).dtype == torch.bfloat16


def test_whitening_init_whitens_the_patches_of_the_init_data():
    x = smooth_images()
    model = create_model("speednet", 10, **NARROW)
    raw = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    raw_cov = raw.T @ raw / len(raw)
    assert (raw_cov - torch.eye(12, dtype=torch.float64)).abs().max() > 0.5  # far from white before

    model.init_whitening(x, eps=1e-10)
    f = stem_outputs(model, x)
    cov = f.T @ f / len(f)
    white = cov[:12, :12]
    assert torch.allclose(white, torch.eye(12, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(cov[12:, 12:], white, atol=1e-9)  # the second half is the negated first
    assert torch.allclose(model.whiten.weight[12:], -model.whiten.weight[:12])


def test_whitening_eps_damps_weak_directions_as_documented():
    """With eps, output variance along eigenvector i is lambda_i / (lambda_i + eps)."""
    x = smooth_images(seed=1)
    model = create_model("speednet", 10, **NARROW)
    eps = 5e-2
    model.init_whitening(x, eps=eps)
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    lam = torch.linalg.eigvalsh(patches.T @ patches / len(patches)).flip(0)
    f = stem_outputs(model, x)[:, :12]
    var = (f * f).mean(0)
    assert torch.allclose(var, lam / (lam + eps), atol=1e-4)


def test_whitening_from_uint8_normalizes_first():
    u8 = (smooth_images() * 40 + 128).clamp(0, 255).to(torch.uint8)
    a = create_model("speednet", 10, **NARROW)
    b = create_model("speednet", 10, **NARROW)
    a.init_whitening(u8)
    x = u8.float() / 255
    b.init_whitening((x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True))
    assert torch.allclose(a.whiten.weight, b.whiten.weight, atol=1e-4)


def test_batchnorm_settings_and_dirac_init():
    model = create_model("speednet", 10, **NARROW, bn_momentum=0.2)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 6
    for bn in bns:
        assert bn.eps == 1e-12 and bn.momentum == 0.2
        assert not bn.weight.requires_grad and bn.bias.requires_grad
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    conv = model.blocks[0].conv1  # 24 -> 8 channels: the first 8 filters are the identity on channels 0..7
    eye = torch.zeros_like(conv.weight)
    torch.nn.init.dirac_(eye)
    assert torch.equal(conv.weight, eye)
    conv2 = model.blocks[1].conv2  # 16 -> 16
    x = torch.randn(1, 16, 5, 5)
    assert torch.allclose(conv2(x), x, atol=1e-6)


def test_bad_hyperparameters_are_config_errors():
    with pytest.raises(ConfigError, match="model.widths"):
        create_model("speednet", 10, widths=[8, 16])
    with pytest.raises(ConfigError, match="bn_momentum"):
        create_model("speednet", 10, bn_momentum=0.0)
    with pytest.raises(ConfigError, match="unknown config key 'model.hidden'"):
        create_model("speednet", 10, hidden=3)


def test_fit_initialises_the_whitening_from_the_training_split(small_folder, tmp_path):
    from cifarlab.data import load_data
    from cifarlab.data.loader import DeviceBatches
    from cifarlab.train import fit

    cfg = load_config(REPO / "configs" / "speedrun.yaml", tiny_overrides(
        small_folder, **{"model.hidden": None, "model.widths": "[8, 16, 16]", "train.epochs": 1,
                         "train.batch_size": 128, "optim.warmup_epochs": 0.2, "train.val_every": 1}))
    data = load_data(cfg.data)
    summary = fit(cfg, tmp_path, "sn", data=data, quiet=True)
    tensors, meta = load_weights(Path(summary["run_dir"]) / "best.safetensors")
    assert meta["model"] == "speednet"
    ref = create_model("speednet", 10, **NARROW)
    norm = DeviceBatches(data.train_x[:0], data.train_y[:0], 1, mean=data.mean, std=data.std, device="cpu")
    pick = whitening_sample(len(data.train_x), 5000, cfg.train.seed)
    ref.init_whitening(norm.normalize(data.train_x[pick]))
    assert torch.allclose(tensors["whiten.weight"].float(), ref.whiten.weight, atol=1e-5)


def test_whitening_sample_draws_from_every_class_not_the_first_in_file_order():
    labels = torch.arange(10).repeat_interleave(4000)  # a class-sorted training split, as load_data keeps it
    pick = whitening_sample(len(labels), 5000, seed=0)
    assert len(pick) == 5000 and len(set(pick.tolist())) == 5000
    counts = torch.bincount(labels[pick], minlength=10)
    assert counts.min() > 400 and counts.max() < 600  # ~500 each; labels[:5000] would be 4000 / 1000 / 0 ...
    assert torch.equal(pick, whitening_sample(len(labels), 5000, seed=0))
    assert not torch.equal(pick, whitening_sample(len(labels), 5000, seed=1))


def test_time_to_accuracy_end_to_end(small_folder, capsys):
    bench = load_benchmark("time_to_accuracy")
    over = tiny_overrides(small_folder, **{"model.hidden": None, "model.widths": "[8, 16, 16]", "train.epochs": 2,
                                          "train.batch_size": 128, "optim.warmup_epochs": 0.4})
    argv = [str(REPO / "configs" / "speedrun.yaml"), "--target", "0.05"] + [a for o in over for a in ("--set", o)]
    summary = bench.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == summary
    assert list(summary) == ["config", "minutes_to", "target", "final_test_acc", "train_minutes", "eval_minutes"]
    assert list(summary["minutes_to"]) == ["0.73", "0.77", "0.78", "target"]
    assert summary["target"] == 0.05 and 0.0 <= summary["final_test_acc"] <= 1.0
    # a 5% target is reached at the first scored epoch: its time is that epoch's training time
    assert summary["minutes_to"]["target"] is not None
    assert 0 < summary["minutes_to"]["target"] <= summary["train_minutes"]
    assert sum(1 for line in lines if line.startswith("epoch ")) == 2
    assert summary["eval_minutes"] > 0


def test_time_to_accuracy_marks_and_seed_summary():
    bench = load_benchmark("time_to_accuracy")
    curve = [(1, 0.5, 0.70), (2, 1.0, 0.775), (3, 1.5, 0.79)]
    assert bench.first_reached(curve, 0.73) == 1.0
    assert bench.first_reached(curve, 0.78) == 1.5
    assert bench.first_reached(curve, 0.9) is None
    runs = [{"minutes_to": {"0.73": 1.0, "target": None}, "final_test_acc": 0.8, "train_minutes": 2.0,
             "eval_minutes": 1.0},
            {"minutes_to": {"0.73": 2.0, "target": 3.0}, "final_test_acc": 0.9, "train_minutes": 4.0,
             "eval_minutes": 1.0}]
    s = bench.summarize("c.yaml", 0.94, runs)
    assert s["minutes_to"] == {"0.73": 1.5, "target": None}  # null unless every seed reached it
    assert s["final_test_acc"] == pytest.approx(0.85) and s["final_test_acc_std"] == pytest.approx(0.0707, abs=1e-4)
    assert s["seeds"] == 2 and s["minutes_to_per_seed"]["target"] == [None, 3.0]


def test_time_to_accuracy_probe_needs_no_data():
    bench = load_benchmark("time_to_accuracy")
    res = bench.main([str(REPO / "configs" / "speedrun.yaml"), "--probe", "2", "--set", "model.widths=[8, 16, 16]",
                      "--set", "train.batch_size=32", "--set", "train.precision=fp32", "--set", "train.device=cpu"])
    assert res["batch_size"] == 32 and res["images_per_second"] > 0
    assert res["run_minutes"] == pytest.approx(res["minutes_per_epoch"] * 18, rel=1e-3)  # speedrun: 18 epochs
    assert res["eval_minutes_per_epoch"] > 0 and res["train_cpu_ms_per_image"] > 0


def test_denormals_benchmark_times_both_settings_and_restores_the_default(trained_run, small_folder, capsys):
    out = load_benchmark("denormals").main([str(trained_run), "--data", str(small_folder), "--steps", "1", "--rounds", "2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert out["model"] == "cnn" and set(out["ms_per_step"]) == {"keep", "flush"}
    assert all(v > 0 for v in out["ms_per_step"].values())
    assert (torch.tensor([1e-40]) * 1.0).item() != 0.0  # flush-to-zero is off again afterwards


def test_epochs_for_minutes_is_the_time_budget_plan(small_folder, tmp_path, monkeypatch):
    """--epochs-for-minutes sizes the run with cifarlab train --time's plan: the same steps, epochs and warm-up
    as a --time run of the same config (fixed step costs, as in tests/test_time_budget.py)."""
    import yaml

    from cifarlab.data import load_data
    from cifarlab.train import budget, fit

    monkeypatch.setattr(budget, "_time_steps", lambda parts: 0.05)
    monkeypatch.setattr(budget, "_time_validation", lambda parts: 0.2)
    monkeypatch.setattr(budget.time, "perf_counter", lambda: 0.0)
    monkeypatch.setattr(budget, "_step_clock", lambda: 0.0)  # the --time run's own steps: no correction
    bench = load_benchmark("time_to_accuracy")
    over = tiny_overrides(small_folder, **{"train.epochs": 20, "optim.schedule": "linear", "optim.warmup_epochs": 4})
    cfg = load_config(REPO / "configs" / "cnn.yaml", over)
    sized, line = bench.size_to_minutes(cfg, load_data(cfg.data), 0.05)
    fit(load_config(REPO / "configs" / "cnn.yaml", over + ["train.time_budget=3s", "train.val_every=20"]),
        tmp_path, "timed", quiet=True)
    timed = yaml.safe_load((tmp_path / "timed" / "config.yaml").read_text())
    assert (sized.train.steps, sized.train.epochs) == (timed["train"]["steps"], timed["train"]["epochs"])
    assert sized.optim.warmup_epochs == timed["optim"]["warmup_epochs"] < 4  # the same share of fewer epochs
    assert 1 < sized.train.epochs < 20 and sized.train.val_every == sized.train.epochs
    assert f"-> {sized.train.epochs} epochs in 0.05 min (train.epochs={sized.train.epochs} optim.warmup_epochs=" \
           f"{sized.optim.warmup_epochs}), {sized.train.steps} steps" in line
    assert cfg.train.epochs == 20 and not cfg.train.steps  # the input is left as it was


def test_time_to_accuracy_sizes_the_run_from_a_probe(small_folder, capsys):
    bench = load_benchmark("time_to_accuracy")
    over = tiny_overrides(small_folder, **{"model.hidden": None, "model.widths": "[8, 16, 16]", "train.epochs": 5,
                                          "train.batch_size": 128, "optim.warmup_epochs": 1.0})
    argv = [str(REPO / "configs" / "speedrun.yaml"), "--target", "0.05", "--epochs-for-minutes", "1e-6"]
    summary = bench.main(argv + [a for o in over for a in ("--set", o)])
    out = capsys.readouterr().out
    assert "-> 1 epochs in 1e-06 min (train.epochs=1 optim.warmup_epochs=0.2)" in out
    assert sum(1 for line in out.splitlines() if line.startswith("epoch ")) == 1
    assert summary["train_minutes"] > 0


def test_fit_with_progressive_resizing_trains_small_and_evaluates_full_size(small_folder, tmp_path):
    from cifarlab.train import fit

    cfg = load_config(REPO / "configs" / "speedrun.yaml", tiny_overrides(
        small_folder, **{"model.hidden": None, "model.widths": "[8, 16, 16]", "train.epochs": 2,
                         "train.batch_size": 128, "optim.warmup_epochs": 0.2, "train.val_every": 1,
                         "data.progressive_size": 16, "data.progressive_until": 0.5}))
    seen = []
    summary = fit(cfg, tmp_path, "prog", quiet=True, on_epoch_end=lambda e, row: seen.append(row["val_acc"]))
    assert len(seen) == 2 and all(0.0 <= a <= 1.0 for a in seen)  # validation at 32 px after a 16 px epoch
    assert (Path(summary["run_dir"]) / "best.safetensors").exists()


def test_probe_prices_progressive_resizing_by_its_pixels():
    bench = load_benchmark("time_to_accuracy")
    cfg = load_config(REPO / "configs" / "speedrun.yaml", ["train.device=cpu", "train.precision=fp32",
                                                           "model.widths=[8, 16, 16]", "train.batch_size=32",
                                                           "train.epochs=12"])
    prog = load_config(REPO / "configs" / "speedrun.yaml", ["train.device=cpu", "train.precision=fp32",
                                                            "model.widths=[8, 16, 16]", "train.batch_size=32",
                                                            "train.epochs=12", "data.progressive_size=16", "data.image_size=32"])
    a, b = bench.probe(cfg, 3), bench.probe(prog, 3)
    from cifarlab.data.augment import progressive_cost

    ratio = progressive_cost(prog.data, 12)
    assert ratio < 0.7
    assert b["run_minutes"] == pytest.approx(b["minutes_per_epoch"] * 12 * ratio)
    assert a["run_minutes"] == pytest.approx(a["minutes_per_epoch"] * 12)


def test_jpeg_reencode_loses_more_at_lower_quality_and_keeps_shapes():
    bench = load_benchmark("jpeg_sensitivity")
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8, generator=g), size=32, mode="bilinear")
    x = (smooth * 255).round().to(torch.uint8)  # smooth images, like photos: JPEG's good case
    err = {}
    for q, sub in ((95, 0), (75, 2), (20, 2)):
        y = bench.reencode(x, q, sub)
        assert y.shape == x.shape and y.dtype == torch.uint8
        err[q] = (y.float() - x.float()).abs().mean().item()
    assert 0 < err[95] < err[75] < err[20]


def test_jpeg_sensitivity_end_to_end(small_folder, capsys):
    bench = load_benchmark("jpeg_sensitivity")
    out = bench.main(["configs/speedrun.yaml", "--qualities", "30", "--data", str(small_folder), "--set",
                      "model.widths=[8, 16, 16]", "--set", "data.train_size=400", "--set", "data.val_size=200",
                      "--set", "train.epochs=1", "--set", "train.batch_size=128", "--set", "train.device=cpu",
                      "--set", "train.precision=fp32", "--set", "optim.warmup_epochs=0.2"])
    assert set(out["acc"]) == {"stored", "q95-444", "q30"}
    assert out["drop_points"]["q30"] == pytest.approx(100 * (out["acc"]["stored"] - out["acc"]["q30"]), abs=0.01)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out


def test_whiten_bias_trains_for_its_epochs_then_stays(small_folder, tmp_path):
    """model.whiten_bias_epochs=1 (airbench94: 3): the stem bias moves in epoch 1 and never after; None: always."""
    from cifarlab.data import load_data
    from cifarlab.train import fit
    from cifarlab.train.checkpoint import load_checkpoint

    biases = {}
    for n in (1, None):
        cfg = load_config(REPO / "configs" / "speedrun.yaml", tiny_overrides(
            small_folder, **{"model.hidden": None, "model.widths": "[8, 16, 16]", "train.epochs": 3,
                             "train.batch_size": 128, "optim.warmup_epochs": 0.2, "train.val_every": 3,
                             "train.lookahead": 0.0, "model.whiten_bias_epochs": "null" if n is None else n}))
        data = load_data(cfg.data)
        seen = []
        run = tmp_path / f"sn{n}"
        # after each epoch (its checkpoint is written before the callback), the stem bias
        fit(cfg, tmp_path, run.name, data=data, quiet=True,
            on_epoch_end=lambda e, row: seen.append(load_checkpoint(run / "last.pt")["model"]["whiten.bias"].clone()))
        biases[n] = seen
    assert biases[1][0].abs().sum() > 0  # trained in the first epoch (it starts at zero)
    assert torch.equal(biases[1][0], biases[1][1]) and torch.equal(biases[1][1], biases[1][2])
    assert not torch.equal(biases[None][1], biases[None][2])
    with pytest.raises(ConfigError, match="whiten_bias_epochs"):
        create_model("speednet", 10, whiten_bias_epochs=-1)


def test_head_std_rescales_the_heads_initial_weights_and_bad_values_are_refused():
    plain = create_model("speednet", 10, widths=[8, 16, 16])
    unit = create_model("speednet", 10, widths=[8, 16, 16], head_std=1.0)
    assert abs(float(unit.head.weight.std()) - 1.0) < 1e-5 and float(plain.head.weight.std()) < 0.5
    with pytest.raises(ConfigError, match="model.head_std"):
        load_config(None, ["model.name=speednet", "model.head_std=-1"])
