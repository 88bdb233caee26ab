"""Seeds groups (``train --seeds N``): layout, resume, and groups in ``compare`` and ``report``
with significance numbers checked against statsmodels on the saved test logits."""

from __future__ import annotations

import json
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from cifarlab.config import load_config
from cifarlab.errors import CifarlabError
from cifarlab.train import fit
from cifarlab.train.group import train_group

from .conftest import REPO, tiny_overrides
from .test_report import main_exit


def _mcnemar_by_hand(logits_a: np.ndarray, logits_b: np.ndarray, labels: np.ndarray):
    a, b = logits_a.argmax(1) == labels, logits_b.argmax(1) == labels
    table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
    return int(table[1][0]), int(table[0][1]), sm_mcnemar(table, exact=True).pvalue


@pytest.fixture(scope="module")
def group(small_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("groups")
    argv = ["train", "-c", str(REPO / "configs" / "cnn.yaml"), "--out", str(out), "--name", "g", "--seeds", "2",
            "--evaluate"]
    for o in tiny_overrides(small_folder, **{"train.epochs": 1}):
        argv += ["--set", o]
    assert main_exit(argv) == 0
    return out / "g"


def test_group_layout_and_seeds(group):
    info = json.loads((group / "group.json").read_text())
    assert info["seeds"] == 2 and info["seed_rule"] == "train.seed = base + K"
    seeds = [load_config(group / f"seed-{k}" / "config.yaml") for k in range(2)]
    assert [c.train.seed for c in seeds] == [info["base_seed"], info["base_seed"] + 1]
    assert seeds[0].data.seed == seeds[1].data.seed  # the same split and test set for every seed
    for k in range(2):
        assert (group / f"seed-{k}" / "test_logits.npz").is_file()
    w0 = (group / "seed-0" / "best.safetensors").read_bytes()
    assert w0 != (group / "seed-1" / "best.safetensors").read_bytes()  # different seeds, different weights


def test_group_resume_skips_finished_and_resumes_unfinished(small_folder, tmp_path):
    cfg = load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(small_folder))
    calls = []

    def dying_fit(c, out, name, **kw):  # seed 1 is killed after its first epoch (its checkpoint is written)
        calls.append((name, kw["resume"]))

        def die(epoch, row):
            if name == "seed-1":
                raise KeyboardInterrupt

        return fit(c, out, name, on_epoch_end=die, **kw)

    with pytest.raises(KeyboardInterrupt):
        train_group(cfg, tmp_path, "g", 2, fit_fn=dying_fit, quiet=True, log=lambda s: None)
    assert calls == [("seed-0", False), ("seed-1", False)]
    assert not (tmp_path / "g" / "seed-1" / "summary.json").exists()
    calls.clear()
    lines = []

    def counting_fit(c, out, name, **kw):
        calls.append((name, kw["resume"]))
        return fit(c, out, name, **kw)

    summaries = train_group(cfg, tmp_path, "g", 2, fit_fn=counting_fit, quiet=True, log=lines.append)
    assert calls == [("seed-1", True)]  # seed 0 skipped, seed 1 resumed from its checkpoint
    assert "already done" in lines[0] and "resuming" in lines[1]
    assert [s["epochs"] for s in summaries] == [2, 2]
    rows = (tmp_path / "g" / "seed-1" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + 2 epochs, none repeated
    other = load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(small_folder, **{"optim.lr": 0.5}))
    with pytest.raises(CifarlabError, match="another config"):
        train_group(other, tmp_path, "g", 2, quiet=True, log=lambda s: None)


def test_compare_group_and_run(group, trained_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main_exit(["compare", str(group), str(trained_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "McNemar" in printed
    result = json.loads((out / "comparison.json").read_text())
    g = result["runs"][0]
    assert g["run"] == "g" and g["seeds"] == 2 and len(g["per_seed"]) == 2
    accs = [s["test_acc"] for s in g["per_seed"]]
    lo, hi = stats.t.interval(0.95, 1, loc=np.mean(accs), scale=stats.sem(accs))
    assert g["test_acc"] == pytest.approx(np.mean(accs))
    assert g["spread"]["test_acc"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert (g["spread"]["test_acc"]["ci_low"], g["spread"]["test_acc"]["ci_high"]) == pytest.approx((lo, hi))
    (pair,) = result["significance"]
    assert pair["a"] == "g" and pair["b"] == trained_run.name
    run_z = np.load(trained_run / "test_logits.npz")
    for k, per in enumerate(pair["per_seed"]):
        z = np.load(group / f"seed-{k}" / "test_logits.npz")
        n01, n10, p = _mcnemar_by_hand(z["logits"], run_z["logits"], z["labels"])
        assert (per["mcnemar"]["n01"], per["mcnemar"]["n10"]) == (n01, n10)
        assert per["mcnemar"]["p_value"] == pytest.approx(p)
    assert set(pair["mcnemar"]) >= {"p_value", "n01", "n10"}
    html = (out / "comparison.html").read_text()
    assert "Significance" in html and "Spread over seeds" in html and "compare_seeds.png" in html


def test_compare_two_runs_significance(trained_run, tmp_path, small_folder):
    cfg = load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(small_folder, **{"train.seed": 5}))
    from cifarlab.evaluation import evaluate_run

    other = Path(fit(cfg, tmp_path, "other", quiet=True)["run_dir"])
    evaluate_run(other)
    out = tmp_path / "cmp"
    assert main_exit(["compare", str(trained_run), str(other), "--out", str(out)]) == 0
    (pair,) = json.loads((out / "comparison.json").read_text())["significance"]
    za, zb = np.load(trained_run / "test_logits.npz"), np.load(other / "test_logits.npz")
    n01, n10, p = _mcnemar_by_hand(za["logits"], zb["logits"], za["labels"])
    assert pair["mcnemar"]["n01"] == n01 and pair["mcnemar"]["n10"] == n10
    assert pair["mcnemar"]["p_value"] == pytest.approx(p)
    diff = (za["logits"].argmax(1) == za["labels"]).mean() - (zb["logits"].argmax(1) == zb["labels"]).mean()
    assert pair["acc_diff"] == pytest.approx(diff)
    assert pair["bootstrap"]["ci_low"] <= diff <= pair["bootstrap"]["ci_high"]
    html = (out / "comparison.html").read_text()
    assert html_escape(pair["verdict"].split(" (")[0]) in html  # "a > b, p = ...": the ">" is written &gt;


def test_report_group(group):
    assert main_exit(["report", str(group)]) == 0
    page = (group / "report" / "report.html").read_text()
    assert "Over seeds" in page and "seeds.png" in page
    data = json.loads((group / "report" / "group.json").read_text())
    assert data["row"]["seeds"] == 2 and len(data["significance_between_seeds"]) == 1


def test_seeds_needs_name(small_folder, tmp_path, capsys):
    argv = ["train", "--out", str(tmp_path), "--seeds", "2"] + sum((["--set", o] for o in tiny_overrides(small_folder)), [])
    assert main_exit(argv) == 2
    assert "--seeds needs --name" in capsys.readouterr().err


def test_group_runner_trains_any_members_and_loads_each_data_section_once(tmp_path, monkeypatch):
    """The runner takes members, not only seeds (the audit's folds next): members that share a data section
    share one loaded data set; a member with another data section gets its own."""
    import dataclasses

    import cifarlab.data
    from cifarlab.config import RunConfig
    from cifarlab.train.group import GroupRunner, Member

    loads, fits = [], []
    monkeypatch.setattr(cifarlab.data, "load_data", lambda d: loads.append(d.seed) or object())

    def fake_fit(cfg, out, name, *, data, resume, overwrite, **kw):
        fits.append((name, data, resume, overwrite))
        return {"run": name}

    base = RunConfig().validate()
    other_seed = dataclasses.replace(base, train=dataclasses.replace(base.train, seed=base.train.seed + 1))
    other_data = dataclasses.replace(base, data=dataclasses.replace(base.data, seed=base.data.seed + 1))
    lines = []
    runner = GroupRunner(tmp_path / "g", fit_fn=fake_fit, log=lines.append)
    members = [Member("fold-0", base, "fold 1/3"), Member("fold-1", other_seed, "fold 2/3"),
               Member("fold-2", other_data, "fold 3/3")]
    assert [runner.run(m)["run"] for m in members] == ["fold-0", "fold-1", "fold-2"]
    assert loads == [base.data.seed, base.data.seed + 1]
    assert fits[0][1] is fits[1][1] and fits[2][1] is not fits[0][1]
    assert all(f[2:] == (False, True) for f in fits)  # each a new run
    assert lines == ["fold 1/3 starting", "fold 2/3 starting", "fold 3/3 starting"]


def test_a_run_that_stopped_early_or_ran_to_its_time_budget_is_done(tmp_path):
    """Fewer epochs than the config's are a finished run when early stopping or a time budget decided them,
    and an unfinished one otherwise (a rerun with more epochs continues it)."""
    from cifarlab.train.group import seed_status

    def run(name: str, **summary) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({"epochs": 3, **summary}))
        (d / "best.safetensors").write_bytes(b"")
        (d / "last.pt").write_bytes(b"")
        return d

    assert seed_status(run("full"), 3) == "done"
    assert seed_status(run("short"), 9) == "resume"
    assert seed_status(run("stopped", stopped_early="no improvement"), 9) == "done"
    assert seed_status(run("budget", time_budget_seconds=120.0), 9) == "done"
    assert seed_status(run("neither", stopped_early=None, time_budget_seconds=None), 9) == "resume"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("[]")
    assert seed_status(tmp_path / "broken", 3) == "new"
