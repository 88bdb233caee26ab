"""Flags and configs that compose (issue 20): a model change resets the model section, short flags, schedules
that follow --epochs, one meaning per flag name, the device choice (MPS included), and renamed keys."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from cifarlab.cli.common import config_overrides
from cifarlab.cli.main import build_parser, main
from cifarlab.config import DataConfig, OptimConfig, RunConfig, load_config
from cifarlab.errors import ConfigError
from cifarlab.models import model_defaults
from cifarlab.train import runtime
from cifarlab.train.optim import build_scheduler

REPO = Path(__file__).resolve().parents[1]
CNN, CNN_STRONG = REPO / "configs" / "cnn.yaml", REPO / "configs" / "cnn-strong.yaml"


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


# --------------------------------------------------------------------------- model section
def test_model_change_keeps_only_the_new_models_keys_and_names_the_dropped(capsys):
    cnn = yaml.safe_load(CNN.read_text())["model"]
    cfg = load_config(CNN, ["model.name=resnet18"])  # was: unknown config key 'model.widths' for model 'resnet18'
    assert cfg.model.name == "resnet18" and set(cfg.model.params) <= set(model_defaults("resnet18"))
    err = capsys.readouterr().err
    dropped = [k for k in cnn if k != "name" and k not in model_defaults("resnet18")]
    assert dropped and "model.name cnn -> resnet18: dropped" in err
    assert all(f"model.{k}" in err for k in dropped)
    # Keys both models have stay (and are said to stay); the others fall back to the new model's defaults.
    cfg = load_config(CNN, ["model.name=vit"])
    assert cfg.model.params == {"dropout": cnn["dropout"]} and "kept model.dropout=0.5" in capsys.readouterr().err


def test_same_model_name_keeps_the_section_and_says_nothing(capsys):
    cfg = load_config(CNN, ["model.name=cnn"])
    assert cfg.model.params["widths"] == [64, 128, 256] and "note" not in capsys.readouterr().err
    # A YAML section whose name comes after its keys keeps them: they are the named model's.
    cfg = RunConfig.from_dict({"model": {"cifar_stem": True, "name": "resnet18"}}).validate()
    assert cfg.model.params == {"cifar_stem": True}


def test_short_flags_are_their_set_and_model_comes_before_set():
    args = _parse("train", "-c", str(CNN), "--set", "model.cifar_stem=true", "--model", "resnet18", "--lr", "0.02",
                  "--batch-size", "32", "--seed", "7", "--epochs", "3")
    overrides = config_overrides(args)
    assert overrides[0] == "model.name=resnet18"  # so that --set model.KEY applies to the new model
    cfg = load_config(args.config, overrides)
    assert (cfg.model.name, cfg.model.params, cfg.optim.lr, cfg.train.batch_size, cfg.train.seed, cfg.train.epochs) \
        == ("resnet18", {"cifar_stem": True}, 0.02, 32, 7, 3)
    sweep = _parse("sweep", "run", "s.yaml", "--model", "vit", "--lr", "0.01", "--seed", "3", "--sampler-seed", "5")
    assert sweep.sampler_seed == 5 and "train.seed=3" in config_overrides(sweep)  # --seed: one meaning


def test_data_takes_no_training_flags(capsys):
    for flag in ("--epochs", "--lr", "--model"):
        with pytest.raises(SystemExit) as e:
            _parse("data", flag, "3")
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


# --------------------------------------------------------------------------- schedules and --epochs
def _lrs(cfg: OptimConfig, epochs: int, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, per_step = build_scheduler(opt, cfg, epochs, steps)
    assert per_step
    out = []
    for _ in range(epochs * steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("epochs", [34, 5, 1])
def test_shipped_warmup_scales_with_epochs(epochs):
    cfg = load_config(CNN_STRONG, [f"train.epochs={epochs}"])
    assert cfg.optim.warmup_fraction == 0.2 and cfg.optim.warmup_epochs == 0
    lrs = _lrs(cfg.optim, epochs, steps=10)
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(1.0)  # the peak is reached in every length
    assert peak + 1 == round(0.2 * epochs * 10)  # at 20% of the run
    assert cfg.train.val_every == min(34, epochs)  # the recipe validates at its end: never past the run


def test_absolute_warmup_is_rescaled_with_one_note(tmp_path, capsys):
    f = tmp_path / "w.yaml"
    f.write_text(yaml.safe_dump({"optim": {"schedule": "cosine", "warmup_epochs": 6.0}, "train": {"epochs": 30}}))
    cfg = load_config(f, ["train.epochs=5"])
    assert cfg.optim.warmup_epochs == pytest.approx(1.0)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.warmup_epochs 6 -> 1" in err[0] and "20%" in err[0]
    # The warm-up given on the command line is taken as given.
    assert load_config(f, ["train.epochs=5", "optim.warmup_epochs=2"]).optim.warmup_epochs == 2.0
    assert load_config(f).optim.warmup_epochs == 6.0 and capsys.readouterr().err == ""  # no change, no note


def test_warmup_longer_than_the_run_is_an_error():
    with pytest.raises(ConfigError, match=r"optim.warmup_epochs=5.0 must be shorter than the run \(train.epochs=4\)"):
        load_config(None, ["optim.schedule=linear", "train.epochs=4", "optim.warmup_epochs=5"])
    with pytest.raises(ConfigError, match="optim.warmup_fraction=1.0 must be in"):
        load_config(None, ["optim.schedule=linear", "optim.warmup_fraction=1"])
    cfg = RunConfig()
    cfg.optim.schedule, cfg.optim.warmup_epochs, cfg.optim.warmup_fraction = "cosine", 1.0, 0.1  # both, directly
    with pytest.raises(ConfigError, match="both set the warm-up"):
        cfg.validate()


def test_the_last_warmup_spelling_set_wins():
    cfg = load_config(CNN_STRONG, ["optim.warmup_epochs=3"])  # the recipe's fraction gives way
    assert (cfg.optim.warmup_epochs, cfg.optim.warmup_fraction) == (3.0, 0.0)
    cfg = load_config(None, ["optim.warmup_epochs=1", "optim.warmup_fraction=0.1"])
    assert (cfg.optim.warmup_epochs, cfg.optim.warmup_fraction) == (0.0, 0.1)


def test_val_every_never_exceeds_epochs():
    assert load_config(CNN, ["train.epochs=3"]).train.val_every == 3  # cnn.yaml: every 5
    cfg = RunConfig()
    cfg.train.val_every = 11
    with pytest.raises(ConfigError, match=r"train.val_every=11 must be in \[1, train.epochs=10\]"):
        cfg.validate()


# --------------------------------------------------------------------------- renamed keys
def test_data_hflip_is_an_alias_of_augment_flip(capsys):
    cfg = load_config(None, ["data.hflip=false"])
    assert cfg.data.augment_flip is False and not hasattr(cfg.data, "hflip")
    assert "data.hflip is now data.augment_flip" in capsys.readouterr().err
    assert "augment_flip" in cfg.to_dict()["data"] and "hflip" not in cfg.to_dict()["data"]
    assert "augment_flip" in {f.name for f in dataclasses.fields(DataConfig)}


# --------------------------------------------------------------------------- devices
@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(runtime, "mps_available", lambda: mps)
    assert runtime.resolve_device("auto").type == expected


def test_mps_device_is_accepted_and_checked(monkeypatch):
    assert load_config(None, ["train.device=mps"]).train.device == "mps"
    monkeypatch.setattr(runtime, "mps_available", lambda: False)
    with pytest.raises(ConfigError, match="no MPS device"):
        runtime.resolve_device("mps")
    monkeypatch.setattr(runtime, "mps_available", lambda: True)
    assert runtime.resolve_device("mps") == torch.device("mps")
    assert runtime.resolve_precision("auto", torch.device("mps")) == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        runtime.resolve_precision("fp16", torch.device("mps"))
    with pytest.raises(ConfigError, match="must be auto, cpu, cuda, cuda:N or mps"):
        load_config(None, ["train.device=metal"])


# --------------------------------------------------------------------------- flag names and help
def _subparsers(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from _subparsers(sub, f"{prefix}{name} ")


def test_one_spelling_per_flag_across_verbs():
    seen: dict[str, set] = {}
    for verb, p in _subparsers(build_parser()):
        for a in p._actions:
            strings = set(a.option_strings)
            if "--out" in strings or "-o" in strings:
                assert {"-o", "--out"} <= strings and a.metavar == "DIR", verb  # -o everywhere --out is, a folder
            if "--tracker" in strings:
                seen.setdefault("tracker", set()).add(verb)
            if verb == "predict" and strings == {"--batch-size"}:  # predict trains nothing: its own forward passes
                assert "per forward pass" in a.help
            elif strings & {"--seed", "--epochs", "--lr", "--batch-size", "--model"}:
                assert "short for --set" in a.help, (verb, strings)
    assert {"train", "sweep run"} <= seen["tracker"]
    outs = {verb for verb, p in _subparsers(build_parser()) if any("--out" in a.option_strings for a in p._actions)}
    assert {"train", "data", "compare", "export", "sweep run", "sweep report", "sweep narrow", "sweep best"} <= outs


def test_top_level_help_describes_the_verbs_with_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "example:" in out and "cifarlab train -c configs/cnn.yaml" in out
    assert "entry point" not in out  # not the module docstring
    for verb in ("train", "evaluate", "models", "data", "report", "compare", "sweep", "predict", "export"):
        assert f"\n    {verb} " in out


def test_wandb_flag_of_sweeps_is_a_deprecated_tracker(monkeypatch, capsys):
    import cifarlab.sweep as sweep

    seen = {}
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **kw: seen.update(kw) or {"sweep_dir": "x"})
    assert main_rc(["sweep", "run", "s.yaml", "--wandb", "--tracker", "tensorboard"]) == 0
    assert seen["trackers"] == ["tensorboard", "wandb"] and "--wandb is deprecated" in capsys.readouterr().err


def main_rc(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code

