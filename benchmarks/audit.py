"""The audit's speed and memory (issue 26): the neighbour search on generated features, and a whole audit.

    python benchmarks/audit.py neighbors --n 1000000 --dim 256            # blocked exact k-NN, time and peak RSS
    python benchmarks/audit.py data --data ../shared/datasets/cifar10-jpeg --folds 4 -o /tmp/audit-bench

The first times :func:`cifarlab.audit.neighbors.knn` on N random unit vectors (O(N^2 d) time, O(N k + block^2)
memory beyond the N x d float32 features) and reports its peak resident memory; the second runs
``cifarlab audit`` on a data set and reports the wall time and the counts it found. Writes JSON to --json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def neighbors(args) -> dict:
    import torch

    from cifarlab.audit.neighbors import knn, normalize

    torch.set_num_threads(args.threads or torch.get_num_threads())
    x = normalize(torch.randn(args.n, args.dim, generator=torch.Generator().manual_seed(0)))
    t0 = time.perf_counter()
    d, idx = knn(x, args.k, block=args.block)
    secs = time.perf_counter() - t0
    return {"what": "knn", "n": args.n, "dim": args.dim, "k": args.k, "block": args.block, "seconds": round(secs, 2),
            "features_mib": round(x.numel() * 4 / 2**20, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "checked": bool((idx >= 0).all())}


def data(args) -> dict:
    from cifarlab.audit.run import audit_data
    from cifarlab.cli.audit import default_config
    from cifarlab.config import load_config

    overrides = [f"data.path={args.data}", *args.set]
    cfg = load_config(args.config, overrides) if args.config else default_config(overrides)[0]
    t0 = time.perf_counter()
    res = audit_data(cfg, args.out, folds=args.folds, quiet=True)
    return {"what": "audit", "data": args.data, "folds": args.folds, "model": cfg.model.name,
            "seconds": round(time.perf_counter() - t0, 1),
            **{k: res[k] for k in ("label_issues", "duplicates", "leaks", "outliers", "outlier_kinds", "images")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    n = sub.add_parser("neighbors")
    n.add_argument("--n", type=int, default=1_000_000)
    n.add_argument("--dim", type=int, default=256)
    n.add_argument("--k", type=int, default=5)
    n.add_argument("--block", type=int, default=4096)
    n.add_argument("--threads", type=int, default=0)
    d = sub.add_parser("data")
    d.add_argument("--data", required=True)
    d.add_argument("--folds", type=int, default=4)
    d.add_argument("-c", "--config")
    d.add_argument("--set", action="append", default=[])
    d.add_argument("-o", "--out", default="audit-bench")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    res = neighbors(args) if args.what == "neighbors" else data(args)
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
