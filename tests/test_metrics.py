"""Accuracy against scikit-learn on the same random inputs, and its input checks."""

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix

from cifarlab.evaluation.metrics import Accuracy


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    C = 10
    metric = Accuracy(C)
    all_pred, all_true = [], []
    for _ in range(4):  # streaming: several updates, logits and labels mixed
        n = int(torch.randint(1, 300, (1,), generator=g))
        logits = torch.randn(n, C, generator=g)
        y = torch.randint(0, C, (n,), generator=g)
        if seed % 2:
            metric.update(logits, y)
        else:
            metric.update(logits.argmax(1), y)
        all_pred.append(logits.argmax(1).numpy())
        all_true.append(y.numpy())
    pred, true = np.concatenate(all_pred), np.concatenate(all_true)
    res = metric.compute()
    assert res["accuracy"] == pytest.approx(accuracy_score(true, pred))
    cm = confusion_matrix(true, pred, labels=range(C))
    with np.errstate(invalid="ignore"):
        ref = cm.diagonal() / cm.sum(1)
    np.testing.assert_allclose(res["per_class"], ref)
    assert res["count"] == len(true)


def test_reset():
    m = Accuracy(3)
    m.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    assert m.compute()["accuracy"] == pytest.approx(2 / 3)
    m.reset()
    m.update(torch.tensor([2]), torch.tensor([2]))
    assert m.compute()["accuracy"] == 1.0
    assert np.isnan(m.compute()["per_class"][0])


@pytest.mark.parametrize("preds,targets,match", [
    (torch.randn(4, 3), torch.tensor([0, 1, 2]), "differ in length"),
    (torch.randn(4, 5), torch.tensor([0, 1, 2, 0]), "5 classes, expected 3"),
    (torch.randn(4, 3), torch.tensor([0.0, 1.0, 2.0, 0.0]), "integer class labels"),
    (torch.randn(4, 3), torch.tensor([0, 1, 3, 0]), r"targets must be in \[0, 3\)"),
    (torch.randn(4, 3), torch.tensor([0, -1, 2, 0]), r"targets must be in \[0, 3\)"),
    (torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([0]), "NaN or infinite"),
    (torch.tensor([[0.0, float("inf"), 1.0]]), torch.tensor([0]), "NaN or infinite"),
    (torch.randn(2, 3, 1), torch.tensor([0, 1]), "logits \\(N, C\\) or labels"),
    (torch.tensor([0, 1]), torch.tensor([[0, 1]]), "1-D"),
    (torch.tensor([0.5, 1.0]), torch.tensor([0, 1]), "must be integers"),
    (torch.tensor([0, 7]), torch.tensor([0, 1]), "predicted labels must be in"),
    (torch.randint(0, 3, (2, 3)), torch.tensor([0, 1]), "floating point"),
])
def test_rejects_malformed(preds, targets, match):
    m = Accuracy(3)
    with pytest.raises(ValueError, match=match):
        m.update(preds, targets)
    assert m.compute()["count"] == 0  # nothing counted from a rejected update


def test_rejects_non_tensor_and_bad_num_classes():
    with pytest.raises(ValueError):
        Accuracy(0)
    with pytest.raises(ValueError):
        Accuracy(3).update([0, 1], [0, 1])
