"""Export a run's best weights for use outside cifarlab: ONNX, TorchScript or safetensors.

ONNX and TorchScript files hold the model *with the run's normalization in front*
(:class:`Normalized`), so their one input is what any image library gives:

* input ``image``: float32 (N, 3, S, S), RGB, values in [0, 1] (S = the run's image size);
* output ``logits``: float32 (N, C); softmax gives the probabilities.

The class names, image size and normalization are also written into the ONNX file's
metadata and into a JSON file beside every export. ONNX goes through PyTorch's
``torch.export``-based exporter (``dynamo=True``, the default since PyTorch 2.9; it needs
``onnxscript``), with a dynamic batch dimension. :func:`check_onnx` runs the file with
onnxruntime and compares its labels with PyTorch's on the same images.

Test-time augmentation is not part of an exported graph: it is one view per image. A run
evaluated with TTA (``train.tta``) scores its ``test_acc_no_tta`` with it, not its ``test_acc``;
the sidecar says so (``tta_in_graph: false``, ``run_tta``) and :func:`export_run`'s caller prints it.

int8 (:func:`export_int8`): static quantization of the fp32 ONNX file with ONNX Runtime's tools, in the
QDQ format (QuantizeLinear / DequantizeLinear pairs around each quantized op, which ONNX Runtime fuses into
integer kernels), int8 weights per output channel and int8 activations whose ranges are calibrated (min / max)
on a few hundred of the run's own training images, through the same [0, 1] input as every other caller. The
fp32 and int8 files are then scored on the run's test split (one view each) and both accuracies go into the
int8 file's sidecar, so the cost of quantization is a number beside the file, not a guess.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import CifarlabError
from .predict import Predictor
from .io import atomic_write, atomic_write_text

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
MIN_AGREEMENT = 0.999  # share of labels ONNX must give as PyTorch does
CALIBRATION_IMAGES = 512  # training images that calibrate the int8 activation ranges (min / max)
MAX_DROP = 1.0  # points of test accuracy int8 may lose to fp32 before export warns


class ExportError(CifarlabError):
    """An export cannot be written or does not reproduce the PyTorch model."""


class Normalized(nn.Module):
    """``model((x - mean) / std)`` for x in [0, 1]: a self-contained classifier of RGB images."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)  # (N, 3, S, S) -> (N, C)


def require(modules: list[str], what: str, extra: str = "onnx") -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"{what} needs {', '.join(missing)}: pip install 'cifarlab[{extra}]'")


def sidecar(path: str | Path, fmt: str) -> Path:
    """The JSON beside an export: ``model.json`` for safetensors (what ``load_weights`` reads), else
    ``model.onnx.json`` / ``model.pt.json``, so that exports of several formats can share a folder."""
    path = Path(path)
    return path.with_suffix(".json") if fmt == "safetensors" else path.with_name(path.name + ".json")


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """Write RUN_DIR's best weights as ``fmt`` into the folder ``out`` (default ``RUN_DIR/export``) as
    ``model.<ext>`` and its JSON sidecar; an ``out`` ending in the format's extension names the file itself."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    path = Path(out) if out is not None else run_dir / "export"
    if path.is_dir() or path.suffix != FORMATS[fmt]:
        path = path / f"model{FORMATS[fmt]}"
    if fmt == "onnx":
        require(["onnx", "onnxscript"], "ONNX export")
    predictor = Predictor.from_run(run_dir, device="cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    {"onnx": export_onnx, "torchscript": export_torchscript, "safetensors": export_safetensors}[fmt](
        predictor, run_dir, path)
    return path


def _meta(predictor: Predictor, fmt: str) -> dict:
    m = predictor.meta
    # "tta": what cifarlab.load(EXPORT) defaults to, the run's evaluate TTA; the graph itself is one view.
    return {**m, "format": fmt, "tta": predictor.tta, "tta_in_graph": False, "run_tta": predictor.tta, "input": {"name": "image", "dtype": "float32", "shape": ["N", 3, m["image_size"],
            m["image_size"]], "range": [0.0, 1.0], "normalized_inside": fmt != "safetensors"},
            "output": {"name": "logits", "shape": ["N", len(predictor.classes)]}}


def _wrapped(predictor: Predictor) -> tuple[nn.Module, torch.Tensor]:
    model = Normalized(predictor.model, predictor.meta["mean"], predictor.meta["std"]).eval()
    s = predictor.image_size
    return model, torch.rand(2, 3, s, s)  # batch 2: a batch of 1 could be specialized as a constant


def export_onnx(predictor: Predictor, run_dir: Path, path: Path) -> None:
    import onnx

    model, example = _wrapped(predictor)
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=["image"],
                                        output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False,
                                        external_data=False)
    except Exception as e:  # the exporter raises many types; the model is cifarlab's, so say which
        raise ExportError(f"ONNX export of {predictor.meta['model']!r} failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    proto = program.model_proto
    meta = _meta(predictor, "onnx")
    onnx.helper.set_model_props(proto, {"cifarlab": json.dumps(meta), "classes": json.dumps(predictor.classes)})
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))  # all in one file (external_data=False)
    atomic_write_text(sidecar(path, "onnx"), json.dumps(meta, indent=2))


def export_torchscript(predictor: Predictor, run_dir: Path, path: Path) -> None:
    model, example = _wrapped(predictor)
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream (torch.export is its successor) but still what many runtimes load.
        warnings.simplefilter("ignore", FutureWarning)
        with torch.inference_mode():
            traced = torch.jit.trace(model, example)
        atomic_write(path, lambda f: torch.jit.save(traced, f, _extra_files={
            "cifarlab.json": json.dumps(_meta(predictor, "torchscript"))}))
    atomic_write_text(sidecar(path, "torchscript"), json.dumps(_meta(predictor, "torchscript"), indent=2))


def export_safetensors(predictor: Predictor, run_dir: Path, path: Path) -> None:
    """The plain state dict (no normalization inside) and its sidecar: loadable by ``cifarlab.load(PATH)``."""
    src = Path(run_dir) / "best.safetensors"
    if path.resolve() != src.resolve():
        with open(src, "rb") as f_src:
            atomic_write(path, lambda f: shutil.copyfileobj(f_src, f))
    atomic_write_text(sidecar(path, "safetensors"), json.dumps(_meta(predictor, "safetensors"), indent=2))


# --------------------------------------------------------------------------- check
def onnx_logits(path: str | Path, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Run an exported ONNX file with onnxruntime on uint8 images (N, 3, S, S)."""
    require(["onnxruntime"], "checking an ONNX file")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # respect OMP_NUM_THREADS as PyTorch does
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = [sess.run(["logits"], {"image": (images[i:i + batch_size].float() / 255.0).numpy()})[0]
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def check_onnx(path: str | Path, predictor: Predictor, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Labels and probabilities of ONNX (onnxruntime) against PyTorch on the same uint8 images (N, 3, S, S)."""
    from .evaluation.inference import predict_logits

    ref = predict_logits(predictor.model, images, predictor.norm, predictor.runtime, batch_size).cpu()
    got = torch.from_numpy(onnx_logits(path, images, batch_size))
    agree = (ref.argmax(1) == got.argmax(1)).double().mean().item() if len(images) else float("nan")
    diff = (ref.softmax(1) - got.softmax(1)).abs().max().item() if len(images) else float("nan")
    return {"images": len(images), "agreement": agree, "max_prob_diff": diff}


def run_test_images(run_dir: str | Path, data_path: str | None = None, limit: int | None = None) -> torch.Tensor:
    """The test images (uint8, N x 3 x S x S) of the data set the run was trained on."""
    from .config import load_config
    from .data import load_data

    cfg = load_config(Path(run_dir) / "config.yaml", [f"data.path={data_path}"] if data_path else [])
    x = load_data(cfg.data).test_x
    return x[:limit] if limit else x


# --------------------------------------------------------------------------- int8
def int8_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx`` (beside the fp32 file it is quantized from)."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name.removesuffix(".onnx") + ".int8.onnx")


def quantize_onnx(src: str | Path, dst: str | Path, calibration: torch.Tensor, meta: dict | None = None,
                  batch_size: int = 64) -> None:
    """Static int8 quantization of an exported fp32 ONNX file (input ``image`` in [0, 1]) into ``dst``.

    ``calibration``: uint8 images (N, 3, S, S) that set the activation ranges. QDQ format, signed int8
    activations and weights (S8S8, ONNX Runtime's recommended first choice on CPUs), weights per output
    channel (per-tensor scales lose whole channels whose weights are small), min / max calibration. The model is
    first put through ONNX Runtime's pre-processing (symbolic shape inference and graph optimization), which the
    quantizer needs to see fused Conv + BatchNorm and to know every tensor's shape. The metadata (classes,
    normalization, ...) is carried over from ``src``, its ``cifarlab`` entry replaced by ``meta`` if given.
    """
    require(["onnx", "onnxruntime"], "int8 quantization")
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(calibration), batch_size))

        def get_next(self):
            i = next(self.batches, None)
            if i is None:
                return None
            return {"image": (calibration[i:i + batch_size].float() / 255.0).numpy()}

    if len(calibration) == 0:
        raise ExportError("int8 quantization needs calibration images; the run's training split is empty")
    with tempfile.TemporaryDirectory(prefix="cifarlab-int8-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant_pre_process(str(src), str(pre))
                # A BatchNormalization the pre-processing could not fold into its conv (after a max-pool in
                # speednet, after the matrix product of ResNet18's 1x1 stage) has no int8 kernel: it stays fp32
                # between a dequantize and a quantize, and its 1-D scale gets no per-channel axis.
                keep_fp32 = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "BatchNormalization"]
                quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_fp32,
                                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        except Exception as e:  # the quantizer raises many types on graphs it cannot handle: say which file
            raise ExportError(f"int8 quantization of {src} failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
        proto = onnx.load(str(out))
        props = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
        if meta is not None:
            props["cifarlab"] = json.dumps(meta)
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, props)
        atomic_write(dst, lambda f: f.write(proto.SerializeToString()))


def onnx_accuracy(path: str | Path, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of an ONNX file (one view per image) on uint8 images (N, 3, S, S)."""
    logits = onnx_logits(path, images, batch_size)
    return float((torch.from_numpy(logits).argmax(1) == labels).double().mean()) if len(images) else float("nan")


def run_data(run_dir: str | Path, data_path: str | None = None):
    """The data set the run was trained on (:class:`~cifarlab.data.ImageData`), with its splits."""
    from .config import load_config
    from .data import load_data

    cfg = load_config(Path(run_dir) / "config.yaml", [f"data.path={data_path}"] if data_path else [])
    return load_data(cfg.data)


def calibration_images(train_x, n: int = CALIBRATION_IMAGES, seed: int = 0) -> torch.Tensor:
    """``n`` training images drawn at random (seeded: the same run gives the same int8 file), uint8."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_x), generator=g)[:n].sort().values
    return train_x[idx]  # a tensor or a streamed split (HostImages): both gather rows by an index tensor


def test_subset(data, n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split, or ``n`` of its images drawn at random (seeded): a folder's test images come sorted by class,
    so its first ``n`` would be a few classes only. uint8 images (n, 3, S, S) and labels."""
    if not n or n >= len(data.test_y):
        return data.test_x[:len(data.test_y)], data.test_y  # a slice gathers a streamed split (HostImages)
    idx = torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return data.test_x[idx], data.test_y[idx]


def export_int8(run_dir: str | Path, fp32_path: str | Path, data=None, data_path: str | None = None,
                calibration: int = CALIBRATION_IMAGES, test_images: int | None = None) -> tuple[Path, dict]:
    """Quantize RUN_DIR's exported ``model.onnx`` into ``model.int8.onnx``, calibrated on ``calibration`` of the
    run's training images, and score both files on its test split (``test_images`` of them at random, default all).

    Writes the int8 file's sidecar (the fp32 one's, with ``format: onnx-int8``, the quantization settings and
    ``test_acc``: fp32, int8 and the drop in points) and adds the fp32 accuracy to the fp32 file's sidecar.
    Returns the int8 path and the ``test_acc`` record."""
    fp32_path = Path(fp32_path)
    data = data if data is not None else run_data(run_dir, data_path)
    dst = int8_path(fp32_path)
    calib = calibration_images(data.train_x, calibration)
    meta32 = json.loads(sidecar(fp32_path, "onnx").read_text())
    meta8 = {**meta32, "format": "onnx-int8", "quantized_from": fp32_path.name, "quantization": {
        "tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "weights": "int8 per channel",
        "activations": "int8 per tensor", "calibration": "minmax", "calibration_images": len(calib),
        "calibration_split": "train"}}
    quantize_onnx(fp32_path, dst, calib, meta8)
    x, y = test_subset(data, test_images)
    acc32, acc8 = onnx_accuracy(fp32_path, x, y), onnx_accuracy(dst, x, y)
    record = {"fp32": acc32, "int8": acc8, "drop_points": round(100 * (acc32 - acc8), 4), "images": len(y),
              "split": "test", "tta": "none"}
    atomic_write_text(sidecar(fp32_path, "onnx"), json.dumps({**meta32, "test_acc": {
        k: record[k] for k in ("fp32", "images", "split", "tta")}}, indent=2))
    atomic_write_text(sidecar(dst, "onnx"), json.dumps({**meta8, "test_acc": record}, indent=2))
    return dst, record
