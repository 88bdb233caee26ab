"""``cifarlab predict`` and ``cifarlab.load(RUN_DIR).predict``: real test images, odd formats, the CLI."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cifarlab
from cifarlab.cli.main import main
from cifarlab.data.folder import list_folder
from cifarlab.config import load_config
from cifarlab.errors import CifarlabError, DataError
from cifarlab.evaluation.loader import load_model
from cifarlab.models import build_model
from cifarlab.train.checkpoint import load_into, load_weights


def _reference_logits(run_dir: Path, rgb: np.ndarray) -> torch.Tensor:
    """Logits of (N, S, S, 3) uint8 images through the run's model, built here from config.yaml (not by the
    loader under test), normalized here by hand from best.json."""
    meta = json.loads((run_dir / "best.json").read_text())
    model = build_model(load_config(run_dir / "config.yaml"), meta["num_classes"])
    load_into(model, load_weights(run_dir / "best.safetensors")[0], "best.safetensors")
    model.eval()
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.float()(x.contiguous()).float()


def _pil_rgb(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


def test_predict_labels_the_test_set_as_evaluate_does(trained_run, small_folder):
    classes, files = list_folder(small_folder)
    paths = [p for p, _ in files["test"]]
    preds = cifarlab.load(trained_run).predict(paths, top_k=3)
    assert len(preds) == len(paths) == 200
    for p in preds:
        assert len(p.labels) == 3 and set(p.labels) <= set(classes) and len(set(p.labels)) == 3
        assert all(0.0 <= q <= 1.0 for q in p.probs) and p.probs == sorted(p.probs, reverse=True)
        assert p.label == classes[p.indices[0]]
    # `evaluate` scored the same images through the data pipeline (decode cache, DeviceBatches).
    saved = np.load(trained_run / "test_logits.npz")
    assert [y for _, y in files["test"]] == saved["labels"].tolist()
    assert [p.indices[0] for p in preds] == saved["logits"].argmax(1).tolist()
    acc = np.mean([p.indices[0] == y for p, (_, y) in zip(preds, files["test"])])
    assert acc == pytest.approx(json.loads((trained_run / "test_metrics.json").read_text())["test_acc"])


def test_prediction_is_argmax_of_the_models_logits(trained_run, small_folder):
    _, files = list_folder(small_folder)
    paths = [p for p, _ in files["test"][::20]]
    preds = cifarlab.load(trained_run).predict(paths, top_k=10)
    ref = _reference_logits(trained_run, np.stack([_pil_rgb(p, 32) for p in paths]))
    probs = ref.softmax(1)
    for p, r in zip(preds, probs):
        assert p.indices == r.argsort(descending=True).tolist()
        np.testing.assert_allclose(p.probs, r.sort(descending=True).values.numpy(), atol=1e-5)


def test_paths_pil_images_and_arrays_agree(trained_run, small_folder):
    _, files = list_folder(small_folder)
    paths = [p for p, _ in files["test"][5:200:40]]
    predictor = cifarlab.load(trained_run)
    pils = [Image.open(p) for p in paths]
    arrays = [np.asarray(im.convert("RGB")) for im in pils]
    by_path, by_pil, by_array = (predictor.predict(x, top_k=3) for x in (paths, pils, arrays))
    by_stack = predictor.predict(np.stack(arrays), top_k=3)  # (N, H, W, 3): a batch
    single = predictor.predict(str(paths[0]), top_k=3)  # one image in, one prediction out
    for a, b, c, d in zip(by_path, by_pil, by_array, by_stack):
        assert a.labels == b.labels == c.labels == d.labels
        assert a.probs == b.probs == c.probs == d.probs
    assert single.labels == by_path[0].labels and single.source == str(paths[0])
    assert by_pil[1].source == "image[1]"


def test_grayscale_and_rgba_pngs_of_another_size(trained_run, small_folder, tmp_path):
    _, files = list_folder(small_folder)
    src_a, src_b = files["test"][3][0], files["test"][77][0]
    with Image.open(src_a) as im:
        gray = im.convert("L").resize((50, 40), Image.Resampling.BILINEAR)
    gray.save(tmp_path / "gray.png")
    with Image.open(src_b) as im:
        rgba = im.convert("RGBA").resize((64, 48), Image.Resampling.BILINEAR)
    alpha = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))  # transparent on the left, opaque right
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "rgba.png")
    assert Image.open(tmp_path / "gray.png").mode == "L" and Image.open(tmp_path / "rgba.png").mode == "RGBA"

    preds = cifarlab.load(trained_run).predict([tmp_path / "gray.png", tmp_path / "rgba.png"], top_k=2)
    # Independent preprocessing: gray replicated to RGB; RGBA composited on black; bicubic to 32 x 32.
    g = np.asarray(Image.open(tmp_path / "gray.png"))
    g_rgb = np.asarray(Image.fromarray(np.stack([g] * 3, -1)).resize((32, 32), Image.Resampling.BICUBIC))
    with Image.open(tmp_path / "rgba.png") as im:
        on_black = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
    a_rgb = np.asarray(on_black.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
    assert a_rgb[:, 0].max() <= 5  # the transparent edge went black
    ref = _reference_logits(trained_run, np.stack([g_rgb, a_rgb])).softmax(1)
    for p, r in zip(preds, ref):
        assert p.indices == r.argsort(descending=True)[:2].tolist()
        np.testing.assert_allclose(p.probs, r.sort(descending=True).values[:2].numpy(), atol=1e-5)


def test_cli_formats_and_folder(trained_run, small_folder, tmp_path, capsys):
    one = next((small_folder / "test" / "cat").iterdir())
    folder = small_folder / "test" / "ship"
    n_folder = len(list(folder.iterdir()))

    def run(*args) -> str:
        with pytest.raises(SystemExit) as e:
            main(["predict", str(trained_run), *map(str, args)])
        out = capsys.readouterr().out
        assert e.value.code == 0
        return out

    js = json.loads(run(one, folder, "--format", "json", "--top-k", "2", "--batch-size", "7"))
    assert len(js) == 1 + n_folder and js[0]["image"] == str(one)
    assert all(len(r["top_k"]) == 2 for r in js)
    rows = list(csv.DictReader(io.StringIO(run(one, "--format", "csv", "--top-k", "20"))))
    assert [int(r["rank"]) for r in rows] == list(range(1, 11))  # k is capped at the 10 classes
    assert abs(sum(float(r["prob"]) for r in rows) - 1.0) < 1e-4
    table = run(one)
    assert table.splitlines()[0] == str(one) and len(table.splitlines()) == 4
    assert table.splitlines()[1].split()[0] == js[0]["top_k"][0]["label"]


def test_bad_inputs_give_clear_errors(trained_run, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(SystemExit) as e:
        main(["predict", str(trained_run), str(bad)])
    assert e.value.code == 2 and "notes.png" in capsys.readouterr().err
    predictor = cifarlab.load(trained_run)
    with pytest.raises(DataError, match="not found"):
        predictor.predict(tmp_path / "missing.png")
    with pytest.raises(DataError, match="uint8"):
        predictor.predict(np.zeros((32, 32, 3), np.float32))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        predictor.predict(tmp_path / "empty")
    with pytest.raises(CifarlabError, match="top_k"):
        predictor.predict(np.zeros((32, 32, 3), np.uint8), top_k=0)
    with pytest.raises(CifarlabError, match="best.safetensors"):
        cifarlab.load(tmp_path)


def test_one_loader_for_a_run_and_its_bare_weights(trained_run, tmp_path):
    """evaluate, predict and export load through load_model: a run directory adds its config to the sidecar, a
    bare .safetensors with its .json is enough for the same model; only evaluate's as_trained needs the run."""
    run = load_model(trained_run, "cpu")
    assert run.cfg is not None and run.cfg.model.name == run.meta["model"]
    assert (run.runtime.precision, run.runtime.channels_last) == ("fp32", False)
    for ext in (".safetensors", ".json"):
        (tmp_path / f"model{ext}").write_bytes((trained_run / f"best{ext}").read_bytes())
    bare = load_model(tmp_path / "model.safetensors", "cpu")
    assert bare.cfg is None and bare.meta == run.meta
    ref = run.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in bare.model.state_dict().items()) and len(ref) > 0
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(run.normalize(images), bare.normalize(images))
    trained = load_model(trained_run, "cpu", as_trained=True)
    assert trained.runtime.precision == run.cfg.train.precision or run.cfg.train.precision == "auto"
    with pytest.raises(CifarlabError, match="not a run directory"):
        load_model(tmp_path / "model.safetensors", "cpu", as_trained=True)
    assert cifarlab.load(tmp_path / "model.safetensors").norm(images).equal(run.normalize(images))
