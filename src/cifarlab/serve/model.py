"""What the server runs: a trained run (PyTorch) or an exported ONNX file (fp32 or int8, ONNX Runtime).

Both take uint8 RGB images (N, S, S, 3) at the model's image size and return logits (N, C) as float32, with the
test-time augmentation chosen when loading. A run (or an exported ``.safetensors``) goes through
``cifarlab.load``, the same preprocessing and TTA as ``cifarlab predict``, and defaults to the TTA
``cifarlab evaluate`` used, as ``predict`` does. An ONNX file holds one view of an image (its graph has no TTA)
and defaults to none, the way its accuracy was measured; ``tta="flip"`` or ``"flip_translate"`` averages the
views in the server, with the same code as evaluation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import CifarlabError

TTA_CHOICES = ("none", "flip", "flip_translate")


class Backend:
    """A loaded model and what clients need to know about it."""

    kind = "?"  # pytorch | onnx | onnx-int8

    def __init__(self, source: Path, meta: dict, tta: str, accuracy: dict | None):
        self.source = source
        self.meta = meta
        self.tta = tta
        self.classes: list[str] = list(meta["classes"])
        self.image_size = int(meta["image_size"])
        self.accuracy = accuracy

    def logits(self, images: np.ndarray) -> np.ndarray:  # (N, S, S, 3) uint8 -> (N, C) float32
        raise NotImplementedError

    def describe(self) -> dict:
        m = self.meta
        return {"model": m.get("model"), "hparams": m.get("hparams") or {}, "format": self.kind,
                "file": self.source.name, "classes": self.classes, "num_classes": len(self.classes),
                "input": {"image_size": self.image_size, "channels": 3, "color": "RGB",
                          "resize": "bicubic to image_size x image_size, transparency on black"},
                "normalization": {"mean": m.get("mean"), "std": m.get("std")},
                "tta": self.tta, "tta_views": tta_views(self.tta), "accuracy": self.accuracy}


class TorchBackend(Backend):
    kind = "pytorch"

    def __init__(self, path: Path, tta: str | None, device: str):
        import cifarlab

        self.predictor = cifarlab.load(path, tta=tta, device=device)
        super().__init__(path, dict(self.predictor.meta), self.predictor.tta, _run_accuracy(path, self.predictor.tta))

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.predictor.logits(list(images), batch_size=max(1, len(images))).numpy()


class OnnxBackend(Backend):
    def __init__(self, path: Path, tta: str | None, threads: int | None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CifarlabError("serving an ONNX file needs onnxruntime: pip install 'cifarlab[serve]'") from None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types: a bad or foreign file
            raise CifarlabError(f"cannot load {path} with onnxruntime: {str(e).splitlines()[0]}") from None
        meta = _onnx_meta(path, self.session)
        self.kind = meta.get("format", "onnx") if str(meta.get("format", "")).startswith("onnx") else "onnx"
        names = [i.name for i in self.session.get_inputs()]
        if names != ["image"]:
            raise CifarlabError(f"{path} takes inputs {names}, not cifarlab's one input 'image': is it a cifarlab "
                                f"export?")
        tta = "none" if tta is None else tta
        acc = meta.get("test_acc") if isinstance(meta.get("test_acc"), dict) else None
        accuracy = None
        if acc and tta == "none":  # the sidecar's accuracy is of one view
            key = "int8" if self.kind == "onnx-int8" else "fp32"
            if key in acc:
                accuracy = {"test_acc": acc[key], "images": acc.get("images"), "tta": "none",
                            "source": path.name + ".json"}
        super().__init__(path, meta, tta, accuracy)

    def _run(self, x):  # torch float (N, 3, S, S) in [0, 1] -> torch logits
        import torch

        return torch.from_numpy(self.session.run(["logits"], {"image": x.contiguous().numpy()})[0])

    def logits(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0  # (N, 3, S, S) in [0, 1]
        if self.tta == "none":  # NumPy only: PyTorch is not even imported
            return self.session.run(["logits"], {"image": x})[0]
        import torch

        from ..evaluation.inference import tta_logits

        # evaluate's own TTA code around the ONNX graph; flips and shifts commute with the normalization inside it
        return tta_logits(self._run, torch.from_numpy(x), self.tta).numpy()


def tta_views(tta: str) -> int:
    """Forward passes per image (``evaluation.inference.TTA_VIEWS``), imported only when there is TTA."""
    if tta == "none":
        return 1
    from ..evaluation.inference import TTA_VIEWS

    return TTA_VIEWS[tta]


def _onnx_meta(path: Path, session) -> dict:
    """The export's sidecar (``model.onnx.json``, which also holds the measured accuracy), else the metadata inside
    the file."""
    side = path.with_name(path.name + ".json")
    meta = None
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError):
            meta = None
    if meta is None:
        raw = session.get_modelmeta().custom_metadata_map.get("cifarlab")
        meta = json.loads(raw) if raw else None
    if not isinstance(meta, dict) or any(k not in meta for k in ("classes", "image_size")):
        raise CifarlabError(f"{path} has no cifarlab metadata (classes, image size): serve an ONNX file written by "
                            f"cifarlab export, with its .json beside it")
    return meta


def _run_accuracy(path: Path, tta: str) -> dict | None:
    """The test accuracy ``cifarlab evaluate`` recorded for the run, with the TTA being served (if measured)."""
    try:
        m = json.loads((path / "test_metrics.json").read_text()) if path.is_dir() else None
    except (OSError, ValueError):
        m = None
    if not m:
        return None
    if tta == m.get("tta") and "test_acc" in m:
        acc = m["test_acc"]
    elif tta == "none" and "test_acc_no_tta" in m:
        acc = m["test_acc_no_tta"]
    else:
        return None
    return {"test_acc": acc, "images": m.get("num_test"), "tta": tta, "source": "test_metrics.json"}


def load_backend(path: str | Path, tta: str | None = None, threads: int | None = None,
                 device: str = "cpu") -> Backend:
    """A run directory or exported ``.safetensors`` (PyTorch), or an exported ``.onnx`` (ONNX Runtime).

    ``threads``: intra-op threads of the model (default: the library's, all cores); with several worker processes
    the CLI gives each its share."""
    path = Path(path)
    if tta is not None and tta not in TTA_CHOICES:
        raise CifarlabError(f"tta must be one of {', '.join(TTA_CHOICES)}, got {tta!r}")
    if not path.exists():
        raise CifarlabError(f"not found: {path}")
    if path.suffix == ".onnx":
        return OnnxBackend(path, tta, threads)
    if path.is_dir() or path.suffix == ".safetensors":
        if threads:
            import torch

            torch.set_num_threads(threads)
        return TorchBackend(path, tta, device)
    raise CifarlabError(f"serve takes a run directory, an exported .onnx or an exported .safetensors, not {path}")


def default_threads(workers: int) -> int:
    """Each of ``workers`` processes gets its share of the cores, so that they do not fight over them."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
