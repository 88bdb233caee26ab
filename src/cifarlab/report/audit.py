"""``audit.html``: counts of label issues, duplicates and odd images by kind and class, then galleries.

Self-contained like the other pages (:mod:`.html`): each image a small PNG embedded as a data URI, upscaled
with nearest-neighbour pixels by the browser, under its file name, given and suggested label and score;
duplicate pairs side by side. Each label issue's image has, beside it, the Grad-CAM heatmap of its suggested
class (:mod:`cifarlab.evaluation.explain`) by the model that scored it: the fold model that held it out, or
the run's model (``model_of``), so the page shows where that model found the evidence against the given label.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..errors import CifarlabError
from ..io import atomic_write_text
from . import html as H
from .runs import warn

_STYLE = ("<style>.gal{display:flex;flex-wrap:wrap;gap:10px}.card{width:150px;font-size:0.8em;word-break:break-all}"
          ".card img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ccc}"
          ".pair{display:flex;gap:4px}.pcard{width:210px;font-size:0.8em;word-break:break-all}"
          ".pcard img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ccc}"
          ".card.explained{width:210px}.card img.heat{image-rendering:auto}</style>")


def png_uri(img: np.ndarray) -> str:
    """An (H, W, 3) uint8 image as a PNG data URI."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(image: Callable[[int], np.ndarray], i: int, alt: str) -> str:
    return f'<img src="{png_uri(image(i))}" alt="{H.esc(alt)}" title="{H.esc(alt)}">'


def fold_models(folder: Path, train_y: np.ndarray, folds: int, seed: int) -> Callable[[int], Path]:
    """``model_of`` for a K-fold audit: a training image (index < len(train_y)) is explained by the fold that
    held it out (its out-of-sample probabilities came from there), a validation or test image by fold 0."""
    from ..audit.folds import assign_folds

    fold_of = assign_folds(np.asarray(train_y), folds, seed)  # the folds cross_fit trained: same labels, same seed
    return lambda i: Path(folder) / f"fold-{int(fold_of[i]) if i < len(fold_of) else 0}"


def model_heatmaps(model_of: Callable[[int], Path], image: Callable[[int], np.ndarray],
                   idx: Sequence[int], targets: Sequence[int]) -> list[np.ndarray | None]:
    """The Grad-CAM map (H, W) of class ``targets[k]`` for image ``idx[k]`` by the run ``model_of(idx[k])``, each
    run loaded once; None where that run's weights are not on this machine (a fold another machine trained) or
    its model has no layer to explain (a warning says which)."""
    import torch

    from ..evaluation.explain import heatmaps
    from ..evaluation.loader import load_model

    groups: dict[Path, list[int]] = {}
    for k, i in enumerate(idx):
        groups.setdefault(Path(model_of(i)), []).append(k)
    out: list[np.ndarray | None] = [None] * len(idx)
    for run_dir, ks in groups.items():
        try:
            loaded = load_model(run_dir, "cpu")
            x = torch.from_numpy(np.stack([image(idx[k]) for k in ks])).permute(0, 3, 1, 2)  # (n, 3, H, W)
            maps, _ = heatmaps(loaded.model, x, loaded.normalize, [targets[k] for k in ks])
        except CifarlabError as e:
            warn(f"audit.html: no heatmaps from {run_dir}: {e}")
            continue
        for k, m in zip(ks, maps):
            out[k] = m
    return out


def _heat(img: np.ndarray, heat: np.ndarray, suggested: str) -> str:
    from ..evaluation.explain import overlay

    alt = f"Grad-CAM: {suggested}"
    return (f'<img class="heat" src="{png_uri(overlay(img, heat, size=max(96, img.shape[0])))}" alt="{H.esc(alt)}" '
            f'title="{H.esc(alt)}">')


def write_audit_html(out: Path, image: Callable[[int], np.ndarray], rows: dict[str, Sequence[dict[str, Any]]],
                     classes: list[str], meta: str, gallery: int = 60,
                     model_of: Callable[[int], Path] | None = None) -> Path:
    """``image(i)``: the i-th image (all splits stacked) as (H, W, 3) uint8. ``rows``: the CSVs' rows, each with
    its ``i`` (and ``j`` for pairs) and the given label's class index ``y``. ``model_of(i)``: the run directory
    whose model explains image i (its Grad-CAM beside each label issue); None: no heatmaps."""
    issues, pairs, odd = rows["label_issues"], rows["duplicates"], rows["outliers"]
    kinds: dict[str, int] = {"label issues": len(issues)}
    for p in pairs:
        kinds[f"duplicates: {p['kind']}"] = kinds.get(f"duplicates: {p['kind']}", 0) + 1
    for o in odd:
        kinds[f"odd images: {o['kind']}"] = kinds.get(f"odd images: {o['kind']}", 0) + 1
    per_class = np.zeros((len(classes), 3), np.int64)
    for r in issues:
        per_class[r["y"], 0] += 1
    for p in pairs:
        per_class[p["y"], 1] += 1
    for o in odd:
        per_class[o["y"], 2] += 1
    sections = [("Counts", H.table(["kind", "count"], sorted(kinds.items()))),
                ("By class (given label)", H.table(["class", "label issues", "duplicates (first image)", "odd images"],
                                                   [[c, *per_class[k].tolist()] for k, c in enumerate(classes)],
                                                   sortable=True))]
    shown = list(issues[:gallery])
    heat = (model_heatmaps(model_of, image, [r["i"] for r in shown], [classes.index(r["suggested"]) for r in shown])
            if model_of is not None and shown else [None] * len(shown))
    cards = "".join(
        f'<div class="card{" explained" if h is not None else ""}">{_img(image, r["i"], r["path"])}'
        f'{_heat(image(r["i"]), h, r["suggested"]) if h is not None else ""}<br>{H.esc(r["path"])} '
        f'({H.esc(r["split"])})<br>given <b>{H.esc(r["given"])}</b>, suggested <b>{H.esc(r["suggested"])}</b><br>'
        f'score {r["score"]:.3f}</div>'
        for r, h in zip(shown, heat))
    note = ("<p>Beside each image: the Grad-CAM heatmap of its suggested class by the model that scored it (warm "
            "colours: where that model found the most evidence for the suggested class).</p>"
            if any(h is not None for h in heat) else "")
    sections.append((f"Label issues, worst first ({min(gallery, len(issues))} of {len(issues)})",
                     f'{note}<div class="gal">{cards}</div>' if cards else "<p>none found</p>"))
    cards = "".join(
        f'<div class="pcard"><div class="pair">{_img(image, p["i"], p["path_a"])}{_img(image, p["j"], p["path_b"])}'
        f'</div>{H.esc(p["path_a"])} ({H.esc(p["split_a"])})<br>{H.esc(p["path_b"])} ({H.esc(p["split_b"])})<br>'
        f'{H.esc(p["kind"])}, distance {p["distance"]:.3f}</div>' for p in pairs[:gallery])
    sections.append((f"Duplicates and leaks, leaks first ({min(gallery, len(pairs))} of {len(pairs)})",
                     f'<div class="gal">{cards}</div>' if cards else "<p>none found</p>"))
    cards = "".join(
        f'<div class="card">{_img(image, o["i"], o["path"])}<br>{H.esc(o["path"])} ({H.esc(o["split"])})<br>'
        f'{H.esc(o["kind"])}, label {H.esc(o["label"])}<br>score {o["score"]:.3f}</div>' for o in odd[:gallery])
    sections.append((f"Odd images ({min(gallery, len(odd))} of {len(odd)})",
                     f'<div class="gal">{cards}</div>' if cards else "<p>none found</p>"))
    page = H.page("Data audit", meta, sections).replace("</head>", _STYLE + "</head>", 1)
    path = Path(out) / "audit.html"
    atomic_write_text(path, page)
    return path
