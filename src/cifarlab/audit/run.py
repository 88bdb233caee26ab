"""``cifarlab audit``: out-of-sample probabilities (K folds, or a trained run for its validation and test
images), then label issues, duplicates and leaks, odd images; three CSVs and ``audit.html`` (docs/audit.md)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import RunConfig, load_config
from ..data import load_data
from ..data.dataset import apply_data_defaults
from ..errors import CifarlabError
from ..io import atomic_write, atomic_write_text
from .duplicates import find_duplicates, grey_thumbnails, pixel_hashes, spectra, thumbnails
from .folds import cross_fit, logits_and_features, softmax
from .label_issues import find_label_issues
from .neighbors import normalize
from .outliers import find_outliers, knn_distance, pixel_stats

SPLITS = ("train", "val", "test")
# ``--time``: seconds per image of the data set set aside for what is not the folds' training (decoding, each
# fold loading its data and predicting its held-out, validation and test images, fold 0 every image's features,
# the neighbour searches, the report): an estimate for a 2-core CPU at 32 px (CIFAR-10's 60,000 images: 4 min),
# at most a quarter of the time given.
RESERVE_PER_IMAGE = 0.004
MIN_FOLD_SECONDS = 10.0


def fold_time_budget(total: str | float, images: int, folds: int) -> tuple[float, float]:
    """(seconds each fold trains, seconds set aside) of an audit given ``total``: whole seconds, so that the same
    command gives the same fold configs (a rerun resumes them)."""
    from ..coerce import parse_duration

    seconds = parse_duration("--time", total)
    reserve = min(RESERVE_PER_IMAGE * images, seconds / 4)
    per_fold = float(int((seconds - reserve) / folds))
    if per_fold < MIN_FOLD_SECONDS:
        raise CifarlabError(f"--time {total}: {per_fold:.0f}s a fold after {reserve:.0f}s set aside for "
                            f"{images} images; give at least {folds * MIN_FOLD_SECONDS + reserve:.0f}s, "
                            f"or fewer --folds")
    return per_fold, reserve


def _chunks(xs, n: int = 4096):
    for x in xs:
        for i in range(0, len(x), n):
            yield x[i:i + n]


def _write_csv(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([f"{r[h]:.6g}" if isinstance(r[h], float) else r[h] for h in header])
    atomic_write_text(path, buf.getvalue())


def analyse(data, probs: dict[str, np.ndarray | None], features: np.ndarray, out: Path, *,
            method: str = "self_confidence", dup_threshold: float = 0.1, meta: str = "",
            model_of: Callable[[int], Path] | None = None) -> dict[str, Any]:
    """Everything after the probabilities: ``probs`` per split (None: no out-of-sample probabilities, not
    ranked), ``features`` (N, d) of all images stacked train, val, test."""
    xs = [getattr(data, f"{s}_x") for s in SPLITS]
    ys = [getattr(data, f"{s}_y").numpy() for s in SPLITS]
    n = [len(y) for y in ys]
    starts = np.cumsum([0] + n)
    split_of = np.repeat(np.array(SPLITS), n)
    paths = [p for s in SPLITS for p in data.paths[s]]
    y_all = np.concatenate(ys)
    classes = data.classes

    ranked = [s for s in SPLITS if probs.get(s) is not None and n[SPLITS.index(s)]]
    P = np.concatenate([probs[s] for s in ranked])
    at = np.concatenate([np.arange(starts[SPLITS.index(s)], starts[SPLITS.index(s) + 1]) for s in ranked])
    res = find_label_issues(P, y_all[at], method)
    issues = [{"i": int(at[r]), "path": paths[at[r]], "split": split_of[at[r]], "given": classes[y_all[at[r]]],
               "suggested": classes[res.suggested[r]], "score": float(res.score[r]), "y": int(y_all[at[r]])}
              for r in res.ranked()]

    feats = normalize(features)
    pairs = find_duplicates(pixel_hashes(_chunks(xs)), feats, thumbnails(_chunks(xs)), split_of,
                            grey=grey_thumbnails(_chunks(xs)), spectra=spectra(_chunks(xs)), threshold=dup_threshold)
    dups = [{"i": p.a, "j": p.b, "path_a": paths[p.a], "split_a": split_of[p.a], "path_b": paths[p.b],
             "split_b": split_of[p.b], "distance": p.distance, "kind": p.kind, "y": int(y_all[p.a])} for p in pairs]

    mean, std = pixel_stats(_chunks(xs))
    far = knn_distance(feats, np.arange(starts[0], starts[1]))
    odd = [{"i": o.index, "path": paths[o.index], "split": split_of[o.index], "kind": o.kind, "score": o.score,
            "label": classes[y_all[o.index]], "y": int(y_all[o.index])} for o in find_outliers(mean, std, far)]

    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "label_issues.csv", ["path", "split", "given", "suggested", "score"], issues)
    _write_csv(out / "duplicates.csv", ["path_a", "split_a", "path_b", "split_b", "distance", "kind"], dups)
    _write_csv(out / "outliers.csv", ["path", "split", "kind", "score", "label"], odd)
    atomic_write(out / "scores.npz", lambda f: np.savez(f, index=at, score=res.score, issue=res.issue,
                                                        suggested=res.suggested, far=far, classes=np.array(classes)))

    def image(i: int) -> np.ndarray:
        s = int(np.searchsorted(starts, i, side="right") - 1)
        return np.asarray(xs[s][i - starts[s]].numpy()).transpose(1, 2, 0)

    from ..report.audit import write_audit_html

    html = write_audit_html(out, image, {"label_issues": issues, "duplicates": dups, "outliers": odd}, classes,
                            meta, model_of=model_of)  # model_of: whose Grad-CAM shows beside each label issue
    summary = {"label_issues": len(issues), "ranked_splits": ranked, "duplicates": len(dups),
               "leaks": sum(d["kind"].startswith("leak") for d in dups), "outliers": len(odd),
               "outlier_kinds": {k: sum(o["kind"] == k for o in odd) for k in ("constant", "dark", "bright", "far")},
               "method": method, "dup_threshold": dup_threshold, "images": dict(zip(SPLITS, n)),
               "thresholds": res.thresholds.tolist(), "html": str(html)}
    atomic_write_text(out / "audit.json", json.dumps(summary, indent=2))
    return summary


def audit_data(cfg: RunConfig, out: str | Path, *, folds: int = 4, overwrite: bool = False, quiet: bool = False,
               log: Callable[[str], None] = print, fit_fn: Callable | None = None, time: str | float | None = None,
               storage: str | None = None, heartbeat: int = 10, poll: float = 5.0, **kw) -> dict[str, Any]:
    """The audit by K-fold cross-fitting of ``cfg`` (see :mod:`.folds`). ``time``: the whole audit's duration;
    each fold trains to ``train.time_budget`` = its share (:func:`fold_time_budget`). ``storage``: the folds
    are claimed through it by every process started alike, on any machine (:mod:`.claimed`)."""
    out = Path(out)
    data = load_data(cfg.data)
    apply_data_defaults(cfg, data)
    if time:
        per_fold, reserve = fold_time_budget(time, sum(len(getattr(data, f"{s}_y")) for s in SPLITS), folds)
        cfg.train.time_budget, cfg.train.steps = f"{per_fold:.0f}s", 0
        log(f"audit --time {time}: {folds} folds of {per_fold:.0f}s of training each, {reserve:.0f}s set aside "
            f"for decoding, predictions, neighbours and the report")
    probs, features = cross_fit(cfg, data, out, folds, overwrite=overwrite, quiet=quiet, log=log, fit_fn=fit_fn,
                                storage=storage, heartbeat=heartbeat, poll=poll)
    from ..report.audit import fold_models  # the heatmaps in audit.html: each image by the fold that scored it

    return analyse(data, probs, features, out, meta=f"{data.source} · {folds} folds of {cfg.model.name}",
                   model_of=fold_models(out / "folds", data.train_y.numpy(), folds, cfg.data.seed), **kw)


def audit_run(run_dir: str | Path, out: str | Path, **kw) -> dict[str, Any]:
    """The audit with a trained run's model: its validation and test images are ranked (the run never trained
    on them); duplicates and odd images cover every split, in the run's feature space."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CifarlabError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    data = load_data(cfg.data)
    logits, feats = logits_and_features(run_dir, [data.train_x, data.val_x, data.test_x])
    probs = {"train": None, "val": softmax(logits[1]), "test": softmax(logits[2])}
    features = np.concatenate([f for f in feats if f is not None])
    return analyse(data, probs, torch.from_numpy(features).numpy(), Path(out), meta=f"{data.source} · run {run_dir}",
                   model_of=lambda i: run_dir, **kw)
