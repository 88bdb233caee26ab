"""``cifarlab evaluate RUN_DIR``: test loss, accuracy and per-class accuracy of the best weights.

The test logits and labels are written to ``test_logits.npz`` so that reports and
comparisons derive every metric and plot from the same numbers, without
re-running the model.

A run trained with ``data.exclude`` (an audit's cleaned data) is tested on its cleaned test split, as it
trained; the accuracy on the full test split (the excluded test images put back) is reported beside it
(``test_acc_full``), so that a cleaned run compares with runs on the uncleaned data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data import ImageData, load_data
from ..errors import CifarlabError
from ..io import atomic_write, atomic_write_text
from .inference import TTA_VIEWS, evaluate
from .loader import load_model
from .metrics import Accuracy, summary_scores


def evaluate_run(run_dir: str | Path, data: ImageData | None = None, device: str = "auto",
                 tta: str | None = None, full_data: ImageData | None = None) -> dict:
    """Score ``run_dir``'s best weights on the test split; ``full_data``: the data without ``data.exclude``
    (loaded from the run's config when it has an exclude file and none is given)."""
    run_dir = Path(run_dir)
    loaded = load_model(run_dir, device, as_trained=True)
    cfg, model, meta, rt, norm = loaded.cfg, loaded.model, loaded.meta, loaded.runtime, loaded.normalize
    data = data if data is not None else load_data(cfg.data)
    if list(data.classes) != list(meta["classes"]):
        raise CifarlabError(f"the data's classes {data.classes} differ from the run's {meta['classes']}")
    tta = cfg.train.tta if tta is None else tta
    loss, acc, logits = evaluate(model, data.test_x, data.test_y, norm, rt, cfg.train.eval_batch_size, tta)
    # Both numbers: the headline with the run's TTA, and one view, what an exported model or a plain forward gives.
    plain_loss, plain_acc = (loss, acc) if tta == "none" else evaluate(
        model, data.test_x, data.test_y, norm, rt, cfg.train.eval_batch_size, "none")[:2]
    metric = Accuracy(len(data.classes))
    metric.update(logits.cpu(), data.test_y)
    res = metric.compute()
    out = {"test_loss": loss, "test_acc": acc, "per_class_acc": dict(zip(data.classes, res["per_class"])),
           "num_test": res["count"], "tta": tta, "tta_views": TTA_VIEWS[tta],
           "test_loss_no_tta": plain_loss, "test_acc_no_tta": plain_acc,
           "best_epoch": meta.get("epoch"), "val_acc": meta.get("val_acc"), "val_tta": meta.get("val_tta", "none")}
    out.update(summary_scores(logits, data.test_y, len(data.classes)))  # balanced accuracy, macro F1, top-5
    if cfg.data.exclude:
        out.update(_full_test(loaded, data, full_data, tta, acc, plain_acc))
    atomic_write_text(run_dir / "test_metrics.json", json.dumps(out, indent=2))
    atomic_write(run_dir / "test_logits.npz", lambda f: np.savez(
        f, logits=logits.cpu().numpy().astype(np.float32), labels=data.test_y.numpy().astype(np.int64),
        classes=np.array(data.classes)))
    write_predictions(run_dir / "test_predictions.csv", logits.cpu().float(), data.test_y,
                      data.paths.get("test") or [f"test/{i}" for i in range(len(data.test_y))], data.classes)
    return out


def _full_test(loaded, data: ImageData, full: ImageData | None, tta: str, acc: float, plain_acc: float) -> dict:
    """The accuracy on the test split without ``data.exclude``: the excluded test images scored and counted
    with the cleaned ones (the others' logits are those above: nothing is scored twice)."""
    import dataclasses

    cfg = loaded.cfg
    if full is None:
        full = load_data(dataclasses.replace(cfg.data, exclude=None))
    kept = set(data.paths.get("test") or ())
    gone = [i for i, p in enumerate(full.paths.get("test") or ()) if p not in kept]
    n, m = len(data.test_y), len(gone)
    if n + m != len(full.test_y):
        raise CifarlabError(f"the test split without data.exclude has {len(full.test_y)} images, not the {n} "
                            f"scored plus {m} excluded: the data changed since the run trained")
    res = {"num_test_full": n + m, "test_excluded": m, "exclude": str(cfg.data.exclude)}
    if not m:
        return {**res, "test_acc_full": acc, "test_acc_full_no_tta": plain_acc}
    idx = torch.as_tensor(gone)
    x, y = full.test_x[idx], full.test_y[idx]
    args = (loaded.model, x, y, loaded.normalize, loaded.runtime, cfg.train.eval_batch_size)
    gone_acc = evaluate(*args, tta)[1]
    gone_plain = gone_acc if tta == "none" else evaluate(*args, "none")[1]

    def pooled(a: float, b: float) -> float:
        return ((a * n if n else 0.0) + b * m) / (n + m)

    return {**res, "test_acc_full": pooled(acc, gone_acc), "test_acc_full_no_tta": pooled(plain_acc, gone_plain),
            "test_acc_excluded": gone_acc}


def write_predictions(path: Path, logits, labels, paths: list[str], classes: list[str]) -> None:
    """One row per test image: ``path,label,predicted,confidence,loss`` (the files behind every number)."""
    import csv
    import io

    import torch.nn.functional as F

    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    loss = F.cross_entropy(logits, labels.to(logits.device), reduction="none")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "predicted", "confidence", "loss"])
    for p, y, k, c, l in zip(paths, labels.tolist(), pred.tolist(), conf.tolist(), loss.tolist()):
        w.writerow([p, classes[y], classes[k], f"{c:.6f}", f"{l:.6f}"])
    atomic_write_text(path, buf.getvalue())


def tta_label(tta: str | None) -> str:
    """``flip_translate`` -> ``tta flip_translate, 6 views``; ``none`` -> ``no tta``."""
    if tta in (None, "none"):
        return "no tta"
    return f"tta {tta}, {TTA_VIEWS.get(tta, '?')} views"


def format_table(res: dict) -> str:
    tta = res.get("tta")
    lines = [f"{'class':<14}{'accuracy':>10}   ({tta_label(tta)})", "-" * 24]
    for cls, a in res["per_class_acc"].items():
        lines.append(f"{cls:<14}{a:>10.4f}")
    lines += ["-" * 24, f"{'test loss':<14}{res['test_loss']:>10.4f}   ({tta_label(tta)})",
              f"{'test accuracy':<14}{res['test_acc']:>10.4f}   ({tta_label(tta)})"]
    if res.get("test_acc_full") is not None:
        lines.append(f"{'test accuracy':<14}{res['test_acc_full']:>10.4f}   ({tta_label(tta)}) on the full test split: "
                     f"{res['num_test_full']} images, the {res['test_excluded']} that data.exclude drops put back "
                     f"(the line above: the cleaned {res['num_test']})")
    if tta not in (None, "none") and res.get("test_acc_no_tta") is not None:
        lines.append(f"{'test accuracy':<14}{res['test_acc_no_tta']:>10.4f}   (no tta: one view, as predict --tta none "
                     f"and the exported model)")
    for key, label in (("balanced_acc", "balanced accuracy"), ("macro_f1", "macro F1"), ("top5_acc", "top-5 accuracy")):
        if key in res:
            lines.append(f"{label:<18}{res[key]:>6.4f}   ({tta_label(tta)})")
    if res.get("val_acc") is not None and res["val_acc"] == res["val_acc"]:  # null (NaN before 2026-12): no val split
        lines.append(f"{'val accuracy':<14}{res['val_acc']:>10.4f}   ({tta_label(res.get('val_tta', 'none'))}: "
                     f"the best epoch {res.get('best_epoch')}, by which the weights were chosen)")
    return "\n".join(lines)
