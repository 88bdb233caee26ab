"""Labels-file source: ``--data ROOT --labels labels.csv`` (Kaggle style).

The CSV has a header row. The image column is the first of ``path, file, filename, image, image_id, id, name``
present (else the first column), the label column the first of ``label, class, target, category, y`` (else the
second column), and an optional ``split`` column holds ``train``, ``val`` (``valid``, ``validation``) or
``test``. An image value is a path relative to ROOT (or absolute); one without an extension is looked up as
``ROOT/<id>.<ext>`` for the image extensions Pillow reads, as Kaggle's ``id,label`` files need. Classes are the
sorted label values of the training rows.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..errors import DataError
from .folder import IMAGE_EXTS, SPLIT_NAMES, decode_splits, split_files
from .registry import RawData, Source, register_source

PATH_COLUMNS = ("path", "file", "filename", "image", "image_id", "id", "name")
LABEL_COLUMNS = ("label", "class", "target", "category", "y")


def _pick(header: list[str], names: tuple[str, ...], fallback: int, what: str, labels: Path) -> int:
    lower = [h.strip().lower() for h in header]
    for n in names:
        if n in lower:
            return lower.index(n)
    if fallback >= len(header):
        raise DataError(f"{labels}: no {what} column (expected one of: {', '.join(names)})")
    return fallback


def read_labels(root: Path, labels: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Classes and per-split (file, label) pairs; 'all' when the file has no split column."""
    if not labels.is_file():
        raise DataError(f"labels file not found: {labels}")
    try:
        with open(labels, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{labels}: not a readable CSV file ({e})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise DataError(f"{labels}: needs a header row and at least one image row")
    header, body = rows[0], rows[1:]
    pi = _pick(header, PATH_COLUMNS, 0, "image path", labels)
    li = _pick(header, LABEL_COLUMNS, 1 if pi == 0 else 0, "label", labels)
    lower = [h.strip().lower() for h in header]
    si = lower.index("split") if "split" in lower else None
    spellings = {s: split for split, names in SPLIT_NAMES.items() for s in names}
    existing = {e.name for e in os.scandir(root) if e.is_file()}  # one listing instead of a stat per guess
    entries: list[tuple[str, Path, str]] = []
    missing = []
    for n, r in enumerate(body, start=2):
        if len(r) <= max(pi, li, si or 0):
            raise DataError(f"{labels}:{n}: expected {len(header)} columns, found {len(r)}")
        value, label = r[pi].strip(), r[li].strip()
        split = "all"
        if si is not None:
            split = spellings.get(r[si].strip().lower(), "")
            if not split:
                raise DataError(f"{labels}:{n}: split {r[si]!r} is not train, val or test")
        p = Path(value) if Path(value).is_absolute() else root / value
        if not Path(value).suffix and not p.exists():
            hits = [root / f"{value}{e}" for e in sorted(IMAGE_EXTS) if f"{value}{e}" in existing]
            p = hits[0] if hits else p
        if not p.is_file():
            missing.append(value)
            continue
        entries.append((label, p, split))
    if missing:
        raise DataError(f"{labels}: {len(missing)} listed image(s) not found under {root}, e.g. "
                        f"{', '.join(missing[:3])}")
    main = "train" if any(s == "train" for _, _, s in entries) else "all"
    if si is not None and main == "all":
        raise DataError(f"{labels}: the split column names no training rows")
    classes = sorted({lbl for lbl, _, s in entries if s == main})
    unknown = sorted({lbl for lbl, _, s in entries if s != main} - set(classes))
    if unknown:
        raise DataError(f"{labels}: label(s) in val/test rows but not in training rows: {', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    files: dict[str, list[tuple[Path, int]]] = {}
    for lbl, p, s in entries:
        files.setdefault(s, []).append((p, index[lbl]))
    return classes, files


@register_source("labels")
def _resolve(spec: str | None, cfg) -> Source | None:
    if not getattr(cfg, "labels", None):
        return None
    root = Path(spec or ".").expanduser()
    if not root.is_dir():
        raise DataError(f"--labels needs --data ROOT to be the folder its image paths are relative to; {root} "
                        f"is not a folder")
    labels = Path(cfg.labels).expanduser()
    if not labels.is_absolute() and not labels.exists() and (root / labels).exists():
        labels = root / labels

    def load(c) -> RawData:
        from .cache import cached, fingerprint
        from .folder import fingerprint_entries

        classes, files = read_labels(root, labels)
        st = labels.stat()
        fp = fingerprint([(str(labels.resolve()), st.st_size, st.st_mtime_ns), *fingerprint_entries(files)],
                         kind="labels", size=c.image_size, skip=c.skip_bad_images)
        raw = cached(labels, fp, lambda: decode_splits(files, classes, c.image_size, c.skip_bad_images,
                                                       f"{root} ({labels.name})", {"layout": f"labels file {labels.name}"},
                                                       root=root))
        if "files" not in raw.info and not raw.skipped:  # a cache written before paths were recorded
            raw.info.update(root=str(root), files=split_files(files, root))
        return raw

    return Source("labels", root, load)
