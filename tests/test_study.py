"""``cifarlab study``: a tiny two-model study end to end, killed during stage 2 and during the final
training and run again (no trial repeated, nothing redone), and its report's significance numbers
checked against a hand computation from the saved test logits."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from cifarlab.errors import ConfigError
from cifarlab.study import load_study_file
from cifarlab.sweep.spec import base_config, load_sweep_file

from . import pause
from .conftest import REPO, tiny_overrides

TINY_VIT = {"model.name": "vit", "model.patch_size": 4, "model.embed_dim": 16, "model.num_encoder_layers": 1,
            "model.hidden_layer_depth": 32, "model.head_dim": 8, "model.num_heads": 2,
            "model.mlp_head_hidden_layer_depth": 32, "model.widths": None, "model.hidden": None}


def _set(small_folder: Path, **extra) -> dict:
    pairs = (o.split("=", 1) for o in tiny_overrides(small_folder, **{"train.epochs": 1, **extra}))
    return {k: v if k == "data.path" else yaml.safe_load(v) for k, v in pairs}


def write_study(tmp: Path, small_folder: Path) -> Path:
    sweep = {"method": "random", "metric": {"name": "val_acc", "goal": "maximize"}, "run_cap": 2,
             "parameters": {"optim.lr": {"distribution": "log_uniform_values", "min": 0.0005, "max": 0.005},
                            "train.batch_size": {"values": [32, 64]}}}
    study = {"name": "tiny", "out": str(tmp / "studies"), "seeds": 2, "models": {
        "cnn": {"config": str(REPO / "configs" / "cnn.yaml"),
                "sweep": {**sweep, "cifarlab": {"set": _set(small_folder)}},
                # 4 final epochs: a seed stopped after its first epoch resumes with epochs left to train
                "top": 2, "stage2_trials": 2, "final": {"epochs": 4}},
        "vit": {"sweep": {**sweep, "cifarlab": {"set": _set(small_folder, **TINY_VIT)}},
                "top": 2, "stage2_trials": 2, "final": {"epochs": 2}}}}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _stop_at(study: Path, log: Path, rule: str) -> str:
    """Run the study until it pauses at ``rule`` (tests/pause.py), SIGTERM it there, let it go on, and return its
    output once it has stopped."""
    ctrl = log.with_suffix(".ctrl")
    proc = subprocess.Popen(pause.command("study", str(study), "--heartbeat", "1"), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=pause.env(ctrl, [rule]), cwd=REPO)
    try:
        pause.wait_paused(ctrl, 0, proc, log)
        proc.send_signal(signal.SIGTERM)
        pause.release(ctrl, 0)
        assert proc.wait(pause.GUARD) != 0  # the timeout is a deadlock guard only
    finally:
        if proc.poll() is None:
            proc.kill()
    return log.read_text()


def _study(*args: str) -> subprocess.CompletedProcess:
    """``cifarlab study ARGS`` to its end (the timeout is a deadlock guard only)."""
    return subprocess.run([sys.executable, "-m", "cifarlab", "study", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=pause.GUARD)


def _trials(sweep_dir: Path) -> list:
    import optuna

    info = json.loads((sweep_dir / "study.json").read_text())
    return optuna.load_study(study_name=info["study"], storage=info["storage"]).get_trials(deepcopy=False)


def test_study_end_to_end_killed_twice(small_folder, tmp_path):
    study = write_study(tmp_path, small_folder)
    sdir = tmp_path / "studies" / "tiny"
    log = tmp_path / "run1.log"
    # kill 1: during the first model's stage-2 sweep, as its second trial starts (the first one finished)
    stage2 = sdir / "sweeps" / "tiny-cnn-stage2"
    out1 = _stop_at(study, log, "*/tiny-cnn-stage2/trials/trial-0001@start")
    assert "stage 3/6 stage2" in out1 and "trial 0 complete" in out1
    before = {t.number: t.value for t in _trials(stage2) if t.state.name == "COMPLETE"}
    stage1_before = {t.number: t.value for t in _trials(sdir / "sweeps" / "tiny-cnn-stage1")}
    assert list(before) == [0] and len(stage1_before) == 2
    # kill 2: during the first model's final training, after its first epoch (of 4)
    out2 = _stop_at(study, tmp_path / "run2.log", "*/final/cnn/seed-0@epoch=1")
    assert "stage 1/6 stage1 | done before, reused" in out2 and "stage 5/6 final" in out2
    final0 = sdir / "final" / "cnn" / "seed-0"
    assert (final0 / "last.pt").is_file() and not (final0 / "summary.json").exists()
    # run 3 finishes
    r = _study(str(study), "--heartbeat", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "seed 1/2 (train.seed=" in r.stdout and "resuming" in r.stdout
    # no trial repeated: every sweep holds exactly its budget of counted trials, earlier results unchanged
    for model in ("cnn", "vit"):
        for stage, budget in (("stage1", 2), ("stage2", 2)):
            trials = _trials(sdir / "sweeps" / f"tiny-{model}-{stage}")
            assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == budget, (model, stage)
    after1 = {t.number: t.value for t in _trials(sdir / "sweeps" / "tiny-cnn-stage1")}
    assert after1 == stage1_before
    after2 = {t.number: t.value for t in _trials(stage2) if t.state.name == "COMPLETE"}
    assert all(after2[n] == v for n, v in before.items())
    rows = (final0 / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]  # the resumed seed did not redo epoch 1
    state = json.loads((sdir / "state.json").read_text())
    assert all(set(state["models"][m]) == {"stage1", "narrow", "stage2", "best", "final", "evaluate"}
               for m in ("cnn", "vit"))

    # the report and its significance numbers, by hand from the saved test logits
    html = (sdir / "report" / "study.html").read_text()
    for heading in ("Headline", "Significance", "The data at a glance", "cnn: sweep stage 1", "vit: sweep stage 2",
                    "Final training curves", "Confusion matrix: cnn", "ROC curves", "Seeds"):
        assert heading in html, heading
    assert (sdir / "report" / "sweeps" / "cnn-stage1" / "trials_ranked.csv").is_file()
    rep = json.loads((sdir / "report" / "study.json").read_text())
    (pair,) = rep["significance"]
    assert (pair["a"], pair["b"]) == ("cnn", "vit")
    z = {m: [np.load(sdir / "final" / m / f"seed-{k}" / "test_logits.npz") for k in range(2)] for m in ("cnn", "vit")}
    acc = {m: [float((x["logits"].argmax(1) == x["labels"]).mean()) for x in z[m]] for m in z}
    w = stats.ttest_ind(acc["cnn"], acc["vit"], equal_var=False)
    assert pair["acc_diff"] == pytest.approx(np.mean(acc["cnn"]) - np.mean(acc["vit"]))
    if np.isfinite(w.pvalue):
        assert pair["over_seeds"]["p_value"] == pytest.approx(w.pvalue)
    for k, per in enumerate(pair["per_seed"]):
        labels = z["cnn"][k]["labels"]
        a, b = z["cnn"][k]["logits"].argmax(1) == labels, z["vit"][k]["logits"].argmax(1) == labels
        table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
        assert (per["mcnemar"]["n01"], per["mcnemar"]["n10"]) == (table[1][0], table[0][1])
        assert per["mcnemar"]["p_value"] == pytest.approx(sm_mcnemar(table, exact=True).pvalue)
        assert f"{per['mcnemar']['n01']}" in html
    assert rep["runs"][0]["spread"]["test_acc"]["mean"] == pytest.approx(np.mean(acc["cnn"]))
    # a fourth run does nothing again
    r = _study(str(study), "--no-report")
    assert r.returncode == 0 and r.stdout.count("done before, reused") == 12


def test_study_file_errors(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: x\nmodels: {cnn: {top: 2}}\n")
    with pytest.raises(ConfigError, match="models.cnn.sweep is required"):
        load_study_file(p)
    p.write_text("name: x\nmodels: {cnn: {sweep: {method: random}, stage2: 3}}\n")
    with pytest.raises(ConfigError, match="unknown key.*stage2"):
        load_study_file(p)
    p.write_text("name: x\nmodels: {cnn: {sweep: nope.yaml}}\n")
    with pytest.raises(ConfigError, match="file not found"):
        load_study_file(p)


@pytest.mark.parametrize("name", ["seed-study.yaml", "cpu-hour.yaml"])
def test_shipped_studies_parse(name, tmp_path):
    spec = load_study_file(REPO / "configs" / "studies" / name)
    assert [m.name for m in spec.models] == ["resnet18", "cnn", "vit"]
    for plan in spec.models:  # each stage-1 sweep finds its base recipe from where the pipeline runs it
        if isinstance(plan.sweep, dict):  # written under the study directory
            raw, where = plan.sweep, tmp_path / "studies" / spec.name / "sweeps" / "stage1.yaml"
        else:
            raw, where = load_sweep_file(plan.sweep), plan.sweep
        assert base_config(raw, where, plan.config)["model"]["name"] == plan.name
