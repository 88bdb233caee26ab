"""``audit.html``: counts of label issues, duplicates and odd images by kind and class, then galleries.

Self-contained like the other pages (:mod:`.html`): each image a small PNG embedded as a data URI, upscaled
with nearest-neighbour pixels by the browser, under its file name, given and suggested label and score;
duplicate pairs side by side.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..io import atomic_write_text
from . import html as H

_STYLE = ("<style>.gal{display:flex;flex-wrap:wrap;gap:10px}.card{width:150px;font-size:0.8em;word-break:break-all}"
          ".card img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ccc}"
          ".pair{display:flex;gap:4px}.pcard{width:210px;font-size:0.8em;word-break:break-all}"
          ".pcard img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ccc}</style>")


def png_uri(img: np.ndarray) -> str:
    """An (H, W, 3) uint8 image as a PNG data URI."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(image: Callable[[int], np.ndarray], i: int, alt: str) -> str:
    return f'<img src="{png_uri(image(i))}" alt="{H.esc(alt)}" title="{H.esc(alt)}">'


def write_audit_html(out: Path, image: Callable[[int], np.ndarray], rows: dict[str, Sequence[dict[str, Any]]],
                     classes: list[str], meta: str, gallery: int = 60) -> Path:
    """``image(i)``: the i-th image (all splits stacked) as (H, W, 3) uint8. ``rows``: the CSVs' rows, each with
    its ``i`` (and ``j`` for pairs) and the given label's class index ``y``."""
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
    cards = "".join(
        f'<div class="card">{_img(image, r["i"], r["path"])}<br>{H.esc(r["path"])} ({H.esc(r["split"])})<br>'
        f'given <b>{H.esc(r["given"])}</b>, suggested <b>{H.esc(r["suggested"])}</b><br>score {r["score"]:.3f}</div>'
        for r in issues[:gallery])
    sections.append((f"Label issues, worst first ({min(gallery, len(issues))} of {len(issues)})",
                     f'<div class="gal">{cards}</div>' if cards else "<p>none found</p>"))
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
