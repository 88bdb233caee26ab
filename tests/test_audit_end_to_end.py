"""The audit end to end on a generated data set with planted label errors and near duplicates (the issue's
acceptance test): it must rank most planted errors above the clean images and find most planted pairs."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from cifarlab.config import load_config

from .conftest import REPO, make_subset

N_FLIPS, N_DUPS = 20, 12


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """40 train + 10 test images per class, copied; N_FLIPS train images moved to another class's folder;
    N_DUPS test images copied into train shifted by 2 pixels, recoloured, or re-encoded at JPEG quality 40."""
    src = make_subset(tmp_path_factory.mktemp("links"), 40, 10)
    root = tmp_path_factory.mktemp("planted")
    for f in src.rglob("*.jpg"):
        (root / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f.resolve(), root / f.relative_to(src))
    classes = sorted(d.name for d in (root / "train").iterdir())
    rng = np.random.default_rng(0)
    flips = []
    for n, c in enumerate(rng.choice(len(classes), N_FLIPS)):
        f = sorted((root / "train" / classes[c]).glob("0*.jpg"))[n % 40]
        to = root / "train" / classes[(c + 1 + n % 9) % 10] / f"flip{n}.jpg"
        f.rename(to)
        flips.append(to.relative_to(root).as_posix())
    pairs = []
    tests = sorted((root / "test").rglob("*.jpg"))
    for n, k in enumerate(rng.choice(len(tests), N_DUPS, replace=False)):
        t = tests[k]
        img = np.asarray(Image.open(t).convert("RGB"))
        if n % 3 == 0:
            img = np.roll(img, 2, axis=1)
        elif n % 3 == 1:
            img = np.clip(img * np.array([1.15, 0.9, 1.0]) + 8, 0, 255).astype(np.uint8)
        dup = root / "train" / t.parent.name / f"dup{n}.jpg"
        Image.fromarray(img).save(dup, quality=40 if n % 3 == 2 else 90)
        pairs.append({t.relative_to(root).as_posix(), dup.relative_to(root).as_posix()})
    return root, flips, pairs


def test_audit_finds_planted_errors_and_leaks(planted, tmp_path):
    from cifarlab.audit.run import audit_data

    root, flips, pairs = planted
    cfg = load_config(REPO / "configs" / "cnn.yaml", [
        f"data.path={root}", "data.val_size=50", "train.epochs=8", "train.val_every=8", "train.batch_size=32",
        "train.device=cpu", "train.precision=fp32", "model.widths=[16, 32, 32]", "model.hidden=64",
        "data.augment_p=0", "data.translate=2", "data.flip=random", "optim.lr=0.003"])
    out = tmp_path / "audit"
    res = audit_data(cfg, out, folds=2, quiet=True, log=lambda m: None)
    # ranking: the planted errors' scores against the clean training images' (an AUC); most of them flagged
    z = np.load(out / "scores.npz")
    rows = list(csv.DictReader(open(out / "label_issues.csv")))
    flagged = {r["path"] for r in rows}
    assert sum(f in flagged for f in flips) >= 0.6 * N_FLIPS, (len(flagged), flips)
    paths = [r["path"] for r in rows]
    assert paths[:1] and float(rows[0]["score"]) <= float(rows[-1]["score"])  # worst first
    from cifarlab.data import load_data

    data = load_data(cfg.data)
    train_score = z["score"][:len(data.train_y)]  # the ranked splits start with train
    is_flip = np.array([p in flips for p in data.paths["train"]])
    auc = (train_score[is_flip][:, None] < train_score[~is_flip][None, :]).mean()
    print(f"flips flagged {sum(f in flagged for f in flips)}/{N_FLIPS}, AUC {auc:.3f}")
    assert auc >= 0.85, auc
    # leaks: the planted pairs found, reported first
    dups = list(csv.DictReader(open(out / "duplicates.csv")))
    found = [{d["path_a"], d["path_b"]} for d in dups]
    print(f"pairs found {sum(p in found for p in pairs)}/{N_DUPS} among {len(dups)} reported")
    # Measured: 12 of 12 pairs and nothing else reported (before the shift-tolerant pixel distance and the spectra
    # candidates: 7 of 12 among 16, none of the 2-pixel shifts). Stated thresholds: at least 10 of 12, at least
    # 3 of the 4 of each kind (shifted, recoloured, re-encoded), at most 4 pairs reported beyond the planted ones.
    assert sum(p in found for p in pairs) >= 10, (pairs, dups[:20])
    for kind in range(3):
        assert sum(pairs[n] in found for n in range(kind, N_DUPS, 3)) >= 3, (kind, pairs, dups[:20])
    assert sum(f not in pairs for f in found) <= 4, [d for d in dups if {d["path_a"], d["path_b"]} not in pairs]
    kinds = [d["kind"] for d in dups]
    assert kinds == sorted(kinds, key=lambda k: not k.startswith("leak"))
    assert res["leaks"] >= 5
    html = (out / "audit.html").read_text()
    assert "Label issues" in html and flips[0].split("/")[-1] in html or len(rows) > 60
    # a rerun reuses the folds (nothing trains again)
    res2 = audit_data(cfg, out, folds=2, quiet=True, log=lambda m: None,
                      fit_fn=lambda *a, **k: pytest.fail("a finished fold trained again"))
    assert res2["label_issues"] == res["label_issues"]
    # and the audit's output cleans a run: data.exclude on label_issues.csv
    cfg.data.exclude = str(out / "label_issues.csv")
    assert len(load_data(cfg.data).train_y) == len(data.train_y) - sum(r["split"] == "train" for r in rows)
