"""``cifarlab export --format onnx --int8``: static QDQ quantization, its test accuracy beside fp32's, the warning."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx  # the test extra has onnx and onnxruntime: CI must not skip these tests
import onnxruntime as ort
import pytest

from cifarlab.cli.main import main
from cifarlab.export import export_int8, export_run, run_test_images

from .conftest import REPO, tiny_overrides


def _ort_logits(path, images) -> np.ndarray:
    """The file run with onnxruntime directly (not through cifarlab's helpers): float32 [0, 1] input."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"image": images.numpy().astype(np.float32) / 255.0})[0]


def _quantized_weights(path) -> dict[str, tuple[int, ...]]:
    """int8 weight initializers of a QDQ model -> the shape of their scale (one per output channel if per-channel)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        w = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if w is not None and w.data_type == onnx.TensorProto.INT8:
            out[n.input[0]] = (tuple(w.dims), tuple(inits[n.input[1]].dims))
    return out


def test_int8_export_scores_both_files_on_the_test_split(trained_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(trained_run), "--format", "onnx", "--int8", "-o", str(tmp_path)])
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    fp32, int8 = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    assert fp32.is_file() and int8.is_file()
    assert "labels agree on 100.00%" in out and "test accuracy on 200 images, one view: fp32" in out
    assert "warning" not in err

    # QDQ: quantize / dequantize pairs around every conv and linear layer, weights int8 with one scale per channel.
    ops = Counter(n.op_type for n in onnx.load(str(int8)).graph.node)
    assert ops["QuantizeLinear"] >= 4 and ops["DequantizeLinear"] >= 8
    weights = _quantized_weights(int8)
    assert len(weights) == 5  # the tiny CNN's 3 convs and 2 linear layers
    for shape, scale in weights.values():
        assert scale == (shape[0],), (shape, scale)  # per output channel
    assert int8.stat().st_size < fp32.stat().st_size / 2

    # The sidecar's accuracies are what onnxruntime gives on the run's test images and labels.
    meta = json.loads((tmp_path / "model.int8.onnx.json").read_text())
    labels = np.load(trained_run / "test_logits.npz")["labels"]
    images = run_test_images(trained_run)
    acc32 = float((_ort_logits(fp32, images).argmax(1) == labels).mean())
    acc8 = float((_ort_logits(int8, images).argmax(1) == labels).mean())
    rec = meta["test_acc"]
    assert rec["fp32"] == pytest.approx(acc32) and rec["int8"] == pytest.approx(acc8)
    assert rec["drop_points"] == pytest.approx(100 * (acc32 - acc8), abs=1e-3) and rec["images"] == 200
    assert meta["format"] == "onnx-int8" and meta["quantization"]["calibration_images"] == 400  # all 400, under 512
    assert meta["classes"] == json.loads((trained_run / "best.json").read_text())["classes"]
    assert json.loads((tmp_path / "model.onnx.json").read_text())["test_acc"]["fp32"] == pytest.approx(acc32)
    inside = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    assert json.loads(inside["cifarlab"])["format"] == "onnx-int8" and "classes" in inside
    # int8 keeps the decisions of the fp32 model on nearly every image.
    agree = (_ort_logits(int8, images).argmax(1) == _ort_logits(fp32, images).argmax(1)).mean()
    assert agree >= 0.9


def test_a_drop_over_max_drop_is_a_one_line_warning(trained_run, tmp_path, capsys, monkeypatch):
    import cifarlab.export as export

    monkeypatch.setattr(export, "onnx_accuracy", lambda path, x, y: 0.8 if str(path).endswith(".int8.onnx") else 0.9)
    args = ["export", str(trained_run), "--format", "onnx", "--int8", "-o", str(tmp_path), "--no-check",
            "--calibration-images", "32"]
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    assert e.value.code == 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: int8 loses 10.00 points of test accuracy, more than "
                                                   "--max-drop 1"), err
    assert "fp32 0.9000, int8 0.8000 (-10.00 points)" in out
    meta = json.loads((tmp_path / "model.int8.onnx.json").read_text())
    assert meta["test_acc"]["drop_points"] == pytest.approx(10.0) and meta["quantization"]["calibration_images"] == 32

    with pytest.raises(SystemExit) as e:
        main(args + ["--max-drop", "12.5"])
    assert e.value.code == 0 and "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--format", "torchscript", "--int8"], "--int8 quantizes an ONNX file"),
    (["--format", "onnx", "--max-drop", "2"], "--max-drop and --calibration-images go with --int8"),
    (["--format", "onnx", "--int8", "--calibration-images", "0"], "--calibration-images >= 1"),
    (["--format", "onnx", "--int8", "--max-drop", "-1"], "--max-drop must be >= 0"),
])
def test_int8_flags_are_checked(trained_run, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["export", str(trained_run), "-o", str(tmp_path)] + args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_int8_without_the_training_data_says_so(trained_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(trained_run), "--format", "onnx", "--int8", "-o", str(tmp_path),
              "--data", str(tmp_path / "moved")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--int8 calibrates on the run's training images" in err and "--data PATH" in err


# The other registered models: a tiny run each (one epoch), quantized and scored on a few images.
TINY = {
    "resnet18": ("resnet18.yaml", {}),
    "speednet": ("speedrun-cpu.yaml", {"model.widths": "[8, 16, 16]", "train.lookahead": 0, "train.tta": "none"}),
    "vit": ("vit.yaml", {"model.patch_size": 4, "model.embed_dim": 16, "model.num_encoder_layers": 1,
                         "model.num_heads": 2, "model.head_dim": 8, "model.hidden_layer_depth": 32,
                         "model.mlp_head_hidden_layer_depth": 32}),
}


@pytest.mark.parametrize("name", list(TINY))
def test_int8_export_of_every_model(name, small_folder, tmp_path):
    from cifarlab.config import load_config
    from cifarlab.train import fit

    recipe, extra = TINY[name]
    overrides = tiny_overrides(small_folder, **{"model.widths": None, "model.hidden": None, "data.train_size": 200,
                                                "data.val_size": 100, "train.epochs": 1, "train.batch_size": 50,
                                                "train.val_every": 1, **extra})
    run = fit(load_config(REPO / "configs" / recipe, overrides), tmp_path, name, quiet=True)["run_dir"]
    fp32 = export_run(run, "onnx", tmp_path / "export")
    int8, rec = export_int8(run, fp32, calibration=64, test_images=100)
    assert int8 == tmp_path / "export" / "model.int8.onnx" and rec["images"] == 100
    assert 0.0 <= rec["int8"] <= 1.0 and rec["drop_points"] == pytest.approx(100 * (rec["fp32"] - rec["int8"]))
    assert _quantized_weights(int8), "no int8 weights"
    images = run_test_images(run, limit=100)
    p32 = _softmax(_ort_logits(fp32, images))
    p8 = _softmax(_ort_logits(int8, images))
    assert np.isfinite(p8).all()
    # Close to the fp32 model's probabilities: quantization noise, not a different model.
    assert np.abs(p8 - p32).mean() < 0.05, np.abs(p8 - p32).mean()


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)
