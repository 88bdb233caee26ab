"""Muon (train/muon.py): the Newton-Schulz orthogonalization against a direct SVD, the parameter split, a
training run that learns, and a bit-exact resume."""

from __future__ import annotations

import signal

import pytest
import torch

from cifarlab.config import load_config
from cifarlab.errors import ConfigError
from cifarlab.models import create_model
from cifarlab.train.muon import CUBIC, Muon, newton_schulz
from cifarlab.train.optim import build_optimizer

from .conftest import REPO
from .interrupts import ctrl_c_at
from .test_resume import _cli, _sets, assert_same_run


@pytest.mark.parametrize("shape", [(8, 8), (6, 20), (20, 6)])
def test_newton_schulz_converges_to_the_polar_factor_of_a_direct_svd(shape):
    """The classic cubic iteration reaches U V^T exactly; Keller Jordan's quintic (5 steps) keeps U and V and
    puts every singular value in a band around 1, which is what Muon relies on."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(*shape, generator=g, dtype=torch.float64).float()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    polar = u @ vh
    torch.testing.assert_close(newton_schulz(m, steps=60, coefficients=CUBIC), polar, atol=1e-4, rtol=0)

    q = newton_schulz(m, steps=5)
    inner = u.T @ q @ vh.T  # diagonal when q = U diag(d) V^T
    d = torch.diagonal(inner)
    assert torch.all(d > 0.6) and torch.all(d < 1.25), d
    assert (inner - torch.diag(d)).abs().max() < 0.05
    assert not torch.allclose(q, polar, atol=1e-3)  # the quintic is an approximation: the test can tell


def test_muon_takes_the_filters_and_leaves_the_head_biases_and_norms_to_the_aux_optimizer():
    model = create_model("cnn", 10, widths=[8, 16, 32], hidden=32)
    cfg = load_config(None, ["optim.name=muon", "optim.lr=0.02", "optim.aux=adamw", "optim.aux_lr=0.001"])
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, Muon)
    kind = {id(p): g["kind"] for g in opt.param_groups for p in g["params"]}
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        muon = p.ndim >= 2 and not name.startswith("classifier.")
        assert kind[id(p)] == ("muon" if muon else "adamw"), name
        assert lr[id(p)] == pytest.approx(0.02 if muon else 0.001), name
    assert len(kind) == len(list(model.parameters()))  # every parameter has exactly one home


def test_the_head_can_have_its_own_lr_as_in_airbench94_muon():
    model = create_model("cnn", 10, widths=[8, 16, 32], hidden=32)
    cfg = load_config(None, ["optim.name=muon", "optim.lr=0.24", "optim.aux_lr=0.053", "optim.head_lr=0.67"])
    opt = build_optimizer(model, cfg.optim)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    head = model.model_spec.head
    for name, p in model.named_parameters():
        want = 0.67 if name.startswith(head + ".") else 0.24 if p.ndim >= 2 else 0.053
        assert lr[id(p)] == pytest.approx(want), name
    assert len(lr) == len(list(model.parameters()))


def test_normalized_muon_holds_each_filter_banks_norm_and_moves_its_direction():
    """airbench94_muon's variant: before each step the filters are rescaled to norm sqrt(out); the update is
    the orthogonalized momentum at lr, not rescaled by the shape (muon_rms_scale off)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3) * 3)
    opt = Muon([{"params": [w], "kind": "muon"}], lr=0.1, momentum=0.0, normalize=True, rms_scale=False)
    g = torch.randn_like(w)
    w.grad = g.clone()
    before = w.detach().clone()
    opt.step()
    expect = before * (8 ** 0.5 / before.norm()) - 0.1 * newton_schulz(g.reshape(8, -1)).view_as(g)
    assert torch.allclose(w.detach(), expect, atol=1e-5)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    # after a step the norm drifts by at most the update's; the next step rescales it first
    assert abs(w.detach().norm().item() - 8 ** 0.5) < 0.1 * newton_schulz(g.reshape(8, -1)).norm().item() + 1e-4


def test_bad_muon_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="optim.aux"):
        load_config(None, ["optim.name=muon", "optim.aux=lion"])
    with pytest.raises(ConfigError, match="optim.name"):
        load_config(None, ["optim.name=muom"])
    with pytest.raises(ConfigError, match="optim.head_lr"):
        load_config(None, ["optim.name=muon", "optim.head_lr=-1"])


def test_a_muon_run_learns_and_resumes_bit_exact(small_folder, tmp_path, monkeypatch, capsys):
    sets = _sets(small_folder, **{"train.epochs": 3, "optim.name": "muon", "optim.lr": 0.05, "optim.aux": "sgd",
                                  "optim.aux_lr": 0.02, "optim.schedule": "linear", "optim.weight_decay": 0.0005})
    args = ["train", "--config", str(REPO / "configs/cnn.yaml"), "--out", str(tmp_path), *sets]
    assert _cli(*args, "--name", "clean") == 0
    rows = (tmp_path / "clean" / "metrics.csv").read_text().splitlines()[1:]
    first, last = (float(r.split(",")[1]) for r in (rows[0], rows[-1]))
    assert last < first  # the training loss falls

    with ctrl_c_at(monkeypatch, epoch=1, step=3):
        assert _cli(*args, "--name", "run") == 128 + signal.SIGINT
    assert _cli("train", "--resume", str(tmp_path / "run")) == 0
    assert_same_run(tmp_path / "run", tmp_path / "clean")


def test_the_whitening_bias_can_anneal_to_zero_over_its_epochs_as_in_airbench94_muon():
    """model.whiten_bias_anneal: the stem's bias gets the BN biases' lr and decay in a group of its own, whose
    lr falls linearly to zero over whiten_bias_epochs (3 of 8 here) while the rest follow the run's schedule."""
    from cifarlab.train.optim import build_scheduler

    cfg = load_config(REPO / "configs" / "speedrun-muon.yaml", ["model.whiten_bias_anneal=true"])
    model = create_model("speednet", 10, **cfg.model.params)
    opt = build_optimizer(model, cfg.optim)
    home = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
    assert len(home) == sum(p.requires_grad for p in model.parameters())  # every trained parameter, once
    stem, norm = (opt.param_groups[home[id(p)]] for p in (model.whiten.bias, model.blocks[0].norm1.bias))
    assert stem is not norm and stem["anneal_epochs"] == 3 and "anneal_epochs" not in norm
    assert (stem["lr"], stem["weight_decay"], stem["kind"]) == (norm["lr"], norm["weight_decay"], norm["kind"])
    sched, per_step = build_scheduler(opt, cfg.optim, cfg.train.epochs, 5)
    assert per_step
    peak = stem["lr"]
    stem_lrs, norm_lrs = [], []
    for _ in range(40):
        stem_lrs.append(stem["lr"])
        norm_lrs.append(norm["lr"])
        opt.step()
        sched.step()
    assert stem_lrs[0] == norm_lrs[0] == pytest.approx(peak)
    assert stem_lrs[10] == pytest.approx(peak / 3) and all(v == 0 for v in stem_lrs[15:])
    assert norm_lrs[20] == pytest.approx(peak / 2) and norm_lrs[-1] > 0  # the run's linear decay over 40 steps
    # Off (the default): the stem's bias stays in the weights' group, on the run's schedule.
    plain = create_model("speednet", 10, **load_config(REPO / "configs" / "speedrun-muon.yaml", []).model.params)
    assert all("anneal_epochs" not in g for g in build_optimizer(plain, cfg.optim).param_groups)
