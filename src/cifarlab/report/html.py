"""One self-contained HTML page: inline CSS, PNGs embedded as base64 data URIs, no network.

A small inline script records, once the page has loaded, how many images decoded
(``naturalWidth > 0``) in ``data-images-loaded`` on ``<body>``, so a headless
browser's DOM dump shows whether every figure rendered.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Sequence

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0 auto;
       max-width: 1500px; padding: 1.5em 2em; color: #222; background: #fff; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92em; margin-top: 0.3em; max-width: 70em; }
pre { background: #f7f7f7; border: 1px solid #e3e3e3; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.warn { color: #8a4b00; background: #fff4e0; padding: 0.4em 0.8em; border-left: 4px solid #e0a030; }
"""

_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  // Click a column's header to sort by it (numbers as numbers); click again to reverse.
  th.style.cursor = "pointer";
  th.title = "sort";
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.getAttribute("data-order") !== "asc";
    th.closest("tr").querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-order"); });
    th.setAttribute("data-order", asc ? "asc" : "desc");
    var key = function (r) { var t = r.cells[col].textContent; var v = parseFloat(t); return isNaN(v) ? t : v; };
    rows.sort(function (a, b) { var x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img");
  var ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute("data-images-loaded", String(ok));
  document.body.setAttribute("data-images-total", String(imgs.length));
});
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "–"
        if abs(v) >= 100:  # throughput, seconds: decimals would be noise
            return f"{v:,.1f}"
        return f"{v:.{digits}f}"
    return str(v)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], sortable: bool = False) -> str:
    """An HTML table; ``sortable``: a click on a header sorts the rows by that column."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    cls = ' class="sortable"' if sortable else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(png: Path, alt: str, caption: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}" data-file="{esc(Path(png).name)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def page(title: str, meta: str, sections: Sequence[tuple[str, str]]) -> str:
    """``sections``: (heading, inner HTML) pairs, inner HTML already escaped."""
    body = "".join(f"<section><h2>{esc(h)}</h2>{inner}</section>" for h, inner in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{_CSS}</style></head>"
            f'<body><h1>{esc(title)}</h1><p class="meta">{esc(meta)}</p>{body}'
            f"<script>{_SCRIPT}</script></body></html>\n")
