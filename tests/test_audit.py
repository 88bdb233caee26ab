"""cifarlab.audit's parts on generated numbers: confident learning against cleanlab (the reference, a test-only
dependency: AGPL), the blocked neighbour search against brute force, duplicates, outliers."""

from __future__ import annotations

import numpy as np
import pytest

from cifarlab.audit.label_issues import confident_joint, confident_thresholds, find_label_issues


def noisy_problem(n: int = 3000, k: int = 6, noise: float = 0.15, seed: int = 0):
    """Probabilities of an imperfect model (about 85% accurate) on labels of which ``noise`` were flipped."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    logits = rng.normal(0, 1.0, (n, k))
    logits[np.arange(n), true] += rng.normal(2.5, 1.0, n)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    given = true.copy()
    flip = rng.random(n) < noise
    given[flip] = (true[flip] + rng.integers(1, k, flip.sum())) % k
    return probs, given, flip, true


def test_thresholds_and_joint_as_cleanlab():
    from cleanlab.count import compute_confident_joint, get_confident_thresholds

    probs, given, _, _ = noisy_problem()
    t = confident_thresholds(probs, given)
    assert np.allclose(t, get_confident_thresholds(given, probs))
    C, guess = confident_joint(probs, given, t)
    ref = compute_confident_joint(given, probs, calibrate=False)
    # cleanlab takes the overall argmax where several classes are confident, the paper (and we) the most
    # probable confident class: the two differ only where the argmax is below its threshold, which is rare.
    assert np.abs(C - ref).sum() <= 0.01 * len(given)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_issues_agree_with_cleanlab(seed):
    from cleanlab.filter import find_label_issues as cl_find
    from cleanlab.rank import get_label_quality_scores

    probs, given, flip, _ = noisy_problem(seed=seed)
    ours = find_label_issues(probs, given)
    ref = cl_find(given, probs, n_jobs=1)  # filter_by="prune_by_noise_rate", cleanlab's default
    jaccard = (ours.issue & ref).sum() / (ours.issue | ref).sum()
    assert jaccard >= 0.95, jaccard  # measured: 0.99-1.0 on these problems
    for method in ("self_confidence", "normalized_margin"):
        score = find_label_issues(probs, given, method).score
        assert np.allclose(score, get_label_quality_scores(given, probs, method=method))
    # and it finds the planted errors with this ~84%-accurate model: measured 81-87% of the flips flagged,
    # 7% of the clean images (those the model gets wrong)
    assert (ours.issue & flip).sum() >= 0.75 * flip.sum()
    assert (ours.issue & ~flip).sum() <= 0.10 * (~flip).sum()
    assert (ours.score[ours.ranked()] == np.sort(ours.score[ours.issue])).all()  # worst first


def test_label_issues_suggest_the_true_label():
    probs, given, flip, true = noisy_problem(seed=3)
    res = find_label_issues(probs, given)
    found = res.issue & flip
    assert (res.suggested[found] == true[found]).mean() >= 0.85  # measured 0.875: the model's accuracy on them


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_blocked_knn_matches_brute_force(block):
    import torch

    from cifarlab.audit.neighbors import knn, normalize

    x = normalize(torch.randn(150, 12, generator=torch.Generator().manual_seed(0)))
    d, idx = knn(x, 4, block=block)
    sim = x @ x.T
    sim.fill_diagonal_(-float("inf"))
    ref_s, ref_i = sim.topk(4, dim=1)
    assert (idx == ref_i.numpy()).all() and np.allclose(d, 1 - ref_s.numpy(), atol=1e-5)
    q = normalize(torch.randn(9, 12))
    d, idx = knn(x, 3, queries=q, block=block)
    assert (idx == (q @ x.T).topk(3, dim=1).indices.numpy()).all()


def test_duplicates_exact_near_and_leaks_first():
    import torch

    from cifarlab.audit.duplicates import find_duplicates, pixel_hashes, thumbnails
    from cifarlab.audit.neighbors import normalize

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)
    x[5] = x[3]  # an exact copy inside train
    x[30] = (x[7].float() * 0.9 + 10).to(torch.uint8)  # a darker copy of a train image in test: a leak
    splits = np.array(["train"] * 25 + ["test"] * 15)
    feats = normalize(x.float().flatten(1))
    pairs = find_duplicates(pixel_hashes([x]), feats, thumbnails([x]), splits)
    got = [(p.a, p.b, p.kind) for p in pairs]
    assert got == [(7, 30, "leak-near"), (3, 5, "exact")]


def test_outliers():
    from cifarlab.audit.outliers import find_outliers

    rng = np.random.default_rng(0)
    mean, std = rng.uniform(0.3, 0.7, 100), rng.uniform(0.1, 0.3, 100)
    std[3], mean[4], mean[5] = 0.001, 0.02, 0.97
    far = rng.uniform(0.1, 0.2, 100)
    far[9] = 0.9
    kinds = {(o.index, o.kind) for o in find_outliers(mean, std, far)}
    assert kinds == {(3, "constant"), (4, "dark"), (5, "bright"), (9, "far")}


def test_too_few_images_per_class_for_the_folds():
    from cifarlab.audit.folds import assign_folds
    from cifarlab.errors import CifarlabError

    folds = assign_folds(np.repeat(np.arange(3), 8), 4, 0)
    assert sorted(np.bincount(folds)) == [6, 6, 6, 6]
    with pytest.raises(CifarlabError, match="too few images per class for 4 folds"):
        assign_folds(np.array([0, 0, 0, 1, 1, 1, 1, 1]), 4, 0)


def test_cli_audit_of_a_trained_run(trained_run, tmp_path):
    from cifarlab.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["audit", str(trained_run), "-o", str(tmp_path / "a")])
    assert done.value.code == 0
    for f in ("label_issues.csv", "duplicates.csv", "outliers.csv", "audit.html"):
        assert (tmp_path / "a" / f).is_file()
    header = (tmp_path / "a" / "label_issues.csv").read_text().splitlines()[0]
    assert header == "path,split,given,suggested,score"
    rows = (tmp_path / "a" / "label_issues.csv").read_text().splitlines()[1:]
    assert all(r.split(",")[1] in ("val", "test") for r in rows)  # the run trained on its train split


def test_fold_time_budget():
    from cifarlab.audit.run import RESERVE_PER_IMAGE, fold_time_budget
    from cifarlab.errors import CifarlabError

    per_fold, reserve = fold_time_budget("20m", 60_000, 4)  # CIFAR-10: 4 min set aside, 4 folds of 4 min
    assert reserve == pytest.approx(60_000 * RESERVE_PER_IMAGE) == 240 and per_fold == 240
    per_fold, reserve = fold_time_budget(100, 10**6, 2)  # never more than a quarter set aside
    assert reserve == 25 and per_fold == 37
    with pytest.raises(CifarlabError, match="give at least"):
        fold_time_budget("30s", 1000, 4)
    with pytest.raises(CifarlabError, match="not a duration"):
        fold_time_budget("soon", 1000, 4)


def test_audit_time_budget_shares_the_time_among_the_folds(small_folder, tmp_path):
    """--time: each fold trains to its share (train.time_budget), which plans its epochs; a rerun finds the folds
    done by their planned epochs (fewer than the config's) and trains nothing."""
    import yaml

    from cifarlab.audit.run import audit_data
    from cifarlab.config import load_config

    from .conftest import REPO, tiny_overrides

    cfg = load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(small_folder, **{"train.epochs": 1000}))
    out = tmp_path / "audit"
    lines = []
    audit_data(cfg, out, folds=2, quiet=True, log=lines.append, time="30s")
    n = 800  # 400 train + 200 validation (data.train_size, data.val_size) + 200 test images
    per_fold = int((30 - min(n * 0.004, 30 / 4)) / 2)
    assert any(f"2 folds of {per_fold}s of training each" in m for m in lines), lines
    for k in range(2):
        run_cfg = yaml.safe_load((out / "folds" / f"fold-{k}" / "config.yaml").read_text())
        assert run_cfg["train"]["time_budget"] == f"{per_fold}s"
        assert 1 <= run_cfg["train"]["epochs"] < 1000 and run_cfg["train"]["steps"] > 0  # the plan's
    lines.clear()
    audit_data(cfg, out, folds=2, quiet=True, log=lines.append, time="30s",
               fit_fn=lambda *a, **k: pytest.fail("a finished fold trained again"))
    assert sum("already done" in m for m in lines) == 2, lines


def test_audit_default_recipe_trains_3_epochs_and_set_overrides(small_folder):
    from cifarlab.cli.audit import AUDIT_EPOCHS, default_config

    cfg, name = default_config([f"data.path={small_folder}"])
    assert cfg.model.name == "speednet" and cfg.train.epochs == AUDIT_EPOCHS == 3 and "train.epochs=3" in name
    cfg, _ = default_config([f"data.path={small_folder}", "train.epochs=5"])
    assert cfg.train.epochs == 5


def _smooth_images(n: int, size: int = 32, seed: int = 0):
    """Random smooth images (noise upsampled), like photos at low frequencies."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g), size=size, mode="bilinear")
    return (x * 255).to(torch.uint8)


def test_shifted_and_cropped_copies_are_near_duplicates_by_pixels_alone():
    """Features that know nothing (random): the spectra find the shifted copy, the shift-tolerant thumbnail
    distance confirms it; a 2-pixel wrap-around shift and a 3-pixel crop-and-pad both count."""
    import torch

    from cifarlab.audit.duplicates import (find_duplicates, grey_thumbnails, pixel_hashes, shift_distance,
                                           spectra, thumbnails)
    from cifarlab.audit.neighbors import normalize

    x = _smooth_images(60)
    x[50] = torch.roll(x[3], 2, dims=2)  # shifted down 2 pixels, wrapped
    x[51] = torch.nn.functional.pad(x[9][:, :, 3:], (0, 3), mode="replicate")  # cropped 3 columns, padded back
    splits = np.array(["train"] * 45 + ["test"] * 15)
    feats = normalize(torch.randn(60, 16, generator=torch.Generator().manual_seed(1)))
    feats[50], feats[51] = feats[3], feats[9]  # a model that sees them alike (the pixel side is under test)
    grey = grey_thumbnails([x])
    a, b = torch.tensor([3, 9, 0]), torch.tensor([50, 51, 1])
    d = shift_distance(grey, a, b)
    assert d[0] < 0.02 and d[1] < 0.05 and d[2] > 0.1, d  # the unrelated pair stays far
    plain = 1 - (thumbnails([x])[a] * thumbnails([x])[b]).sum(1)
    assert plain[0] > 2 * d[0]  # what the fixed 8 x 8 thumbnails see of the shift
    pairs = find_duplicates(pixel_hashes([x]), feats, thumbnails([x]), splits, grey=grey, spectra=spectra([x]))
    assert [(p.a, p.b, p.kind) for p in pairs] == [(3, 50, "leak-near"), (9, 51, "leak-near")]


def test_look_alike_images_do_not_flood_the_duplicates():
    """30 noisy variants of one image (a product photographed many times) are all mutually close: the ratio test
    reports none of them, while a planted copy elsewhere, much closer than its neighbourhood, is still found."""
    import torch

    from cifarlab.audit.duplicates import find_duplicates, grey_thumbnails, pixel_hashes, spectra, thumbnails
    from cifarlab.audit.neighbors import normalize

    x = _smooth_images(80, seed=2)
    g = torch.Generator().manual_seed(3)
    for i in range(30):
        x[i] = (x[0].float() + torch.randn(x[0].shape, generator=g) * 4).clamp(0, 255).to(torch.uint8)
    x[70] = (x[60].float() * 0.95 + 6).to(torch.uint8)
    splits = np.array(["train"] * 80)
    feats = normalize(x.float().flatten(1))
    args = (pixel_hashes([x]), feats, thumbnails([x]), splits)
    kw = {"grey": grey_thumbnails([x]), "spectra": spectra([x])}
    pairs = find_duplicates(*args, **kw)
    assert [(p.a, p.b) for p in pairs] == [(60, 70)], [(p.a, p.b, round(p.distance, 3)) for p in pairs]
    flood = find_duplicates(*args, **kw, ratio=float("inf"))  # no ratio test: every look-alike candidate counts
    assert len(flood) >= 30 and all(p.distance < 0.1 for p in flood)


def _clustered(n: int, d: int, centres: int, seed: int):
    import torch

    from cifarlab.audit.neighbors import normalize

    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g)
    return normalize(c[torch.randint(0, centres, (n,), generator=g)] + 0.6 * torch.randn(n, d, generator=g))


def test_bucketed_knn_finds_most_neighbours_and_every_planted_pair():
    import torch

    from cifarlab.audit.neighbors import knn, knn_buckets, normalize, search

    x = _clustered(3000, 16, 20, 0)
    g = torch.Generator().manual_seed(1)
    x[2900:] = normalize(x[:100] + 0.02 * torch.randn(100, 16, generator=g))  # 100 near duplicates of 0..99
    d, idx = knn_buckets(x, 5, lists=40, probe=6)
    ref_d, ref_i = knn(x, 5)
    assert (idx != np.arange(3000)[:, None]).all() and (idx >= 0).all()  # never itself; always k found
    assert (np.diff(d, axis=1) >= -1e-6).all()  # nearest first
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(idx.tolist(), ref_i.tolist())])
    assert recall >= 0.9, recall
    assert all(idx[2900 + i, 0] == i and idx[i, 0] == 2900 + i for i in range(100))  # every planted pair, first
    hit = idx == ref_i  # where they agree, the distances are the exact ones
    assert np.allclose(d[hit], ref_d[hit], atol=1e-5)
    q = x[:50] + 0.01
    dq, iq = knn_buckets(x, 3, queries=normalize(q), exclude_self=False, lists=40, probe=6)
    assert (iq[:, 0] == np.arange(50)).all()
    # search: exact up to exact_max, buckets above
    assert (search(x, 5, exact_max=10_000)[1] == ref_i).all()
    assert (search(x, 5, exact_max=1000)[1] == knn_buckets(x, 5)[1]).all()


@pytest.mark.parametrize("method", ["exact", "buckets"])
def test_benchmark_neighbors_finds_the_planted_pairs(method, capsys):
    import json

    from .conftest import load_benchmark

    bench = load_benchmark("audit")
    assert bench.main(["neighbors", "--n", "3000", "--dim", "24", "--planted", "100", "--method", method,
                       "--check", "100"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the last line is the JSON
    assert res["method"] == method and res["planted_recall"] == 1.0 and res["all_found"]
    assert res["peak_rss_mib"] > 0 and "O(N" in res["complexity"]
    assert method == "exact" or 0 < res["recall_vs_exact"] <= 1


def test_benchmark_flips_scores_the_planted_flips(small_folder, tmp_path, capsys):
    import csv
    import json

    from .conftest import REPO, load_benchmark, tiny_overrides

    bench = load_benchmark("audit")
    sets = [a for o in tiny_overrides(small_folder, **{"data.path": None, "train.epochs": 1}) for a in ("--set", o)]
    assert bench.main(["flips", "--data", str(small_folder), "--flips", "30", "--folds", "2", "-c",
                       str(REPO / "configs" / "cnn.yaml"), "-o", str(tmp_path / "o"), *sets]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["flips"] == 30 and res["train_images"] == 400 and set(res["precision_at_k"]) == {"30", "60"}
    assert 0 <= res["auc"] <= 1 and all(0 <= v <= 1 for v in res["precision_at_k"].values())
    rows = list(csv.DictReader(open(res["relabel"])))
    assert len(rows) == 30 and len({r["path"] for r in rows}) == 30
    assert all(r["path"].startswith("train/") for r in rows)


@pytest.mark.parametrize("case, match", [
    ("few", "too few images per class for 4 folds"),
    ("exclude", "data.exclude: 'train/cat/nope.jpg' names no image"),
    ("relabel", "unknown class 'unicorn'"),
    ("time", "--time 5s: "),
    ("folds", "--folds must be >= 2"),
    ("run_storage", "--storage shares the folds of an audit by folds"),
])
def test_cli_audit_bad_input_is_a_one_line_error(case, match, tmp_path, capsys):
    from cifarlab.cli.main import main

    from .conftest import REPO, make_subset

    data = make_subset(tmp_path / "d", 3 if case == "few" else 12, 2)
    args = ["audit", "--data", str(data), "-c", str(REPO / "configs" / "cnn.yaml"), "-o", str(tmp_path / "o"),
            "--set", "data.val_size=0", "--set", "train.device=cpu"]
    edit = tmp_path / "edit.csv"
    if case == "exclude":
        edit.write_text("path\ntrain/cat/nope.jpg\n")
        args += ["--set", f"data.exclude={edit}"]
    elif case == "relabel":
        first = sorted((data / "train" / "cat").iterdir())[0].name
        edit.write_text(f"path,label\ntrain/cat/{first},unicorn\n")
        args += ["--set", f"data.relabel={edit}"]
    elif case == "time":
        args += ["--time", "5s"]
    elif case == "folds":
        args += ["--folds", "1"]
    elif case == "run_storage":
        args = ["audit", str(tmp_path), "--storage", f"sqlite:///{tmp_path / 's.db'}", "-o", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as done:
        main(args)
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and match in err and len(err.splitlines()) == 1, err
