"""Each fast-training technique does what it says, checked against a hand computation or an
independent reference (numpy, torchvision) on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarlab.config import DataConfig, OptimConfig
from cifarlab.data.augment import BatchAugment, cutout, translate
from cifarlab.data.trivial_augment import OP_NAMES, OPS, apply_ops, rotate, translate_x, trivial_augment_wide
from cifarlab.models import create_model
from cifarlab.train.ema import Lookahead, ModelEMA
from cifarlab.evaluation.inference import tta_logits
from cifarlab.train.loop import soft_cross_entropy
from cifarlab.train.mix import build_mix, cutmix, mixup
from cifarlab.train.optim import apply_decoupled_wd, build_optimizer, build_scheduler


def images(n=6, c=3, h=8, w=8, seed=0) -> torch.Tensor:
    """Distinct pixel values, so that every shift or flip is visible."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g)


# ------------------------------------------------------------------ label smoothing
def test_label_smoothing_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    y = torch.tensor([0, 1])
    eps, C = 0.2, 3
    total = 0.0
    for row, label in zip(logits.tolist(), y.tolist()):
        logz = math.log(sum(math.exp(v) for v in row))
        logp = [v - logz for v in row]
        # target: 1 - eps + eps/C on the label, eps/C elsewhere
        total += -sum(((1 - eps) * (k == label) + eps / C) * logp[k] for k in range(C))
    expected = total / 2
    assert soft_cross_entropy(logits, y, eps).item() == pytest.approx(expected, rel=1e-6)
    # the soft-target path (mixup / cutmix) smooths the same way
    assert soft_cross_entropy(logits, F.one_hot(y, C).float(), eps).item() == pytest.approx(expected, rel=1e-6)
    assert soft_cross_entropy(logits, y, 0.0).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


# ------------------------------------------------------------------------------ EMA
def test_ema_after_known_steps_matches_closed_form():
    """Parameter moved by a constant step delta each update: v_t = t * delta. AveragedModel takes the first
    value as is, then e_t = d e_{t-1} + (1 - d) v_t, i.e. e_K = d^(K-1) v_1 + sum_{t=2..K} (1-d) d^(K-t) v_t."""
    d, delta, K = 0.9, 0.5, 7
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = ModelEMA(model, d)
    for _ in range(K):
        with torch.no_grad():
            model.weight += delta
        ema.update(model)
    v = [t * delta for t in range(1, K + 1)]
    closed = d ** (K - 1) * v[0] + sum((1 - d) * d ** (K - t) * v[t - 1] for t in range(2, K + 1))
    assert ema.module.weight.item() == pytest.approx(closed, rel=1e-6)
    assert model.weight.item() == pytest.approx(K * delta)  # the training weights are untouched


def test_lookahead_pulls_slow_weights_on_schedule_and_ends_on_them():
    """Fast weight w moved +1 per step; syncs every 2 steps with alpha = d^2 (t/T)^3 (slow <- a slow + (1-a) w,
    w <- slow); finish() leaves the slow weights in the model. BatchNorm buffers take part, counters do not."""
    d, every, T = 0.9, 2, 6
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    nn.init.zeros_(model[0].weight)
    la = Lookahead(model, d, every, T)
    slow, w = 0.0, 0.0
    for step in range(1, T + 1):
        with torch.no_grad():
            model[0].weight += 1.0
            model[1].running_mean += 1.0
        w += 1.0
        la.step(model, step)
        if step % every == 0:
            a = d ** every * (step / T) ** 3
            slow = a * slow + (1 - a) * w
            w = slow
        assert model[0].weight.item() == pytest.approx(w, rel=1e-6)
        assert model[1].running_mean.item() == pytest.approx(w, rel=1e-6)
    assert la.alpha(2) == pytest.approx(d ** 2 / 27) and la.alpha(T) == pytest.approx(d ** 2)
    model[0].weight.data += 5.0  # fast weights drift after the last sync ...
    la.finish(model)  # ... and finish restores the slow ones
    assert model[0].weight.item() == pytest.approx(slow, rel=1e-6)
    assert "1.num_batches_tracked" not in la.state_dict()
    fresh = Lookahead(nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1)), d, every, T)
    fresh.load_state_dict(la.state_dict())
    assert fresh.slow["0.weight"].item() == pytest.approx(slow, rel=1e-6)


def test_ema_averages_batchnorm_buffers():
    bn = nn.BatchNorm1d(2)
    ema = ModelEMA(bn, 0.5)
    for value in (1.0, 3.0):
        bn.running_mean.fill_(value)
        ema.update(bn)
    assert torch.allclose(ema.module.running_mean, torch.full((2,), 0.5 * 1.0 + 0.5 * 3.0))


# ------------------------------------------------------------------------------ TTA
def _reflect_shift(x: torch.Tensor, s: int) -> torch.Tensor:
    """out[i, j] = x[r(i + s), r(j + s)] with reflection at the borders (numpy reference)."""
    H = x.shape[-1]
    idx = np.arange(H) + s
    idx = np.where(idx < 0, -idx, np.where(idx >= H, 2 * (H - 1) - idx, idx))
    t = torch.as_tensor(idx)
    return x[..., t, :][..., :, t]


def test_tta_averages_the_views_logits_with_airbench_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x = images(4)
    assert torch.allclose(tta_logits(model, x, "none"), model(x))
    assert torch.allclose(tta_logits(model, x, "flip"), (model(x) + model(x.flip(3))) / 2, atol=1e-6)
    shifted = []
    for s in (-1, 1):
        v = _reflect_shift(x, s)
        shifted += [v, v.flip(3)]
    # half on the untranslated pair, half on the four shifted views
    expected = (model(x) + model(x.flip(3))) / 4 + torch.stack([model(v) for v in shifted]).mean(0) / 2
    assert torch.allclose(tta_logits(model, x, "flip_translate"), expected, atol=1e-5)


# ------------------------------------------------------------------------ translate
def test_translate_shifts_by_the_drawn_offsets_with_reflect_padding():
    x, pad = images(5), 2
    out = translate(x, pad, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # replay the two draws translate makes
    dy = torch.randint(0, 2 * pad + 1, (5,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (5,), generator=g)
    H = W = 8
    for b in range(5):
        ref = np.pad(x[b].numpy(), ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
        np.testing.assert_array_equal(out[b].numpy(), ref[:, dy[b]:dy[b] + H, dx[b]:dx[b] + W])
        sy, sx = int(dy[b]) - pad, int(dx[b]) - pad  # content moves by (-sy, -sx)
        inner = x[b, :, max(sy, 0):H + min(sy, 0), max(sx, 0):W + min(sx, 0)]
        assert torch.equal(out[b, :, max(-sy, 0):H + min(-sy, 0), max(-sx, 0):W + min(-sx, 0)], inner)


# -------------------------------------------------------------------- alternating flip
def test_alternating_flip_flips_complementary_halves_on_consecutive_epochs():
    n = 64
    aug = BatchAugment(DataConfig(flip="alternating"), n, seed=0)
    x = images(n)
    idx = torch.arange(n)

    def flipped(epoch):
        out = aug(x, idx, epoch, torch.Generator().manual_seed(epoch))
        f = torch.tensor([torch.equal(out[i], x[i].flip(2)) for i in range(n)])
        assert all(f[i] or torch.equal(out[i], x[i]) for i in range(n))
        return f

    e0, e1, e2 = flipped(0), flipped(1), flipped(2)
    assert torch.equal(e0 ^ e1, torch.ones(n, dtype=torch.bool))  # each image flipped in exactly one of the two
    assert torch.equal(e0, e2)
    assert 16 < int(e0.sum()) < 48  # a random half, not all or none
    # the pattern follows the image, not its position in the batch
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    out = aug(x[perm], perm, 0, torch.Generator())
    assert all(torch.equal(out[k], x[perm[k]].flip(2) if e0[perm[k]] else x[perm[k]]) for k in range(n))


# --------------------------------------------------------------------------- cutout
def test_cutout_zeroes_exactly_a_square():
    size, H = 4, 16
    x = torch.ones(40, 3, H, H)
    out = cutout(x, size, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    cy = torch.randint(0, H, (40,), generator=g)
    cx = torch.randint(0, H, (40,), generator=g)
    for b in range(40):
        y0, x0 = int(cy[b]) - size // 2, int(cx[b]) - size // 2
        expected = torch.ones(H, H)
        expected[max(y0, 0):max(y0 + size, 0), max(x0, 0):max(x0 + size, 0)] = 0
        for c in range(3):
            assert torch.equal(out[b, c], expected)
        if 0 <= y0 and y0 + size <= H and 0 <= x0 and x0 + size <= H:  # fully inside: size*size zeros
            assert int((out[b, 0] == 0).sum()) == size * size


# -------------------------------------------------------------------- mixup / cutmix
def test_mixup_targets_sum_to_one_and_match_the_weight():
    x = images(4)
    y1h = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    perm = torch.tensor([1, 2, 3, 0])
    xm, ym = mixup(x, y1h, 0.3, perm)
    assert torch.allclose(xm, 0.3 * x + 0.7 * x[perm])
    assert torch.allclose(ym.sum(1), torch.ones(4))
    assert torch.allclose(ym[:, [0, 1, 2, 3]].diagonal(), torch.full((4,), 0.3))
    assert torch.allclose(ym[torch.arange(4), perm], torch.full((4,), 0.7))


def test_cutmix_target_weight_is_the_pasted_area():
    n, H = 4, 16
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, H, H).clone()  # image i is all i
    y1h = F.one_hot(torch.arange(n), n).float()
    perm = torch.tensor([1, 2, 3, 0])
    for lam, cy, cx in ((0.5, 8, 8), (0.7, 0, 3), (0.2, 15, 15)):
        xm, ym = cutmix(x, y1h, lam, perm, cy, cx)
        assert torch.allclose(ym.sum(1), torch.ones(n))
        for i in range(n):
            pasted = float((xm[i, 0] == perm[i]).float().mean())
            assert ym[i, perm[i]].item() == pytest.approx(pasted)
            assert ym[i, i].item() == pytest.approx(1 - pasted)


def test_build_mix_soft_targets_sum_to_one():
    cfg = DataConfig(mixup=0.8, cutmix=1.0)
    mix = build_mix(cfg, 10, seed=0)
    x, y = images(8, h=16, w=16), torch.randint(0, 10, (8,))
    for step in range(6):
        xm, t = mix(x, y, 0, step)
        assert xm.shape == x.shape and t.shape == (8, 10)
        assert torch.allclose(t.sum(1), torch.ones(8))
    assert build_mix(DataConfig(), 10, 0) is None


# ------------------------------------------------------------------- TrivialAugment
def test_trivial_augment_shape_dtype_range_and_determinism():
    x = images(64, h=32, w=32)
    out = trivial_augment_wide(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, trivial_augment_wide(x, torch.Generator().manual_seed(0)))
    changed = [not torch.equal(out[i], x[i]) for i in range(64)]
    assert sum(changed) > 40  # 13 of 14 ops change an image at most magnitudes


@pytest.mark.parametrize("name", [n for n, _, _ in OPS if n not in ("autocontrast", "equalize")])
def test_trivial_augment_ops_are_identity_at_magnitude_zero(name):
    x = (images(5, h=32, w=32) * 255).round() / 255  # 8-bit levels, as batches from uint8 images are
    k = OP_NAMES.index(name)
    for sign in (1.0, -1.0):
        out = apply_ops(x, torch.full((5,), k), torch.zeros(5), torch.full((5,), sign))
        assert torch.equal(out, x)


def test_trivial_augment_groups_ops_without_mixing_images():
    """The batched path equals each image augmented alone."""
    x = (images(28, h=16, w=16) * 255).round() / 255
    op = torch.arange(28) % len(OPS)
    mag = torch.linspace(0.1, 1.0, 28)
    sign = torch.where(torch.arange(28) % 3 == 0, -1.0, 1.0)
    batched = apply_ops(x, op, mag, sign)
    for i in range(28):
        alone = apply_ops(x[i:i + 1], op[i:i + 1], mag[i:i + 1], sign[i:i + 1])
        assert torch.allclose(batched[i], alone[0], atol=1e-6), OP_NAMES[int(op[i])]


def test_trivial_augment_geometry():
    x = images(2, h=16, w=16)
    assert torch.equal(rotate(x, torch.tensor([90.0, 90.0])), torch.rot90(x, 1, dims=(-2, -1)))
    moved = translate_x(x, torch.tensor([4 / 16, -4 / 16]))
    assert torch.equal(moved[0, :, :, 4:], x[0, :, :, :-4]) and (moved[0, :, :, :4] == 0).all()
    assert torch.equal(moved[1, :, :, :-4], x[1, :, :, 4:]) and (moved[1, :, :, -4:] == 0).all()


@pytest.mark.parametrize("name,tv", [("equalize", "equalize"), ("posterize", "posterize"),
                                     ("solarize", "solarize"), ("autocontrast", "autocontrast")])
def test_trivial_augment_pixel_ops_match_torchvision(name, tv):
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    xu = (images(6, h=16, w=16) * 180 + 30).round().to(torch.uint8)  # not full range: autocontrast has work
    x = xu.float() / 255
    k = OP_NAMES.index(name)
    mag = {"equalize": 0.0, "autocontrast": 0.0, "posterize": 0.5, "solarize": 0.41}[name]
    ours = apply_ops(x, torch.full((6,), k), torch.full((6,), mag), torch.ones(6))
    # posterize 0.5 keeps 8 - 3 bits; solarize inverts above 0.59 (150.45 levels), torchvision at >= 151
    args = {"posterize": (5,), "solarize": (math.floor(255 * (1 - mag)) + 1,)}.get(name, ())
    ref = getattr(tvf, tv)(xu, *args).float() / 255
    assert (ours - ref).abs().max().item() * 255 <= 1.0 + 1e-4


def test_batch_augment_runs_trivial_augment_when_configured():
    n = 16
    x = images(n, h=32, w=32)
    on = BatchAugment(DataConfig(trivial_augment=True), n, seed=0)
    off = BatchAugment(DataConfig(), n, seed=0)
    assert on.active and not off.active
    out = on(x, torch.arange(n), 0, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and not torch.equal(out, x)


# ----------------------------------------------------------- SGD, decoupled weight decay
def test_decoupled_weight_decay_for_sgd():
    lr, wd = 0.1, 0.01
    model = nn.Linear(3, 2)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=lr, weight_decay=wd, momentum=0.0))
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    apply_decoupled_wd(opt)
    assert torch.allclose(model.weight, w0 * (1 - lr * wd))
    assert torch.equal(model.bias, b0)  # no decay on biases
    g = torch.randn_like(model.weight)
    model.weight.grad = g
    opt.step()
    assert torch.allclose(model.weight, w0 * (1 - lr * wd) - lr * g, atol=1e-7)


def test_coupled_decay_is_torch_sgd_weight_decay_through_the_momentum():
    """optim.coupled_decay (airbench94's): the same steps as torch's SGD given weight_decay, biases undecayed."""
    lr, wd, mom = 0.1, 0.05, 0.85
    model, ref = nn.Linear(3, 2), nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=lr, weight_decay=wd, momentum=mom, coupled_decay=True))
    ref_opt = torch.optim.SGD([{"params": [ref.weight], "weight_decay": wd}, {"params": [ref.bias], "weight_decay": 0}],
                              lr=lr, momentum=mom, nesterov=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        grads = [torch.randn(2, 3, generator=g), torch.randn(2, generator=g)]
        for m, o in ((model, opt), (ref, ref_opt)):
            m.weight.grad, m.bias.grad = grads[0].clone(), grads[1].clone()
            apply_decoupled_wd(o)  # a no-op when the decay is coupled
            o.step()
    assert torch.allclose(model.weight, ref.weight) and torch.allclose(model.bias, ref.bias)
    from cifarlab.config import RunConfig
    from cifarlab.errors import ConfigError

    cfg = RunConfig()
    cfg.optim.coupled_decay = True  # adamw
    with pytest.raises(ConfigError, match="optim.coupled_decay"):
        cfg.validate()


def test_sgd_is_nesterov_and_adamw_keeps_its_decay():
    model = nn.Linear(3, 2)
    sgd = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, momentum=0.9))
    assert isinstance(sgd, torch.optim.SGD) and all(g["nesterov"] and g["weight_decay"] == 0 for g in sgd.param_groups)
    adamw = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]


@pytest.mark.parametrize("bias_decay", [0.0, 1.0, 0.25])
def test_model_param_groups_scale_lr_and_set_bias_decay_per_step(bias_decay):
    model = create_model("speednet", 10, widths=[8, 16, 16], bias_lr_scale=64.0, bias_decay=bias_decay)
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.5, weight_decay=0.01))
    other, norm = opt.param_groups
    assert other["lr"] == 0.5 and norm["lr"] == 0.5 * 64
    assert norm["lr"] * norm["decoupled_wd"] == pytest.approx(bias_decay * other["lr"] * other["decoupled_wd"])
    norm_ids = {id(p) for n, p in model.named_parameters() if ".norm" in n and p.requires_grad}
    assert {id(p) for p in norm["params"]} == norm_ids and norm_ids


# ---------------------------------------------------------------------- schedules
def _lrs(cfg: OptimConfig, epochs: int, steps: int) -> list[float]:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched, per_step = build_scheduler(opt, cfg, epochs, steps)
    assert per_step
    out = []
    for _ in range(epochs * steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_cosine_schedule_values():
    lr, floor = 2.0, 0.1
    lrs = _lrs(OptimConfig(lr=lr, schedule="cosine", warmup_epochs=1, min_lr_ratio=floor), epochs=5, steps=10)
    warm, total = 10, 50

    def expected(s):
        if s < warm:
            return lr * (s + 1) / warm
        t = (s - warm) / (total - warm)
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))

    for s in (0, 4, 9, 10, 20, 30, 49):
        assert lrs[s] == pytest.approx(expected(s), rel=1e-6), s
    assert lrs[10] == pytest.approx(lr)
    assert lrs[30] == pytest.approx(lr * (floor + (1 - floor) * 0.5))  # half way through the decay


def test_linear_schedule_is_a_triangle():
    lrs = _lrs(OptimConfig(lr=1.0, schedule="linear", warmup_epochs=2, min_lr_ratio=0.0), epochs=10, steps=5)
    peak = lrs.index(max(lrs))
    assert peak == 9 and lrs[peak] == pytest.approx(1.0)  # the warm-up's last step: 2 epochs x 5 steps
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a > b for a, b in zip(lrs[peak + 1:], lrs[peak + 2:]))
    assert lrs[-1] == pytest.approx(1.0 * (1 - 39 / 40))


# ------------------------------------------------------------------ progressive resizing
def test_progressive_size_schedule_and_cost():
    from cifarlab.data.augment import progressive_cost, progressive_size

    cfg = DataConfig(image_size=32, progressive_size=16, progressive_until=0.75)  # 16 -> 32 px over 9 of 12 epochs
    sizes = [progressive_size(cfg, e, 12) for e in range(12)]
    assert sizes == [16, 16, 16, 20, 20, 24, 24, 28, 28, 32, 32, 32]
    cost = (3 * 16**2 + 2 * 20**2 + 2 * 24**2 + 2 * 28**2 + 3 * 32**2) / (12 * 32**2)
    assert progressive_cost(cfg, 12) == pytest.approx(cost)  # ~0.60: 12 epochs for the pixels of 7.2
    assert progressive_cost(DataConfig(), 12) == 1.0
    assert [progressive_size(DataConfig(image_size=32), e, 12) for e in (0, 11)] == [32, 32]  # off: full size


def test_device_batches_downscale_the_epochs_of_progressive_resizing():
    from cifarlab.data.loader import DeviceBatches

    cfg = DataConfig(image_size=32, progressive_size=16, progressive_until=0.5, flip="random")
    n = 32
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    x[:, :, :, :16] = 200  # left half bright, right half dark: downscaling keeps the halves apart
    x[:, :, :, 16:] = 20
    batches = DeviceBatches(x, torch.zeros(n, dtype=torch.int64), 16, mean=[0.5] * 3, std=[0.25] * 3,
                            device="cpu", augment=BatchAugment(DataConfig(image_size=32, progressive_size=16, progressive_until=0.5),
                                                               n, 0, epochs=4))
    shapes = [[tuple(xb.shape) for _, xb, _ in batches.epoch(e)] for e in range(4)]
    assert shapes[0] == [(16, 3, 16, 16)] * 2 and shapes[1] == [(16, 3, 24, 24)] * 2
    assert shapes[2] == shapes[3] == [(16, 3, 32, 32)] * 2
    _, small, _ = next(batches.epoch(0))
    full = batches.normalize(x[:16])
    # the image downscaled, not cropped: both halves survive, each at its own value away from the edge
    # between them, and the antialiasing filter keeps the mean
    assert torch.allclose(small[..., :6], full[..., :16, :6], atol=1e-4)
    assert torch.allclose(small[..., 10:], full[..., :16, -6:], atol=1e-4)
    assert torch.allclose(small.mean((2, 3)), full.mean((2, 3)), atol=1e-3)
    with pytest.raises(ValueError, match="epochs"):
        BatchAugment(cfg, n, 0)


def test_progressive_resizing_is_refused_for_fixed_size_models():
    from cifarlab.config import RunConfig
    from cifarlab.errors import ConfigError

    for name in ("cnn", "vit"):
        cfg = RunConfig()
        cfg.model.name = name
        cfg.data.progressive_size = 16
        with pytest.raises(ConfigError, match="progressive_size"):
            cfg.validate()
    cfg = RunConfig()
    cfg.model.name = "resnet18"
    cfg.data.progressive_size = 16
    cfg.validate()


def test_warmup_start_matches_airbench94_triangle():
    """optim.warmup_start=0.2 with a linear schedule is airbench94's triangle(start=0.2, end=0.07, peak=0.23)."""
    steps, epochs = 10, 10
    total = steps * epochs
    lrs = _lrs(OptimConfig(lr=1.0, schedule="linear", warmup_fraction=0.23, min_lr_ratio=0.07, warmup_start=0.2),
               epochs, steps)
    xp, fp = [0, int(0.23 * total), total], [0.2, 1.0, 0.07]
    expected = [float(torch.from_numpy(__import__("numpy").interp([s], xp, fp)).item()) for s in range(total)]
    assert lrs == pytest.approx(expected, abs=1e-9)
    # the default still starts from (step + 1) / warm
    assert _lrs(OptimConfig(lr=1.0, schedule="linear", warmup_epochs=1), 2, 4)[:4] == pytest.approx([0.25, 0.5, 0.75, 1])


def test_warmup_start_is_checked():
    from cifarlab.config import RunConfig
    from cifarlab.errors import ConfigError

    cfg = RunConfig()
    cfg.optim.warmup_start = 1.5
    with pytest.raises(ConfigError, match="optim.warmup_start"):
        cfg.validate()
