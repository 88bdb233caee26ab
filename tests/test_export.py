"""``cifarlab export``: ONNX checked with onnxruntime, TorchScript, standalone safetensors."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx  # the test extra has onnx, onnxscript and onnxruntime: CI must not skip these tests
import pytest
import torch

import cifarlab
from cifarlab.cli.main import main
from cifarlab.export import ExportError, export_run, onnx_logits, run_test_images


def test_onnx_export_agrees_with_pytorch_on_the_test_set(trained_run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    with pytest.raises(SystemExit) as e:
        main(["export", str(trained_run), "--format", "onnx", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert e.value.code == 0, stdout
    assert "on 200 test images: labels agree on 100.00%" in stdout

    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads((trained_run / "best.json").read_text())
    assert json.loads(props["classes"]) == meta["classes"]
    assert json.loads((tmp_path / "m.onnx.json").read_text())["input"]["range"] == [0.0, 1.0]

    # Against the evaluation pipeline's own logits of the same 200 test images (cifarlab evaluate).
    images = run_test_images(trained_run)
    got = onnx_logits(out, images, batch_size=64)  # several batches: the batch dimension is dynamic
    saved = np.load(trained_run / "test_logits.npz")["logits"]
    assert got.shape == saved.shape == (200, 10)
    agreement = (got.argmax(1) == saved.argmax(1)).mean()
    assert agreement >= 0.999
    np.testing.assert_allclose(got, saved, atol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_matches_the_predictor(trained_run, tmp_path):
    path = export_run(trained_run, "torchscript", tmp_path)
    assert path == tmp_path / "model.pt" and (tmp_path / "model.pt.json").is_file()
    scripted = torch.jit.load(str(path))
    images = run_test_images(trained_run, limit=50)
    ref = cifarlab.load(trained_run).logits(list(images.permute(0, 2, 3, 1).numpy()))
    with torch.no_grad():
        got = scripted(images.float() / 255.0)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_safetensors_export_loads_without_the_run_dir(trained_run, tmp_path):
    path = export_run(trained_run, "safetensors", tmp_path / "weights.safetensors")
    assert (tmp_path / "weights.json").is_file()
    images = list(run_test_images(trained_run, limit=20).permute(0, 2, 3, 1).numpy())
    a = cifarlab.load(path).predict(images, top_k=3)
    b = cifarlab.load(trained_run).predict(images, top_k=3)
    assert [p.labels for p in a] == [p.labels for p in b] and [p.probs for p in a] == [p.probs for p in b]


def test_missing_onnx_names_the_extra(trained_run, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ExportError, match=r"pip install 'cifarlab\[onnx\]'"):
        export_run(trained_run, "onnx", tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="unknown export format"):
        export_run(trained_run, "tflite", tmp_path / "x.tflite")
