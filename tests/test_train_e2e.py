"""A short end-to-end `train` and `evaluate` on a few hundred shared images, through the CLI."""

import csv
import json
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from cifarlab.cli.main import main
from cifarlab.config import load_config
from cifarlab.train import fit

from .conftest import REPO, tiny_overrides, tiny_set_args


def _cli(*args) -> int:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


def test_train_and_evaluate_cli(small_folder, tmp_path, capsys):
    sets = tiny_set_args(small_folder, **{"train.epochs": 3, "train.val_every": 2, "data.augment_p": 0.5})
    rc = _cli("train", "--config", str(REPO / "configs/cnn.yaml"), "--out", str(tmp_path), "--name", "r", *sets)
    assert rc == 0
    run = tmp_path / "r"
    for f in ("config.yaml", "metrics.csv", "best.safetensors", "best.json", "last.pt", "summary.json"):
        assert (run / f).is_file(), f
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["val_acc"] == "" and rows[1]["val_acc"] != "" and rows[2]["val_acc"] != ""  # every 2 + last
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["train_size"] == 400 and cfg["model"]["name"] == "cnn"
    meta = json.loads((run / "best.json").read_text())
    assert meta["classes"][0] == "airplane" and len(meta["mean"]) == 3 and meta["model"] == "cnn"
    assert set(load_file(run / "best.safetensors")) >= {"features.0.weight", "classifier.4.weight"}
    summary = json.loads((run / "summary.json").read_text())
    best = max(float(r["val_acc"]) for r in rows if r["val_acc"])
    assert summary["best_val_acc"] == pytest.approx(best)

    capsys.readouterr()
    assert _cli("evaluate", str(run)) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "airplane" in out
    res = json.loads((run / "test_metrics.json").read_text())
    assert res["num_test"] == 200 and 0.0 <= res["test_acc"] <= 1.0
    import numpy as np

    z = np.load(run / "test_logits.npz")
    assert z["logits"].shape == (200, 10) and z["labels"].shape == (200,)
    assert res["test_acc"] == pytest.approx(float((z["logits"].argmax(1) == z["labels"]).mean()))


def test_seeded_runs_repeat(small_folder, tmp_path):
    def run(name):
        cfg = load_config(REPO / "configs/cnn.yaml", tiny_overrides(small_folder, **{"data.augment_p": 0.5}))
        fit(cfg, tmp_path, name, quiet=True)
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(tmp_path / name / "metrics.csv"))]

    assert run("a") == run("b")


def test_learns_something(small_folder, tmp_path):
    """Five epochs on 400 images must beat chance (10%) clearly on the validation split."""
    cfg = load_config(REPO / "configs/cnn.yaml", tiny_overrides(small_folder, **{"train.epochs": 5,
                                                                                "model.widths": "[16, 32, 64]"}))
    summary = fit(cfg, tmp_path, "learn", quiet=True)
    assert summary["best_val_acc"] > 0.2


@pytest.mark.parametrize("args,match", [
    (["train", "--set", "optim.lr=-1"], "optim.lr=-1"),
    (["train", "--set", "model.nope=1"], "unknown config key 'model.nope'"),
    (["train", "--config", "missing.yaml"], "config file not found"),
    (["train", "--data", "/nonexistent/cifar"], "data path not found"),
    (["evaluate", "/nonexistent/run"], "not a run directory"),
])
def test_cli_errors_one_line_exit_2(args, match, tmp_path):
    p = subprocess.run([sys.executable, "-m", "cifarlab", *args, *(["--out", str(tmp_path)] if args[0] == "train" else [])],
                       capture_output=True, text=True, cwd=tmp_path, timeout=900)  # a deadlock guard
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in p.stderr


def test_help_everywhere():
    for verb in (["--help"], ["train", "--help"], ["evaluate", "--help"], ["models", "--help"]):
        p = subprocess.run([sys.executable, "-m", "cifarlab", *verb], capture_output=True, text=True, timeout=900)
        assert p.returncode == 0 and "usage" in p.stdout


def test_every_help_text_reads_as_written():
    """Each command's (and sub-command's) --help, formatted in process: no argparse escapes left showing."""
    import argparse

    from cifarlab.cli.main import build_parser

    def walk(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from walk(child)

    parsers = list(walk(build_parser()))
    assert len(parsers) > 10
    for parser in parsers:
        text = parser.format_help()
        assert "%%" not in text and "%(" not in text, parser.prog


def test_models_lists_param_counts():
    p = subprocess.run([sys.executable, "-m", "cifarlab", "models"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0
    assert "11,181,642" in p.stdout  # torchvision resnet18 with a 10-class head


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    cmd = next(line.strip().strip("`") for line in readme.splitlines() if "pytest" in line and "pip install" in line)
    assert cmd in ci
