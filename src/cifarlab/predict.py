"""Prediction on new images with a trained run: ``cifarlab.load(RUN_DIR).predict(images)``.

A :class:`Predictor` is rebuilt from the best weights by the loader ``evaluate`` and ``export`` use too
(:func:`cifarlab.evaluation.loader.load_model`): ``best.safetensors`` and its ``best.json`` sidecar hold
the model name, hyperparameters, classes, normalization and image size, so a run directory (or an
exported ``.safetensors`` with its ``.json``) is enough; the training data is not needed. Every input
goes through the same conversion as the training images (:func:`cifarlab.pixels.to_rgb_array`:
alpha composited on black, grayscale and palette to RGB, bicubic resize to ``image_size``), then the
same normalization (:class:`cifarlab.data.loader.Normalize`), so a test image scores the same here as
in ``cifarlab evaluate``: with the same test-time augmentation, which defaults to the one ``evaluate``
used (``test_metrics.json``, else the run's ``train.tta``; ``tta="none"`` for one view).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import yaml
from PIL import Image
from tqdm import tqdm

from .data.folder import IMAGE_EXTS, decode_image
from .data.loader import Normalize
from .errors import CifarlabError, DataError
from .evaluation.inference import TTA_VIEWS, predict_logits
from .evaluation.loader import load_model
from .pixels import to_rgb_array
from .train.runtime import Runtime

ImageInput = Any  # str | Path | PIL.Image.Image | np.ndarray (H, W), (H, W, 3|4) or (N, H, W, 3)


@dataclass
class Prediction:
    """The top-k classes of one image, most probable first."""

    source: str  # the file, or "image[i]" for an in-memory image
    labels: list[str]
    probs: list[float]
    indices: list[int]

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def prob(self) -> float:
        return self.probs[0]

    def to_dict(self) -> dict:
        return {"image": self.source,
                "top_k": [{"label": lab, "prob": p} for lab, p in zip(self.labels, self.probs)]}


class Predictor:
    """A trained model with its preprocessing; see :func:`cifarlab.load`."""

    def __init__(self, model: torch.nn.Module, meta: dict, device: torch.device, tta: str = "none"):
        if tta not in TTA_VIEWS:
            raise CifarlabError(f"tta must be one of {', '.join(TTA_VIEWS)}, got {tta!r}")
        self.model = model.to(device).eval()
        self.meta = meta
        self.tta = tta  # test-time augmentation of every prediction (see run_tta)
        self.classes: list[str] = list(meta["classes"])
        self.image_size = int(meta["image_size"])
        self.device = device
        # fp32 and the default memory format: predictions are few, exact probabilities matter more than speed.
        self.runtime = Runtime(device, "fp32", channels_last=False)
        self.norm = Normalize(meta["mean"], meta["std"], device)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", tta: str | None = None) -> "Predictor":
        """Load ``RUN_DIR/best.safetensors`` (or a given ``.safetensors`` file) and its JSON sidecar
        (:func:`cifarlab.evaluation.loader.load_model`).

        ``tta``: none | flip | flip_translate; default: what ``cifarlab evaluate`` used (:func:`run_tta`)."""
        loaded = load_model(run_dir, device)
        return cls(loaded.model, loaded.meta, loaded.runtime.device,
                   tta=run_tta(run_dir, loaded.meta) if tta is None else tta)

    # ----------------------------------------------------------------- inputs
    def to_uint8(self, image: ImageInput) -> np.ndarray:
        """One image (path, Pillow image or uint8 array) as (image_size, image_size, 3) uint8 RGB."""
        if isinstance(image, (str, os.PathLike)):
            return decode_image(image, self.image_size)
        if isinstance(image, Image.Image):
            image.load()
            return to_rgb_array(image, self.image_size)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise DataError(f"image arrays must be uint8 (0..255), got {image.dtype}")
            if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4)):
                arr = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
                return to_rgb_array(Image.fromarray(np.ascontiguousarray(arr)), self.image_size)
            raise DataError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}")
        raise DataError(f"cannot predict on a {type(image).__name__}: give file paths, Pillow images or uint8 arrays")

    # ------------------------------------------------------------ prediction
    def logits(self, images: Sequence[ImageInput], batch_size: int = 256) -> torch.Tensor:
        """Logits (N, C) in fp32 on the CPU for a list of images."""
        out = [self._logits_batch(list(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def _logits_batch(self, images: list[ImageInput]) -> torch.Tensor:
        x = torch.from_numpy(np.stack([self.to_uint8(im) for im in images])).permute(0, 3, 1, 2)  # (B, 3, H, W)
        return predict_logits(self.model, x, self.norm, self.runtime, len(images), self.tta).cpu()

    def predict(self, images: ImageInput | Sequence[ImageInput], top_k: int = 3, batch_size: int = 256,
                progress: bool | None = None) -> Prediction | list[Prediction]:
        """Top-k classes and probabilities.

        ``images``: one image (a file path, a Pillow image, a uint8 array) gives one :class:`Prediction`;
        a list of them, a folder (searched recursively) or a (N, H, W, 3) uint8 array gives a list.
        """
        single = _is_single(images)
        items = expand_inputs([images] if single or isinstance(images, (str, os.PathLike)) else images)
        preds = list(self.iter_predict(items, top_k, batch_size, progress))
        return preds[0] if single else preds

    def iter_predict(self, items: Sequence[ImageInput], top_k: int = 3, batch_size: int = 256,
                     progress: bool | None = None) -> Iterator[Prediction]:
        """Predict in batches of ``batch_size``; a progress bar (stderr) when there is more than one batch."""
        if top_k < 1:
            raise CifarlabError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, len(self.classes))
        show = len(items) > batch_size if progress is None else progress
        bar = tqdm(total=len(items), unit="img", desc="predict", disable=not show, leave=False)
        for start in range(0, len(items), batch_size):
            chunk = list(items[start:start + batch_size])
            probs = torch.softmax(self._logits_batch(chunk), dim=1)
            top = probs.topk(k, dim=1)
            for i, im in enumerate(chunk):
                idx = top.indices[i].tolist()
                yield Prediction(source=str(im) if isinstance(im, (str, os.PathLike)) else f"image[{start + i}]",
                                 labels=[self.classes[j] for j in idx], probs=top.values[i].tolist(), indices=idx)
            bar.update(len(chunk))
        bar.close()

    # ------------------------------------------------------------ explanation
    def check_explainable(self) -> None:
        """An :class:`cifarlab.evaluation.explain.ExplainError` (one line) when the model has no layer for Grad-CAM."""
        from .evaluation.explain import explain_layer

        explain_layer(self.model, torch.zeros(1, 3, self.image_size, self.image_size, device=self.device))

    def explain(self, images: Sequence[ImageInput], targets: Sequence[int] | None = None, batch_size: int = 64,
                backend: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Grad-CAM (:mod:`cifarlab.evaluation.explain`) of each image, one view (no test-time augmentation):
        (the images as the model saw them (N, S, S, 3) uint8, their maps (N, S, S) in [0, 1], the explained
        classes (N,)). ``targets``: a class index per image; None: the model's prediction."""
        from .evaluation.explain import heatmaps

        rgb = np.stack([self.to_uint8(im) for im in images]) if len(images) else \
            np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        maps, classes = heatmaps(self.model, torch.from_numpy(rgb).permute(0, 3, 1, 2), self.norm, targets,
                                 device=self.device, backend=backend, batch_size=batch_size)
        return rgb, maps, classes


def write_overlays(predictor: Predictor, preds: Sequence[Prediction], items: Sequence[ImageInput],
                   out_dir: str | Path, batch_size: int = 64) -> list[Path]:
    """One PNG per image in ``out_dir``: the image and, beside it, the Grad-CAM map of its predicted class over
    it (:func:`cifarlab.evaluation.explain.side_by_side`), named after the input file (``cat.jpg`` ->
    ``cat.png``; files of the same name get their folders' names too: :func:`overlay_names`). The PNG's text
    fields name the image, the class and its probability."""
    from PIL.PngImagePlugin import PngInfo

    from .evaluation.explain import side_by_side
    from .io import atomic_write

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CifarlabError(f"--explain {out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = overlay_names([p.source for p in preds])
    written = []
    for start in range(0, len(preds), batch_size):
        chunk = list(preds[start:start + batch_size])
        rgb, maps, _ = predictor.explain(list(items[start:start + len(chunk)]), [p.indices[0] for p in chunk],
                                         batch_size=batch_size)
        for p, image, heat, name in zip(chunk, rgb, maps, names[start:start + len(chunk)]):
            info = PngInfo()
            for key, value in (("image", p.source), ("explained", p.label), ("prob", f"{p.prob:.6f}"),
                               ("method", "Grad-CAM")):
                info.add_text(key, value)
            pic = Image.fromarray(side_by_side(image, heat))
            atomic_write(out_dir / name, lambda f: pic.save(f, format="PNG", pnginfo=info))
            written.append(out_dir / name)
    return written


def overlay_names(sources: Sequence[str]) -> list[str]:
    """``<stem>.png`` per source (a file path, or ``image[i]``); where stems repeat, the folders above them are
    prefixed until the names differ (``cat/0000.jpg``, ``ship/0000.jpg`` -> ``cat_0000.png``, ``ship_0000.png``),
    then ``-2``, ``-3``... for what still repeats (the same file twice)."""
    def clean(s: str) -> str:
        return "".join(c if c.isalnum() or c in "-_.[]" else "_" for c in s)

    parts = [(q.parts[1:] if q.anchor else q.parts) or ("image",) for q in (Path(s).with_suffix("") for s in sources)]
    depth = [1] * len(sources)

    def label(i: int) -> str:
        return "_".join(clean(x) for x in parts[i][-depth[i]:]) or "image"

    while True:  # lengthen the colliding names by a folder each round, while they have folders to give
        names = [label(i) for i in range(len(sources))]
        count = Counter(names)
        grow = [i for i, n in enumerate(names) if count[n] > 1 and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    used: set[str] = set()
    out = []
    for stem in names:
        name, k = f"{stem}.png", 1
        while name in used:
            k += 1
            name = f"{stem}-{k}.png"
        used.add(name)
        out.append(name)
    return out


def run_tta(path: str | Path, meta: dict | None = None) -> str:
    """The test-time augmentation ``cifarlab evaluate`` used for a run, so that predictions reproduce its
    accuracy: ``test_metrics.json``'s, else the run's ``train.tta`` (config.yaml), else the weights'
    sidecar (an export), else none."""
    path = Path(path)
    if path.is_dir():
        try:
            return str(json.loads((path / "test_metrics.json").read_text())["tta"])
        except (OSError, ValueError, KeyError):
            pass
        try:
            return str(((yaml.safe_load((path / "config.yaml").read_text()) or {}).get("train") or {})["tta"])
        except (OSError, yaml.YAMLError, KeyError, AttributeError, TypeError):
            pass
    return str((meta or {}).get("tta", "none"))


def _is_single(images: Any) -> bool:
    if isinstance(images, Image.Image):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim == 2 or (images.ndim == 3 and images.shape[2] in (1, 3, 4))
    if isinstance(images, (str, os.PathLike)):
        return not Path(images).is_dir()
    return False


def expand_inputs(items: Sequence[ImageInput]) -> list[ImageInput]:
    """Folders become their image files (recursively, sorted); a (N, H, W, C) array becomes N images."""
    out: list[ImageInput] = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            p = Path(item)
            if p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
                if not files:
                    raise DataError(f"no images in folder {p}")
                out += files
            elif not p.exists():
                raise DataError(f"image not found: {p}")
            else:
                out.append(p)
        elif isinstance(item, np.ndarray) and item.ndim == 4:
            out += list(item)
        else:
            out.append(item)
    return out
