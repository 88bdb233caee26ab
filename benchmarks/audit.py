"""The audit's speed and memory (issue 26): the neighbour search on generated features, a whole audit, and how
the recipe's strength changes the label-issue ranking.

    python benchmarks/audit.py neighbors --n 100000 --dim 256 --method exact     # N^2 scaling: estimate 1M from it
    python benchmarks/audit.py neighbors --n 1000000 --dim 256                   # auto: buckets above 200,000
    python benchmarks/audit.py data --data ../shared/datasets/cifar10-jpeg --folds 4 -o /tmp/audit-bench
    python benchmarks/audit.py flips --data ../shared/datasets/cifar10-jpeg --flips 500 -o /tmp/flips-weak \
        --set train.epochs=1                                  # then the default recipe, or -c a stronger one

``neighbors`` times the search the audit runs (:func:`cifarlab.audit.neighbors.search`: exact blocked k-NN,
O(N^2 d) time and O(N k + block^2) memory beyond the N x d float32 features; or, above 200,000 vectors, the
bucketed search, O(N^1.5 d) time, same memory) on N random unit vectors in which ``--planted`` near duplicates
(a vector plus a little noise) are hidden; it reports the time, the peak resident memory, the planted pairs'
recall (either of a pair among the other's k nearest, as the audit counts a candidate) and, for the bucketed
search, the recall of the exact k nearest on a sample of queries. ``data`` runs ``cifarlab audit`` on a data
set and reports the wall time and the counts. ``flips`` plants label flips into the training split (through a data.relabel file: the data set is
not touched), runs the audit, and reports the planted flips' precision among the worst-ranked training images
and the ranking's AUC, so that two recipes (weak, strong) can be compared; real label errors of the data set
count against the precision alike for both. Each prints one JSON object as its last line (and to --json).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def neighbors(args) -> dict:
    import numpy as np
    import torch

    from cifarlab.audit.neighbors import EXACT_MAX, knn, knn_buckets, normalize

    torch.set_num_threads(args.threads or torch.get_num_threads())
    g = torch.Generator().manual_seed(0)
    x = normalize(torch.randn(args.n, args.dim, generator=g))
    # planted near duplicates: the last P vectors are noisy copies of the first P (cosine distance ~ noise^2 / 2)
    P = min(args.planted, args.n // 2)
    x[args.n - P:] = normalize(x[:P] + args.noise * torch.randn(P, args.dim, generator=g) / args.dim ** 0.5)
    method = args.method if args.method != "auto" else ("exact" if args.n <= EXACT_MAX else "buckets")
    t0 = time.perf_counter()
    if method == "exact":
        d, idx = knn(x, args.k, block=args.block)
    else:
        d, idx = knn_buckets(x, args.k, lists=args.lists, probe=args.probe, block=args.block)
    secs = time.perf_counter() - t0
    copies = np.arange(args.n - P, args.n)
    # found as the audit finds a pair: either one among the other's k nearest
    planted = float(np.mean((idx[copies] == np.arange(P)[:, None]).any(1) | (idx[:P] == copies[:, None]).any(1))) \
        if P else None
    res = {"what": "neighbors", "method": method, "n": args.n, "dim": args.dim, "k": args.k, "block": args.block,
           "seconds": round(secs, 2), "features_mib": round(x.numel() * 4 / 2**20, 1),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "planted": P, "planted_recall": planted, "all_found": bool((idx >= 0).all()),
           "complexity": "exact: O(N^2 d) time, O(N k + block^2) memory beyond the N x d features" if method == "exact"
           else "buckets: O(N (L + probe N / L) d) = O(N^1.5 d) time for L = sqrt(N) lists, O(N k + block^2) memory "
                "beyond the N x d features"}
    if method == "buckets" and args.check:  # the exact k nearest of a sample of queries, by brute force
        qi = torch.randperm(args.n, generator=g)[:args.check]
        ref = knn(x, args.k, queries=x[qi], exclude_self=False, block=args.block)[1]
        ref = [[j for j in row if j != q][:args.k - 1] for row, q in zip(ref.tolist(), qi.tolist())]
        got = idx[qi.numpy()].tolist()
        res["recall_vs_exact"] = round(float(np.mean([len(set(a) & set(b)) / max(1, len(b))
                                                      for a, b in zip(got, ref)])), 4)
        res["recall_note"] = f"of the {args.k - 1} exact nearest, on {len(qi)} queries"
    print(f"{method} k-NN of {args.n:,} x {args.dim}: {secs:.1f}s, peak RSS {res['peak_rss_mib']:.0f} MiB; planted "
          f"pairs found {planted}; {res['complexity']}")
    return res


def data(args) -> dict:
    from cifarlab.audit.run import audit_data
    from cifarlab.cli.audit import default_config
    from cifarlab.config import load_config

    overrides = [f"data.path={args.data}", *args.set]
    cfg = load_config(args.config, overrides) if args.config else default_config(overrides)[0]
    t0 = time.perf_counter()
    res = audit_data(cfg, args.out, folds=args.folds, quiet=True, time=args.time)
    return {"what": "audit", "data": args.data, "folds": args.folds, "model": cfg.model.name,
            "epochs": cfg.train.epochs, "time": args.time,
            "seconds": round(time.perf_counter() - t0, 1),
            **{k: res[k] for k in ("label_issues", "duplicates", "leaks", "outliers", "outlier_kinds", "images")}}


def flips(args) -> dict:
    import csv
    import tempfile

    import numpy as np

    from cifarlab.audit.run import audit_data
    from cifarlab.cli.audit import default_config
    from cifarlab.config import load_config
    from cifarlab.data import load_data
    from cifarlab.errors import CifarlabError

    overrides = [f"data.path={args.data}", *args.set]
    cfg = load_config(args.config, overrides) if args.config else default_config(overrides)[0]
    if cfg.data.relabel:
        raise CifarlabError("flips plants its own data.relabel file: run it on a data set without one")
    data = load_data(cfg.data)
    rng = np.random.default_rng(args.seed)
    n = len(data.train_y)
    at = rng.choice(n, min(args.flips, n), replace=False)
    y = data.train_y.numpy()
    new = (y[at] + rng.integers(1, data.num_classes, len(at))) % data.num_classes  # always another class
    relabel = Path(tempfile.mkdtemp(prefix="flips-")) / "relabel.csv"
    with open(relabel, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label"])
        w.writerows([data.paths["train"][i], data.classes[c]] for i, c in zip(at, new))
    cfg.data.relabel = str(relabel)
    t0 = time.perf_counter()
    res = audit_data(cfg, args.out, folds=args.folds, quiet=True, time=args.time)
    secs = time.perf_counter() - t0
    z = np.load(Path(args.out) / "scores.npz")
    train = z["index"] < n  # the ranked training images (indices into train, val, test stacked)
    score, idx = z["score"][train], z["index"][train]
    planted = np.isin(idx, at)
    worst = np.argsort(score, kind="stable")
    top = {k: round(float(planted[worst[:k]].mean()), 4) for k in sorted({len(at), 2 * len(at), *args.top})}
    # AUC: how often a planted flip scores below (worse than) a clean image; ties count half
    s_f, s_c = np.sort(score[planted]), np.sort(score[~planted])
    below = np.searchsorted(s_c, s_f, side="right") - np.searchsorted(s_c, s_f, side="left")
    auc = float(((len(s_c) - np.searchsorted(s_c, s_f, side="right")) + 0.5 * below).sum() / (len(s_f) * len(s_c)))
    flagged = float(z["issue"][train][planted].mean())
    folds_acc = []
    for k in range(args.folds):
        summary = Path(args.out) / "folds" / f"fold-{k}" / "summary.json"
        if summary.is_file():
            folds_acc.append(json.loads(summary.read_text()).get("best_val_acc"))
    out = {"what": "flips", "data": args.data, "model": cfg.model.name, "epochs": cfg.train.epochs,
           "time": args.time, "folds": args.folds, "flips": int(len(at)), "train_images": int(n),
           "fold_val_acc": folds_acc, "precision_at_k": top, "auc": round(auc, 4), "flagged": round(flagged, 4),
           "label_issues": res["label_issues"], "seconds": round(secs, 1), "relabel": str(relabel)}
    print(f"{len(at)} planted flips among {n} training images: precision among the worst k {top}, AUC {auc:.4f}, "
          f"{flagged:.1%} flagged; fold models' validation accuracy {folds_acc}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    n = sub.add_parser("neighbors")
    n.add_argument("--n", type=int, default=1_000_000)
    n.add_argument("--dim", type=int, default=256)
    n.add_argument("--k", type=int, default=5)
    n.add_argument("--block", type=int, default=4096)
    n.add_argument("--threads", type=int, default=0)
    n.add_argument("--method", choices=["auto", "exact", "buckets"], default="auto",
                   help="auto: exact up to 200,000 vectors, buckets above (what the audit does)")
    n.add_argument("--planted", type=int, default=1000, help="near-duplicate pairs hidden in the features")
    n.add_argument("--noise", type=float, default=0.2, help="the copies' noise (cosine distance ~ noise^2 / 2)")
    n.add_argument("--lists", type=int, default=0, help="buckets: k-means lists (0: sqrt(N))")
    n.add_argument("--probe", type=int, default=8, help="buckets: the nearest lists each query searches")
    n.add_argument("--check", type=int, default=1000, help="buckets: queries whose exact neighbours are compared")
    d = sub.add_parser("data")
    d.add_argument("--data", required=True)
    d.add_argument("--folds", type=int, default=4)
    d.add_argument("-c", "--config")
    d.add_argument("--set", action="append", default=[])
    d.add_argument("--time", help="the audit's --time (default: the recipe's epochs)")
    d.add_argument("-o", "--out", default="audit-bench")
    f = sub.add_parser("flips")
    f.add_argument("--data", required=True)
    f.add_argument("--flips", type=int, default=500, help="training labels flipped to another class")
    f.add_argument("--seed", type=int, default=0, help="which images and which wrong classes")
    f.add_argument("--folds", type=int, default=4)
    f.add_argument("--time", help="the audit's --time (default: the recipe's epochs)")
    f.add_argument("--top", type=int, action="append", default=[], help="also the precision among the worst K")
    f.add_argument("-c", "--config")
    f.add_argument("--set", action="append", default=[])
    f.add_argument("-o", "--out", default="audit-flips")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    res = {"neighbors": neighbors, "data": data, "flips": flips}[args.what](args)
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
