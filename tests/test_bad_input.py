"""Every input a user can get wrong ends in one line naming the problem, exit status 2, and nothing half-written.

The CLI runs in process (``cifarlab.cli.main.main``), which prints exactly what the
console script prints; tests/test_train_e2e.py checks a few of these through a real
subprocess as well.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from cifarlab.cli.main import main
from cifarlab.data.archive import ARCHIVE_NAME, write_fake_archive
from cifarlab.train.checkpoint import load_checkpoint

from .conftest import REPO, make_subset, tiny_set_args

SMALL = {"data.train_size": 80, "data.val_size": 20, "train.epochs": 1, "train.batch_size": 16}


def _cli(capsys, *args: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return e.value.code, err.strip().splitlines()


def _train(data: Path | str, out: Path, *extra: str, name: str = "r", **overrides) -> list[str]:
    sets = tiny_set_args(data, **{**SMALL, **overrides})
    return ["train", "--config", str(REPO / "configs/cnn.yaml"), "--out", str(out), "--name", name, *sets, *extra]


def assert_user_error(capsys, args: list[str], match: str, out: Path | None = None) -> str:
    """Exit 2, one line on stderr that names the problem, and no run directory left behind."""
    rc, err = _cli(capsys, *args)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("cifarlab: error: ") and match in err[0], err
    if out is not None:
        assert not (out / "r").exists(), f"a failed run left {sorted(p.name for p in (out / 'r').iterdir())}"
    return err[0]


@pytest.fixture()
def folder(tmp_path) -> Path:
    """12 train + 4 test images per class, as links into the shared set: cheap to damage one way or another."""
    return make_subset(tmp_path / "data", 12, 4)


# --------------------------------------------------------------------------- data
def test_missing_data_folder(tmp_path, capsys):
    assert_user_error(capsys, _train(tmp_path / "nope", tmp_path / "out"), "data path not found", tmp_path / "out")


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_user_error(capsys, _train(tmp_path / "empty", tmp_path / "out"), "data folder is empty", tmp_path / "out")


def test_class_folder_without_images(folder, tmp_path, capsys):
    cat = folder / "train" / "cat"
    for f in cat.iterdir():
        f.unlink()
    (cat / "notes.txt").write_text("not an image")
    assert_user_error(capsys, _train(folder, tmp_path / "out"), f"class folder has no images: {cat}", tmp_path / "out")


def test_folder_without_class_folders(tmp_path, capsys):
    for split in ("train", "test"):
        (tmp_path / "d" / split).mkdir(parents=True)
    assert_user_error(capsys, _train(tmp_path / "d", tmp_path / "out"), "has no class folders", tmp_path / "out")


def _damage(folder: Path) -> tuple[Path, Path]:
    """Replace one training JPEG by its first half and another by bytes that are no image at all."""
    dog = sorted((folder / "train" / "dog").iterdir())
    truncated, garbage = dog[3], dog[5]
    data = truncated.read_bytes()
    truncated.unlink()
    truncated.write_bytes(data[: len(data) // 2])
    garbage.unlink()
    garbage.write_bytes(b"\x00not a jpeg" * 20)
    return truncated, garbage


def test_corrupt_images_are_named_or_skipped_and_counted(folder, tmp_path, capsys):
    truncated, garbage = _damage(folder)
    line = assert_user_error(capsys, _train(folder, tmp_path / "out"), "cannot read image", tmp_path / "out")
    assert str(truncated) in line or str(garbage) in line
    assert "--skip-bad-images" in line  # the message says how to go on

    rc, _ = _cli(capsys, *_train(folder, tmp_path / "out", "--skip-bad-images"))
    assert rc == 0
    import json

    summary = json.loads((tmp_path / "out" / "r" / "summary.json").read_text())
    assert summary["skipped_images"] == 2


def test_truncated_jpeg_alone_is_named(folder, tmp_path, capsys):
    truncated, garbage = _damage(folder)
    garbage.unlink()  # only the cut-off JPEG: Pillow reads its header fine and fails while decoding
    line = assert_user_error(capsys, _train(folder, tmp_path / "out"), str(truncated), tmp_path / "out")
    assert "truncated" in line.lower()


def test_archive_with_a_wrong_checksum(tmp_path, capsys):
    archive = write_fake_archive(tmp_path / "dl" / ARCHIVE_NAME)  # the official name, not the official bytes
    assert_user_error(capsys, _train(archive, tmp_path / "out"), "checksum mismatch", tmp_path / "out")


def test_damaged_archive_of_another_name(tmp_path, capsys):
    archive = write_fake_archive(tmp_path / "mine.tar.gz")
    archive.write_bytes(archive.read_bytes()[:3000])
    assert_user_error(capsys, _train(archive, tmp_path / "out"), str(archive), tmp_path / "out")


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("sets,match", [
    (["train.nope=1"], "unknown config key 'train.nope'"),
    (["nope.lr=1"], "unknown config section 'nope'"),
    (["model.nope=1"], "unknown config key 'model.nope'"),
    (["train.epochs=abc"], "train.epochs must be an integer"),
    (["train.epochs=1.5"], "train.epochs must be an integer"),
    (["optim.lr=fast"], "optim.lr must be a number"),
    (["data.augment_flip=maybe"], "data.augment_flip must be true or false"),
    (["optim.lr=-0.001"], "optim.lr=-0.001 must be a positive number"),
    (["optim.lr=0"], "optim.lr=0.0 must be a positive number"),
    (["optim.lr=.inf"], "optim.lr must be a finite number"),
    (["optim.weight_decay=.inf"], "optim.weight_decay must be a finite number"),
    (["data.augment_p=1.5"], "data.augment_p=1.5 must be in [0, 1]"),
    (["data.augment_p=-0.1"], "data.augment_p=-0.1 must be in [0, 1]"),
    (["train.nan_policy=ignore"], "train.nan_policy='ignore' must be stop or skip-batch"),
    (["model.name=vit", "model.patch_size=5", "data.image_size=32"], "model.patch_size=5 must divide the image size 32"),
    (["model.name=vit", "model.num_heads=0"], "model.num_heads*model.head_dim"),
    (["model.name=vit", "model.head_dim=0"], "model.num_heads*model.head_dim"),
    (["model.name=vit", "model.num_heads=-2", "model.head_dim=-3"], "model.num_heads*model.head_dim"),
    (["model.name=vit", "model.image_size=64", "data.image_size=32"], "model.image_size=64 differs from data.image_size=32"),
    (["model.name=nope"], "unknown model 'nope'"),
    (["train.device=tpu"], "train.device='tpu'"),
])
def test_bad_config_values(sets, match, tmp_path, capsys):
    args = ["train", "--out", str(tmp_path / "out"), "--name", "r", *[x for s in sets for x in ("--set", s)]]
    assert_user_error(capsys, args, match, tmp_path / "out")


@pytest.mark.parametrize("text,match", [
    ("train:\n  epochs: 2\n  nope: 1\n", "unknown config key 'train.nope'"),
    ("optim: {lr: -1}\n", "optim.lr=-1.0 must be a positive number"),
    ("data: {augment_p: two}\n", "data.augment_p must be a number"),
    ("- just\n- a list\n", "config must be a mapping"),
    ("train: [1, 2]\n", "config section 'train' must be a mapping"),
    ("train: {epochs: [unclosed\n", "is not valid YAML"),
])
def test_bad_config_files(text, match, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    args = ["train", "--config", str(cfg), "--out", str(tmp_path / "out"), "--name", "r"]
    assert_user_error(capsys, args, match, tmp_path / "out")


def test_missing_config_file(tmp_path, capsys):
    args = ["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out"), "--name", "r"]
    assert_user_error(capsys, args, "config file not found", tmp_path / "out")


# --------------------------------------------------------------------------- run directories
def test_existing_run_dir_is_refused(small_folder, tmp_path, capsys):
    run = tmp_path / "out" / "r"
    run.mkdir(parents=True)
    (run / "keep.txt").write_text("precious")
    line = assert_user_error(capsys, _train(small_folder, tmp_path / "out"), "already exists")
    assert f"--resume {run}" in line and "--overwrite" in line
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]


def test_overwrite_with_bad_input_keeps_the_old_run(tmp_path, capsys):
    """--overwrite clears the old run only once the new one is ready to write."""
    run = tmp_path / "out" / "r"
    run.mkdir(parents=True)
    (run / "keep.txt").write_text("precious")
    assert_user_error(capsys, _train(tmp_path / "nope", tmp_path / "out", "--overwrite"), "data path not found")
    assert (run / "keep.txt").read_text() == "precious"


def test_overwrite_replaces_the_old_run(small_folder, tmp_path, capsys):
    run = tmp_path / "out" / "r"
    run.mkdir(parents=True)
    (run / "old.txt").write_text("old")
    rc, _ = _cli(capsys, *_train(small_folder, tmp_path / "out", "--overwrite"))
    assert rc == 0 and not (run / "old.txt").exists() and (run / "last.pt").is_file()


def test_resume_needs_a_run_directory(tmp_path, capsys):
    assert_user_error(capsys, ["train", "--resume", str(tmp_path)], "not a run directory (no config.yaml)")


# --------------------------------------------------------------------------- checkpoints that do not fit
def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def test_resume_with_another_model_shape(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    before = (run / "config.yaml").read_text()
    assert_user_error(capsys, ["train", "--resume", str(run), "--set", "model.hidden=16"],
                      "cannot change model.hidden (32 -> 16)")
    assert (run / "config.yaml").read_text() == before  # the failed resume rewrote nothing


def test_resume_with_a_checkpoint_of_another_class_count(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    state = load_checkpoint(run / "last.pt")
    state["num_classes"] = 5
    torch.save(state, run / "last.pt")
    assert_user_error(capsys, ["train", "--resume", str(run)], "with 5 classes, not 'cnn' with 10")


def test_resume_with_a_checkpoint_of_another_model(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    state = load_checkpoint(run / "last.pt")
    state["model_name"] = "vit"
    torch.save(state, run / "last.pt")
    assert_user_error(capsys, ["train", "--resume", str(run)], "is from model 'vit'")


def test_resume_with_a_damaged_checkpoint(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    state = load_checkpoint(run / "last.pt")
    del state["optimizer"]
    torch.save(state, run / "last.pt")
    assert_user_error(capsys, ["train", "--resume", str(run)], "does not fit this run or is damaged")
    # A file that does not load at all (torn, garbage) is passed over for the previous checkpoint instead:
    # tests/test_resume_states.py.


def test_evaluate_with_weights_of_another_shape(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["hidden"] = 16
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert_user_error(capsys, ["evaluate", str(run)], "does not fit this model")


def test_evaluate_with_weights_of_another_model(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"] = {"name": "vit", "patch_size": 4}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert_user_error(capsys, ["evaluate", str(run)], "holds a 'cnn' model, config says 'vit'")


def test_evaluate_with_a_missing_sidecar(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    (run / "best.json").unlink()
    assert_user_error(capsys, ["evaluate", str(run)], "cannot read the sidecar")
