"""Accuracy with reset / update / compute, overall and per class."""

from __future__ import annotations

import torch


class Accuracy:
    """Streaming classification accuracy.

    ``update`` takes logits ``(N, C)`` (float) or predicted labels ``(N,)`` (integer)
    and integer targets ``(N,)``; malformed input raises ``ValueError`` with the
    reason. Counts are kept on the inputs' device, so updates cost no host sync.
    """

    def __init__(self, num_classes: int):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.correct = torch.zeros(self.num_classes, dtype=torch.int64)
        self.total = torch.zeros(self.num_classes, dtype=torch.int64)

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        if not isinstance(preds, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise ValueError("Accuracy.update expects torch tensors")
        if targets.ndim != 1:
            raise ValueError(f"targets must be 1-D (N,), got shape {tuple(targets.shape)}")
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
            raise ValueError(f"targets must be integer class labels, got dtype {targets.dtype}")
        if preds.ndim == 2:
            if not preds.dtype.is_floating_point:
                raise ValueError(f"logits (N, C) must be floating point, got dtype {preds.dtype}")
            if preds.shape[1] != self.num_classes:
                raise ValueError(f"logits have {preds.shape[1]} classes, expected {self.num_classes}")
            if not torch.isfinite(preds).all():
                raise ValueError("logits contain NaN or infinite values")
            labels = preds.argmax(1)
        elif preds.ndim == 1:
            if preds.dtype.is_floating_point or preds.dtype == torch.bool or preds.is_complex():
                raise ValueError(f"predicted labels (N,) must be integers, got dtype {preds.dtype}")
            labels = preds
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"predicted labels must be in [0, {self.num_classes})")
        else:
            raise ValueError(f"predictions must be logits (N, C) or labels (N,), got shape {tuple(preds.shape)}")
        if len(labels) != len(targets):
            raise ValueError(f"predictions and targets differ in length: {len(labels)} vs {len(targets)}")
        if len(targets) and (targets.min() < 0 or targets.max() >= self.num_classes):
            raise ValueError(f"targets must be in [0, {self.num_classes}), got range "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        if self.correct.device != targets.device:
            self.correct, self.total = self.correct.to(targets.device), self.total.to(targets.device)
        targets = targets.long()
        self.total += torch.bincount(targets, minlength=self.num_classes)
        self.correct += torch.bincount(targets[labels.long() == targets], minlength=self.num_classes)

    def compute(self) -> dict:
        """``{"accuracy": float, "per_class": [float | nan per class], "count": int}``."""
        correct, total = self.correct.cpu(), self.total.cpu()
        n = int(total.sum())
        overall = float(correct.sum()) / n if n else float("nan")
        per_class = [float(c) / float(t) if t else float("nan") for c, t in zip(correct, total)]
        return {"accuracy": overall, "per_class": per_class, "count": n}


def summary_scores(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict:
    """Scores that stay honest under class imbalance and many classes, from test logits (N, C):
    balanced accuracy (the mean of the per-class recalls), macro F1, and top-5 accuracy where C > 10."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, top_k_accuracy_score

    y = targets.cpu().numpy()
    scores = logits.float().cpu().numpy()
    pred = scores.argmax(1)
    ks = list(range(num_classes))
    out = {"balanced_acc": float(balanced_accuracy_score(y, pred)),
           "macro_f1": float(f1_score(y, pred, labels=ks, average="macro", zero_division=0))}
    if num_classes > 10:
        out["top5_acc"] = float(top_k_accuracy_score(y, scores, k=5, labels=ks))
    return out
