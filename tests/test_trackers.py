"""Trackers against the real libraries, offline: each test reads back what was logged.

MLflow: a SQLite store in a temp folder, read with ``MlflowClient``. TensorBoard: event
files read with TensorBoard's ``EventAccumulator``. W&B: the offline run's ``.wandb``
transaction log, read record by record (its format is LevelDB's log format, see
``_wandb_records``) and decoded with W&B's own protobuf ``Record``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarlab.cli.main import main
from cifarlab.config import load_config
from cifarlab.evaluation import evaluate_run
from cifarlab.trackers import TrackerError, Trackers
from cifarlab.trackers.wandb_tracker import wandb_mode
from cifarlab.train import fit

from .conftest import tiny_overrides

ALL = ["wandb", "mlflow", "tensorboard"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One folder of runs for the module, so that they share one MLflow store (creating one takes seconds)."""
    return tmp_path_factory.mktemp("runs")


def _mlflow_run(runs: Path, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cifarlab")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    return client, run


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """No user settings leak in: no W&B login, no MLflow URI, W&B's own folders in the temp dir."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC",
                "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline ``.wandb`` files."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, "no offline W&B run files"
    return [r for f in files for r in wandb_file_records(f)]


def wandb_file_records(f: Path) -> list:
    """The records of one ``.wandb`` file: a file header (":W&B", magic, version), then 32 KiB blocks of
    chunks (crc32 uint32, length uint16, type uint8: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    data = f.read_bytes()
    assert data[:4] == b":W&B"
    pos, partial = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer or zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(partial)
            records.append(rec)
    return records


def _wandb_history(records) -> list[dict]:
    out = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return out


def _train(small_folder, out: Path, name: str, trackers: list[str], epochs: int = 2) -> Path:
    cfg = load_config(None, tiny_overrides(small_folder, **{"train.epochs": epochs}))
    with Trackers(trackers) as tr:
        summary = fit(cfg, out, name, trackers=tr, quiet=True)
        run_dir = Path(summary["run_dir"])
        evaluate_run(run_dir)
        (run_dir / "report").mkdir()  # what `cifarlab report` leaves: PNG figures
        Image.fromarray(np.tile(np.arange(64, dtype=np.uint8), (48, 1))).convert("RGB").save(
            run_dir / "report" / "curves.png")
    return run_dir


def test_all_trackers_log_config_epochs_and_outputs(small_folder, runs):
    run_dir = _train(small_folder, runs, "all", ALL)
    rows = _rows(run_dir)
    test_acc = json.loads((run_dir / "test_metrics.json").read_text())["test_acc"]
    assert len(rows) == 2

    # ---- MLflow: default store beside the runs, artifacts there too (not in the working directory)
    client, run = _mlflow_run(runs, "all")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "cnn" and float(run.data.params["optim.lr"]) == 1e-3
    assert run.data.params["data.train_size"] == "400"
    for key in ("train_loss", "val_acc", "lr"):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert hist == [(int(r["epoch"]), float(r[key])) for r in rows]
    assert run.data.metrics["test_acc"] == pytest.approx(test_acc)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")] == ["report/curves.png"]
    assert (runs / "mlartifacts").is_dir()

    # ---- TensorBoard: event files read back with TensorBoard's reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2]
        np.testing.assert_allclose([e.value for e in events], [float(r[key]) for r in rows], rtol=1e-6)
    assert acc.Scalars("final/test_acc")[0].value == pytest.approx(test_acc, rel=1e-6)
    (img,) = acc.Images("report/curves")
    assert (img.width, img.height) == (64, 48)
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "name: cnn" in config_text and "train_size: 400" in config_text

    # ---- W&B: offline run files, decoded record by record
    records = _wandb_records(run_dir)
    (run_rec,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run_rec.config.update}
    assert config["model"]["name"] == "cnn" and config["optim"]["lr"] == 1e-3
    assert json.loads((run_dir / "trackers.json").read_text())["wandb"] == run_rec.run_id
    epochs = [h for h in _wandb_history(records) if "train_loss" in h]
    assert [h["epoch"] for h in epochs] == [1, 2]
    assert [h["val_acc"] for h in epochs] == [float(r["val_acc"]) for r in rows]
    figures = [h for h in _wandb_history(records) if "report/curves/path" in h]
    assert figures and list(run_dir.glob("wandb/offline-run-*/files/" + figures[0]["report/curves/path"]))
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key or "/".join(i.nested_key): i.value_json for i in r.summary.update})
    assert float(summary["test_acc"]) == pytest.approx(test_acc)


def test_cli_resume_continues_the_same_tracker_runs(small_folder, runs):
    out = runs
    sets = [a for o in tiny_overrides(small_folder, **{"train.epochs": 1}) for a in ("--set", o)]
    flags = [a for t in ALL for a in ("--tracker", t)]
    for args in (["--out", str(out), "--name", "r", *sets], ["--resume", str(out / "r"), "--epochs", "2"]):
        with pytest.raises(SystemExit) as e:
            main(["train", *args, *flags])
        assert e.value.code == 0
    run_dir = out / "r"
    rows = _rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]

    client, run = _mlflow_run(runs, "r")
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [1, 2]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 2]

    records = _wandb_records(run_dir)
    ids = {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}
    assert len(ids) == 1  # the resumed run continued the same W&B run
    assert [h["epoch"] for h in _wandb_history(records) if "train_loss" in h] == [1, 2]


def test_missing_extra_fails_before_training(small_folder, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(TrackerError, match=r"pip install 'cifarlab\[mlflow\]'"):
        Trackers(["tensorboard", "mlflow"])
    sets = [a for o in tiny_overrides(small_folder) for a in ("--set", o)]
    with pytest.raises(SystemExit) as e:
        main(["train", *sets, "--out", str(tmp_path / "runs"), "--tracker", "mlflow"])
    assert e.value.code == 2
    assert "pip install 'cifarlab[mlflow]'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_failed_run_is_marked_failed(runs):
    run_dir = runs / "crashed"
    run_dir.mkdir()
    with pytest.raises(RuntimeError):
        with Trackers(["mlflow"]) as trackers:
            trackers[0].start(run_dir, {"model": {"name": "cnn"}}, resumed=False)
            raise RuntimeError("training crashed")
    assert _mlflow_run(runs, "crashed")[1].info.status == "FAILED"


def test_wandb_is_offline_unless_a_login_is_configured(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    home = {"HOME": str(tmp_path / "nobody")}
    assert wandb_mode(home) == "offline"
    assert wandb_mode({**home, "WANDB_MODE": "disabled"}) == "disabled"
    assert wandb_mode({**home, "WANDB_API_KEY": "k" * 40}) == "online"
    assert wandb_mode({**home, "NETRC": str(netrc)}) == "online"
    assert wandb_mode({**home, "NETRC": str(netrc), "WANDB_MODE": "offline"}) == "offline"
    # A login for another W&B server does not count for this one.
    assert wandb_mode({**home, "NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"


def test_tags_reach_every_tracker(runs):
    """``Trackers.finish(tags=...)`` (a sweep trial's ``trial_state``): an MLflow tag, TensorBoard text, a W&B
    summary entry; a pruned trial is not a failed run."""
    run_dir = runs / "tagged"
    run_dir.mkdir()
    with Trackers(ALL) as trackers:
        for t in trackers:
            t.start(run_dir, {"model": {"name": "cnn"}}, resumed=False)
        trackers.finish(failed=False, tags={"trial_state": "pruned"})
    assert all(t.run_dir is None for t in trackers)  # finished once: the context's exit does nothing more
    _, run = _mlflow_run(runs, "tagged")
    assert run.data.tags["trial_state"] == "pruned" and run.info.status == "FINISHED"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert acc.Tensors("trial_state/text_summary")[0].tensor_proto.string_val[0].decode() == "pruned"
    records = _wandb_records(run_dir)
    summary = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}
    assert summary["trial_state"] == "pruned"
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]
