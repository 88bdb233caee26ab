"""W&B sweep files: every distribution mapped onto Optuna, every refusal named, every key checked
against the run config before a trial starts. No training here."""

import math
from pathlib import Path

import optuna
import pytest
import yaml

from cifarlab.config import RunConfig
from cifarlab.errors import ConfigError
from cifarlab.sweep import base_config, load_sweep_file, parse_sweep, run_sweep
from cifarlab.sweep.storage import make_pruner, make_sampler

from .conftest import REPO

BASE = RunConfig().validate().to_dict()  # defaults: model cnn


def spec_of(parameters, **top):
    return parse_sweep({"method": top.pop("method", "random"), "parameters": parameters, **top}, BASE)


def param(entry, name="optim.lr"):
    (p,) = spec_of({name: entry}).params
    return p


def draws(p, n=300):
    """Values an Optuna RandomSampler draws for the parameter."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        t = study.ask()
        out.append(p.suggest(t))
        study.tell(t, 0.0)
    return out


# --------------------------------------------------------------------------- distributions
def test_log_uniform_bounds_are_natural_log_exponents():
    p = param({"distribution": "log_uniform", "min": math.log(1e-4), "max": math.log(1e-2)})
    assert (p.kind, p.log) == ("float", True)
    assert p.low == pytest.approx(1e-4) and p.high == pytest.approx(1e-2)
    xs = draws(p)
    assert all(1e-4 * (1 - 1e-9) <= x <= 1e-2 * (1 + 1e-9) for x in xs)
    # log-uniform: about half the draws fall below the geometric midpoint 1e-3 (a uniform law would put ~9% there)
    assert 0.35 < sum(x < 1e-3 for x in xs) / len(xs) < 0.65


def test_log_uniform_values_and_inverse_forms():
    p = param({"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1})
    assert (p.low, p.high, p.log) == (1e-4, 1e-1, True)
    inv = param({"distribution": "inv_log_uniform_values", "min": 1e-4, "max": 1e-1})
    assert (inv.low, inv.high, inv.log) == (1e-4, 1e-1, True)  # 1/X log-uniform <=> X log-uniform, same range
    inv_exp = param({"distribution": "inv_log_uniform", "min": 2.0, "max": 5.0})  # log(1/X) ~ U(2, 5)
    assert inv_exp.low == pytest.approx(math.exp(-5)) and inv_exp.high == pytest.approx(math.exp(-2))
    assert inv_exp.log


def test_uniform_int_uniform_and_inference_from_min_max():
    u = param({"distribution": "uniform", "min": 0.1, "max": 0.4}, "model.dropout")
    assert (u.kind, u.low, u.high, u.log) == ("float", 0.1, 0.4, False)
    assert all(0.1 <= x <= 0.4 for x in draws(u, 50))
    i = param({"distribution": "int_uniform", "min": 16, "max": 64}, "model.hidden")
    assert (i.kind, i.low, i.high) == ("int", 16, 64)
    assert all(isinstance(x, int) and 16 <= x <= 64 for x in draws(i, 50))
    # W&B infers int_uniform from integer bounds and uniform from float ones
    assert param({"min": 16, "max": 64}, "model.hidden").kind == "int"
    assert param({"min": 0.1, "max": 0.5}, "model.dropout").kind == "float"


def test_q_uniform_draws_multiples_of_q():
    p = param({"distribution": "q_uniform", "min": 32, "max": 256, "q": 32}, "train.batch_size")
    assert (p.kind, p.low, p.high, p.step) == ("int", 32, 256, 32)
    assert set(draws(p, 200)) == {32, 64, 96, 128, 160, 192, 224, 256}
    f = param({"distribution": "q_uniform", "min": 0.05, "max": 0.5, "q": 0.1}, "model.dropout")
    assert (f.kind, f.low, f.high) == ("float", 0.1, 0.5)  # round(X / q) * q inside [min, max]
    assert all(abs(x / 0.1 - round(x / 0.1)) < 1e-9 for x in draws(f, 100))


def test_q_log_uniform_with_q_1_is_an_integer_log_range():
    p = param({"distribution": "q_log_uniform_values", "min": 16, "max": 1024, "q": 1}, "model.hidden")
    assert (p.kind, p.low, p.high, p.log) == ("int", 16, 1024, True)
    xs = draws(p)
    assert all(isinstance(x, int) and 16 <= x <= 1024 for x in xs)
    assert 0.35 < sum(x < 128 for x in xs) / len(xs) < 0.65  # 128 is the geometric midpoint
    e = param({"distribution": "q_log_uniform", "min": math.log(16), "max": math.log(1024)}, "model.hidden")
    assert (e.kind, e.low, e.high, e.log) == ("int", 16, 1024, True)


def test_categorical_constant_and_list_values():
    c = param({"values": [[8, 16, 32], [16, 32, 64]]}, "model.widths")
    assert c.kind == "categorical"
    assert all(x in ([8, 16, 32], [16, 32, 64]) for x in draws(c, 20))  # lists survive Optuna's storage
    spec = spec_of({"optim.lr": {"value": 0.002}, "model.dropout": {"distribution": "categorical", "values": [0.3]}})
    assert spec.constants == {"optim.lr": 0.002}
    assert [p.name for p in spec.params] == ["model.dropout"]


@pytest.mark.parametrize("entry,named", [
    ({"distribution": "normal", "mu": 0, "sigma": 1}, "'normal'"),
    ({"distribution": "q_normal", "mu": 0, "sigma": 1}, "'q_normal'"),
    ({"distribution": "log_normal", "mu": 0, "sigma": 1}, "'log_normal'"),
    ({"distribution": "q_log_normal", "mu": 0, "sigma": 1}, "'q_log_normal'"),
    ({"distribution": "beta", "a": 1, "b": 2}, "'beta'"),
    ({"values": [0.1, 0.2], "probabilities": [0.5, 0.5]}, "categorical_w_probabilities"),
    ({"distribution": "q_log_uniform_values", "min": 1e-4, "max": 1e-2, "q": 1e-4}, "'q_log_uniform_values' with q"),
    ({"distribution": "triangle", "min": 0, "max": 1}, "unknown distribution 'triangle'"),
])
def test_unsupported_distributions_are_refused_by_name(entry, named):
    with pytest.raises(ConfigError, match=named) as e:
        param(entry)
    assert "optim.lr" in str(e.value)


@pytest.mark.parametrize("entry,match", [
    ({"distribution": "log_uniform_values", "min": 0, "max": 1}, "min > 0"),
    ({"distribution": "uniform", "min": 2, "max": 1}, "above max"),
    ({"distribution": "uniform", "min": 0}, "needs min and max"),
    ({"values": []}, "non-empty"),
    ({"foo": 1}, "needs value, values, or min and max"),
    (0.1, "must be a mapping"),
])
def test_malformed_parameters(entry, match):
    with pytest.raises(ConfigError, match=match):
        param(entry)


# --------------------------------------------------------------------------- names and config
def test_unknown_config_keys_are_errors():
    with pytest.raises(ConfigError, match="optim.momentun"):
        spec_of({"optim.momentun": {"values": [0.9]}})
    with pytest.raises(ConfigError, match="model.embed_dim.*cnn"):  # the CNN has no embed_dim
        spec_of({"model.embed_dim": {"values": [32, 64]}})
    with pytest.raises(ConfigError, match="unknown sweep parameter 'colour'"):
        spec_of({"colour": {"values": [1]}})
    with pytest.raises(ConfigError, match="ambiguous.*data.seed or train.seed"):
        spec_of({"seed": {"values": [0, 1]}})


def test_values_out_of_the_configs_range_are_errors():
    with pytest.raises(ConfigError, match=r"model.dropout=1.0: model.dropout=1.0 must be in \[0, 1\)"):
        spec_of({"model.dropout": {"min": 0.0, "max": 1.0}})
    with pytest.raises(ConfigError, match="train.batch_size.*integer"):  # a float range on an integer key
        spec_of({"train.batch_size": {"distribution": "uniform", "min": 16, "max": 64}})


def test_bare_nested_and_mapped_names_resolve_to_config_keys():
    spec = spec_of({"learning_rate": {"values": [0.1]}, "batch_size": {"values": [32]}, "dropout": {"values": [0.2]},
                    "optim": {"parameters": {"gamma": {"values": [0.9]}}}, "lrdecay": {"values": [0.5]}},
                   cifarlab={"map": {"lrdecay": "optim.min_lr_ratio"}})
    assert [p.name for p in spec.params] == ["optim.lr", "train.batch_size", "model.dropout", "optim.gamma",
                                             "optim.min_lr_ratio"]


def test_method_metric_and_top_level_keys():
    assert spec_of({"optim.lr": {"values": [0.1]}}, method="bayes",
                   metric={"name": "val/accuracy", "goal": "maximize"}).metric == "val_acc"
    assert spec_of({"optim.lr": {"values": [0.1]}}, metric={"name": "val_loss"}).goal == "minimize"  # W&B's default
    with pytest.raises(ConfigError, match="method must be one of"):
        spec_of({"optim.lr": {"values": [0.1]}}, method="hyperopt")
    with pytest.raises(ConfigError, match="metric 'f1'"):
        spec_of({"optim.lr": {"values": [0.1]}}, metric={"name": "f1"})
    with pytest.raises(ConfigError, match="unknown sweep key.*paramaters"):
        spec_of({"optim.lr": {"values": [0.1]}}, paramaters={})
    # W&B's launch keys are accepted and ignored
    spec = spec_of({"optim.lr": {"values": [0.1]}}, program="train.py", command=["${env}", "${args}"], project="p")
    assert "program" not in spec.raw and "command" not in spec.raw


def test_grid_needs_finite_parameters():
    spec = spec_of({"optim.lr": {"values": [0.1, 0.01]}, "train.batch_size": {"min": 16, "max": 18},
                    "model.dropout": {"distribution": "q_uniform", "min": 0.1, "max": 0.3, "q": 0.1}}, method="grid")
    assert spec.grid_size() == 2 * 3 * 3
    assert isinstance(make_sampler(spec, 0), optuna.samplers.GridSampler)
    with pytest.raises(ConfigError, match="grid.*optim.lr.*log_uniform_values"):
        spec_of({"optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}}, method="grid")


def test_hyperband_mapping():
    p = {"optim.lr": {"values": [0.1]}}
    hb = spec_of(p, early_terminate={"type": "hyperband", "min_iter": 2, "eta": 2}).hyperband
    assert (hb.min_resource, hb.max_resource, hb.reduction_factor) == (2, None, 2)
    hb = spec_of(p, early_terminate={"type": "hyperband", "max_iter": 27, "s": 2}).hyperband
    assert (hb.min_resource, hb.max_resource, hb.reduction_factor) == (3, 27, 3)  # brackets 9, 3 as in W&B's docs
    spec = spec_of(p, early_terminate={"type": "hyperband", "min_iter": 1})
    pruner = make_pruner(spec, BASE)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert pruner._max_resource == BASE["train"]["epochs"]
    with pytest.raises(ConfigError, match="needs min_iter, or max_iter and s"):
        spec_of(p, early_terminate={"type": "hyperband", "eta": 3})
    with pytest.raises(ConfigError, match="envelope"):
        spec_of(p, early_terminate={"type": "envelope"})
    with pytest.raises(ConfigError, match="beyond train.epochs"):
        make_pruner(spec_of(p, early_terminate={"type": "hyperband", "min_iter": 50}), BASE)


# --------------------------------------------------------------------------- files
def test_shipped_sweep_files_parse():
    files = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
    names = {f.name for f in files}
    assert {"cnn-stage1.yaml", "cnn-stage2.yaml", "vit-stage1.yaml", "vit-stage2.yaml", "wandb-example.yaml"} <= names
    for f in files:
        raw = load_sweep_file(f)
        spec = parse_sweep(raw, base_config(raw, f))
        assert spec.params and spec.hyperband is not None and spec.run_cap, f
    cnn = load_sweep_file(REPO / "configs/sweeps/cnn-stage1.yaml")
    assert {p.name for p in parse_sweep(cnn, base_config(cnn, REPO / "configs/sweeps/cnn-stage1.yaml")).params} == {
        "train.batch_size", "model.dropout", "model.widths", "model.hidden"}


def test_hand_written_wandb_file_maps_every_parameter():
    f = REPO / "configs" / "sweeps" / "wandb-example.yaml"
    raw = load_sweep_file(f)
    assert "cifarlab" not in raw
    spec = parse_sweep(raw, base_config(raw, f, config=REPO / "configs" / "cnn.yaml"))
    by = {p.name: p for p in spec.params}
    assert by["optim.lr"].dist == "log_uniform" and by["optim.lr"].low == pytest.approx(1e-4, rel=1e-3)
    assert (by["train.batch_size"].low, by["train.batch_size"].step) == (32, 32)
    assert by["model.dropout"].choices == [0.2, 0.3, 0.5]
    assert spec.constants == {"train.epochs": 3}
    assert (spec.metric, spec.goal, spec.method) == ("val_loss", "minimize", "bayes")


def test_base_config_precedence(tmp_path):
    sweep = tmp_path / "s.yaml"
    raw = {"method": "random", "parameters": {"optim.lr": {"values": [0.1]}},
           "cifarlab": {"config": str(REPO / "configs" / "vit.yaml"), "set": {"train.epochs": 3}}}
    sweep.write_text(yaml.safe_dump(raw))
    base = base_config(raw, sweep)
    assert base["model"]["name"] == "vit" and base["train"]["epochs"] == 3 and base["train"]["val_every"] == 1
    base = base_config(raw, sweep, config=REPO / "configs" / "cnn.yaml", overrides=["train.epochs=2"])
    assert base["model"]["name"] == "cnn" and base["train"]["epochs"] == 2
    with pytest.raises(ConfigError, match="under 'cifarlab': colour"):
        base_config({**raw, "cifarlab": {"colour": 1}}, sweep)


def test_unknown_key_fails_before_any_trial(tmp_path):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(yaml.safe_dump({"method": "random", "run_cap": 2, "parameters": {
        "optim.lr": {"values": [0.1]}, "model.nonexistent": {"values": [1, 2]}}}))
    with pytest.raises(ConfigError, match="model.nonexistent"):
        run_sweep(sweep, out=tmp_path / "sweeps", quiet=True)
    assert not (tmp_path / "sweeps").exists()  # no study, no trial directory


def test_missing_budget_and_bad_flags(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"method": "random", "parameters": {"optim.lr": {"values": [0.1]}}}))
    with pytest.raises(ConfigError, match="no trial budget"):
        run_sweep(sweep, out=tmp_path / "sweeps", quiet=True)
    with pytest.raises(ConfigError, match="--workers"):
        run_sweep(sweep, out=tmp_path / "sweeps", workers=0, quiet=True)


def test_wandb_flag_without_wandb_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if it were not installed
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"method": "random", "run_cap": 1, "parameters": {"optim.lr": {"values": [0.1]}}}))
    with pytest.raises(Exception, match=r"pip install 'cifarlab\[wandb\]'"):
        run_sweep(sweep, out=tmp_path / "sweeps", wandb=True, quiet=True)
    assert not Path(tmp_path / "sweeps").exists()
