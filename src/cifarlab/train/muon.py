"""Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks"), the optimizer of
airbench94_muon and the NanoGPT speedruns: SGD momentum whose update, for each weight matrix, is replaced by
the nearest semi-orthogonal matrix (its polar factor ``U V^T``), computed by a Newton-Schulz iteration.

``torch.optim.Muon`` takes 2-D parameters only; convolution filters (out, in, k, k) are orthogonalized here as
(out, in*k*k) matrices, as airbench94_muon does. Parameters Muon does not suit (biases, norms, embeddings,
the head, 1-D tensors) are stepped in the same optimizer by SGD (Nesterov) or AdamW, with their own learning
rate (``optim.aux``, ``optim.aux_lr``), so that one schedule (LambdaLR) and one checkpoint cover all of them
and a resume is bit-exact like the other optimizers'.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

# Keller Jordan's quintic coefficients: a fast rise of small singular values, which land in about [0.7, 1.2]
# rather than at exactly 1 (measured to train as well, with 5 steps instead of ~30).
QUINTIC = (3.4445, -4.7750, 2.0315)
CUBIC = (1.5, -0.5, 0.0)  # the classic iteration: converges to U V^T exactly for singular values in (0, sqrt 3)


def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = QUINTIC,
                  eps: float = 1e-7) -> torch.Tensor:
    """An approximation of ``U V^T`` for ``g = U S V^T`` (2-D), by ``steps`` iterations of
    ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, from ``X = g / ||g||_F`` (every singular value <= 1)."""
    assert g.ndim == 2
    a, b, c = coefficients
    x = g.float() / (g.float().norm() + eps)
    wide = x.shape[0] > x.shape[1]
    if wide:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * (A @ A)) @ x
    return x.T if wide else x


class Muon(torch.optim.Optimizer):
    """One optimizer, three kinds of group (``group["kind"]``): ``muon`` (orthogonalized momentum), ``sgd``
    (Nesterov momentum), ``adamw``. Every group decays its weights decoupled: ``p *= 1 - lr * weight_decay``."""

    def __init__(self, groups: Iterable[dict], lr: float, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, aux_momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, normalize: bool = False, rms_scale: bool = True):
        defaults = dict(lr=lr, kind="muon", momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        aux_momentum=aux_momentum, betas=betas, eps=eps, weight_decay=weight_decay,
                        normalize=normalize, rms_scale=rms_scale)
        super().__init__(list(groups), defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                if g["weight_decay"]:
                    p.mul_(1 - g["lr"] * g["weight_decay"])
                {"muon": self._muon, "sgd": self._sgd, "adamw": self._adamw}[g["kind"]](p, g, self.state[p])
        return loss

    @staticmethod
    def _muon(p: torch.Tensor, g: dict, state: dict) -> None:
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        buf.mul_(g["momentum"]).add_(p.grad)
        d = p.grad.add(buf, alpha=g["momentum"]) if g["nesterov"] else buf
        m = d.reshape(len(d), -1)  # conv filters (out, in, k, k) as (out, in*k*k)
        update = newton_schulz(m, g["ns_steps"]).to(p.dtype)
        if g["normalize"]:  # airbench94_muon: the filter bank's norm is held at sqrt(out), the step moves its direction
            p.mul_(math.sqrt(len(p)) / (p.norm() + 1e-12))
        # Unit RMS per element whatever the shape: scale by sqrt(max(1, rows / cols)) (Keller Jordan's Muon).
        scale = math.sqrt(max(1.0, m.shape[0] / m.shape[1])) if g["rms_scale"] else 1.0
        p.add_(update.view_as(p), alpha=-g["lr"] * scale)

    @staticmethod
    def _sgd(p: torch.Tensor, g: dict, state: dict) -> None:
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        buf.mul_(g["aux_momentum"]).add_(p.grad)
        p.add_(p.grad.add(buf, alpha=g["aux_momentum"]) if g["nesterov"] else buf, alpha=-g["lr"])

    @staticmethod
    def _adamw(p: torch.Tensor, g: dict, state: dict) -> None:
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float64)
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        state["step"] += 1
        t, (b1, b2) = float(state["step"]), g["betas"]
        state["exp_avg"].lerp_(p.grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(g["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-g["lr"] / (1 - b1 ** t))


def muon_groups(groups: list[dict], skip_ids: set[int], aux: str, aux_lr_scale: float, *,
                head_ids: set[int] = frozenset(), head_lr_scale: float | None = None) -> list[dict]:
    """Split each optimizer group into Muon's part (matrices and filters, not ``skip_ids``: the head,
    embeddings) and the auxiliary optimizer's (the rest), keeping the group's own settings; the auxiliary
    part's lr is scaled by ``aux_lr_scale`` (``optim.aux_lr / optim.lr``), the head's (``head_ids``) by
    ``head_lr_scale`` when given (``optim.head_lr / optim.lr``)."""
    out = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        mats = [p for p in params if p.ndim >= 2 and id(p) not in skip_ids]
        rest = [p for p in params if not (p.ndim >= 2 and id(p) not in skip_ids)]
        head = [p for p in rest if id(p) in head_ids] if head_lr_scale is not None else []
        rest = [p for p in rest if not any(p is h for h in head)]
        scale = g.get("lr_scale", 1.0)
        if mats:
            out.append({**g, "params": mats, "kind": "muon", "lr_scale": scale})
        if rest:
            out.append({**g, "params": rest, "kind": aux, "lr_scale": scale * aux_lr_scale})
        if head:
            out.append({**g, "params": head, "kind": aux, "lr_scale": head_lr_scale})
    return out
