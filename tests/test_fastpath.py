"""The fast paths compute the same function as a plain implementation on the same weights.

ViT: cifarlab's fused-QKV ``scaled_dot_product_attention`` model (fp32, and under CPU bf16
autocast, where its attention runs in fp32) against a forward written here from the model's
weights with separate q/k/v products, matmul, softmax, matmul. Conv nets: the runtime's
channels-last + bf16 path (``predict_logits``, and a training step's gradients) against fp32
NCHW. Plus the CPU dropout's statistics, the fused optimizers and the start-up log line.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarlab.data.loader import DeviceBatches
from cifarlab.models import create_model
from cifarlab.models.dropout import Dropout, dropout
from cifarlab.models.resnet import CentreTapConv2d
from cifarlab.evaluation.inference import predict_logits
from cifarlab.train.runtime import Runtime, process_age

from .conftest import REPO, tiny_overrides

CPU = torch.device("cpu")
BF16_RTOL = 3e-2  # relative error of a whole forward pass in bf16 (8-bit mantissa, a dozen layers)

# The study's ViT (configs/vit.yaml) and a smaller one with a different head layout.
VIT_PARAMS = [
    dict(patch_size=2, embed_dim=32, num_encoder_layers=4, hidden_layer_depth=1024, head_dim=16, num_heads=20,
         mlp_head_hidden_layer_depth=1024),
    dict(patch_size=4, embed_dim=48, num_encoder_layers=2, hidden_layer_depth=96, head_dim=8, num_heads=3,
         mlp_head_hidden_layer_depth=64),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ ViT reference
def reference_vit(m: nn.Module, x: torch.Tensor, scale_mult: float = 1.0) -> torch.Tensor:
    """cifarlab's ViT computed from its weights alone: separate q/k/v, matmul/softmax/matmul attention."""
    pe = m.patch_embed.proj
    t = F.conv2d(x, pe.weight, pe.bias, stride=pe.stride).flatten(2).transpose(1, 2)  # (B, N, D)
    t = torch.cat([m.cls_token.expand(len(x), -1, -1), t], dim=1) + m.pos_embed
    B, N, _ = t.shape

    def ln(z, norm):
        return F.layer_norm(z, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    for blk in m.blocks:
        a = blk.attn
        h = ln(t, blk.norm1)
        wq, wk, wv = a.qkv.weight.chunk(3, dim=0)  # fused rows are [q | k | v], each heads x head_dim
        bq, bk, bv = a.qkv.bias.chunk(3)
        q, k, v = [(h @ w.T + b).view(B, N, a.num_heads, a.head_dim).transpose(1, 2)
                   for w, b in ((wq, bq), (wk, bk), (wv, bv))]
        attn = torch.softmax(q @ k.transpose(-2, -1) * scale_mult / math.sqrt(a.head_dim), dim=-1)  # (B, heads, N, N)
        o = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        t = t + o @ a.proj.weight.T + a.proj.bias
        h = ln(t, blk.norm2)
        mlp = blk.mlp
        t = t + F.linear(F.gelu(F.linear(h, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    t = ln(t, m.norm)
    h0, h3 = m.head[0], m.head[3]
    return F.linear(F.gelu(F.linear(t[:, 0], h0.weight, h0.bias)), h3.weight, h3.bias)


@pytest.mark.parametrize("params", VIT_PARAMS, ids=["study", "small"])
def test_vit_eval_matches_reference_fp32(params):
    torch.manual_seed(0)
    m = create_model("vit", 10, **params).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference_vit(m, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("params", VIT_PARAMS, ids=["study", "small"])
def test_vit_eval_bf16_autocast_matches_reference(params):
    torch.manual_seed(1)
    m = create_model("vit", 10, **params).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = reference_vit(m, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = m(x)
    assert fast.dtype == torch.bfloat16
    assert rel_err(fast, ref) < BF16_RTOL


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_vit_training_gradients_match_reference(autocast):
    """Training mode (dropout 0, so both sides are deterministic): the fused path's gradients."""
    torch.manual_seed(2)
    m = create_model("vit", 10, **{**VIT_PARAMS[0], "num_encoder_layers": 2, "dropout": 0.0}).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    F.cross_entropy(reference_vit(m, x), y).backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(m(x).float(), y)
    loss.backward()
    for name, p in m.named_parameters():
        if autocast:
            assert rel_err(p.grad, ref[name]) < 5e-2, name
        else:
            torch.testing.assert_close(p.grad, ref[name], rtol=1e-3, atol=1e-6, msg=name)


def test_vit_reference_detects_a_changed_function():
    """The comparison can fail: the same weights with the attention scale off by 2 no longer match."""
    torch.manual_seed(3)
    m = create_model("vit", 10, **VIT_PARAMS[1]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(m(x), reference_vit(m, x, scale_mult=2.0)) > 1e-3


# ------------------------------------------------------------------ conv nets
def _conv_pair(name: str, params: dict):
    """(plain reference, fast model) with the same weights: the reference has torchvision's nn.Conv2d."""
    torch.manual_seed(4)
    ref = create_model(name, 10, **params)
    for m in ref.modules():
        if isinstance(m, CentreTapConv2d):
            m.__class__ = nn.Conv2d
    fast = create_model(name, 10, **params)
    fast.load_state_dict(ref.state_dict())
    return ref, fast.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("size", [1, 2])
def test_centre_tap_conv_matches_conv2d(size):
    """On 1x1 maps the matrix product is the convolution (outputs and all nine taps' gradients)."""
    torch.manual_seed(8)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    fast = CentreTapConv2d(16, 24, 3, padding=1)
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(5, 16, size, size, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out_ref, out = conv(x), fast(x2)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out_ref)
    out_ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.weight.grad, conv.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.bias.grad, conv.bias.grad, rtol=1e-5, atol=1e-6)
    if size == 1:
        assert fast.weight.grad[:, :, 0].abs().sum() == 0  # outer taps only ever meet zero padding


def test_resnet18_uses_centre_tap_only_where_it_applies():
    m = create_model("resnet18", 10)
    centre = [n for n, mod in m.named_modules() if isinstance(mod, CentreTapConv2d)]
    assert "layer4.1.conv2" in centre and "conv1" not in centre  # the 7x7 stem stays nn.Conv2d
    from torchvision.models import resnet18

    assert m.state_dict().keys() == resnet18(num_classes=10).state_dict().keys()  # checkpoints unchanged


CONV = [("cnn", {}), ("resnet18", {}), ("resnet18", {"cifar_stem": True})]


@pytest.mark.parametrize("name,params", CONV, ids=["cnn", "resnet18", "resnet18-cifar"])
def test_conv_eval_channels_last_bf16_matches_fp32(name, params):
    ref, fast = _conv_pair(name, params)
    # BatchNorm with non-trivial running statistics, so that eval mode is not the identity
    for mod in list(ref.modules()) + list(fast.modules()):
        if isinstance(mod, nn.BatchNorm2d):
            g = torch.Generator().manual_seed(mod.num_features)
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    batches = DeviceBatches(x, torch.zeros(6, dtype=torch.long), 4, mean=mean, std=std, device=CPU)
    fast_logits = predict_logits(fast, x, batches, Runtime(CPU, "bf16", True), batch_size=4)
    ref.eval()
    with torch.no_grad():
        ref_logits = ref(batches.normalize(x))
    assert fast_logits.dtype == torch.float32 and fast_logits.shape == (6, 10)
    assert rel_err(fast_logits, ref_logits) < BF16_RTOL


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name,params", CONV[:2], ids=["cnn", "resnet18"])
def test_conv_training_step_channels_last_matches_nchw_fp32(name, params, precision):
    """Training mode (BatchNorm batch statistics) forward and gradients against fp32 NCHW.

    bf16 gradients of a freshly initialised net are far noisier than its outputs (ResNet18: 4%
    on the logits, a gradient cosine of 0.92 against fp32 at batch 16; the BatchNorms of its
    1x1 last stage amplify rounding), so for bf16 they are held to their direction only."""
    ref, fast = _conv_pair(name, params)
    for mod in (ref, fast):
        for d in mod.modules():
            if isinstance(d, nn.Dropout):
                d.p = 0.0
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    ref_out = ref.train()(x)
    F.cross_entropy(ref_out, y).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = fast.train()(x.contiguous(memory_format=torch.channels_last))
    F.cross_entropy(out.float(), y).backward()
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    g_fast = torch.cat([p.grad.flatten() for p in fast.parameters()])
    if precision == "fp32":
        # Channels-last and NCHW convolutions sum in different orders; BatchNorm over a batch of 16 then
        # divides by small standard deviations, so fp32 rounding reaches ~1e-5 on the logits (seen in CI).
        torch.testing.assert_close(out, ref_out, rtol=1e-3, atol=1e-4)
        assert rel_err(g_fast, g_ref) < 0.05
    else:
        assert rel_err(out, ref_out) < 0.1
        assert F.cosine_similarity(g_fast, g_ref, dim=0) > 0.8


# ------------------------------------------------------------------ dropout
@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_cpu_dropout_statistics(p):
    torch.manual_seed(5)
    x = torch.ones(400_000)
    out = dropout(x, p, training=True)
    kept = out != 0
    n = x.numel()
    # keep probability 1 - p within 5 standard deviations; kept values scaled exactly as F.dropout does
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    # independent positions: neighbours (also the four 16-bit lanes of one random word) are uncorrelated
    k = kept.float().view(-1, 4)
    lanes = torch.corrcoef(k.T)
    assert (lanes - torch.eye(4)).abs().max() < 0.02
    assert k.mean(0).sub(1 - p).abs().max() < 5 * math.sqrt(p * (1 - p) / (n / 4))


def test_cpu_dropout_gradient_eval_and_seed():
    x = torch.randn(3, 5, 7, requires_grad=True)
    torch.manual_seed(6)
    out = dropout(x, 0.25, training=True)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out != 0).float() / 0.75)  # d out / d x = mask / (1 - p)
    torch.manual_seed(6)
    torch.testing.assert_close(dropout(x, 0.25, training=True), out)  # the step seed replays the mask
    assert dropout(x, 0.25, training=False) is x
    d = Dropout(0.3)
    assert isinstance(d, nn.Dropout) and d.eval()(x) is x
    xb = torch.randn(64, 64, dtype=torch.bfloat16)
    assert dropout(xb, 0.5).dtype == torch.bfloat16


# ------------------------------------------------------------------ optimizer, start-up
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_optimizer_matches_plain(name):
    from cifarlab.config import OptimConfig
    from cifarlab.train.optim import apply_decoupled_wd, build_optimizer

    torch.manual_seed(7)
    ref = create_model("cnn", 10, widths=[4, 8, 8], hidden=16)
    fast = create_model("cnn", 10, widths=[4, 8, 8], hidden=16)
    fast.load_state_dict(ref.state_dict())
    cfg = OptimConfig(name=name, lr=1e-2, weight_decay=0.05)
    opt_fast = build_optimizer(fast, cfg)
    assert all(g.get("fused") for g in opt_fast.param_groups)
    opt_ref = build_optimizer(ref, cfg)
    for g in opt_ref.param_groups:
        g["fused"] = None  # torch's default per-parameter loop
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        for model, opt in ((ref, opt_ref), (fast, opt_fast)):
            opt.zero_grad()
            F.cross_entropy(model.eval()(x), y).backward()
            apply_decoupled_wd(opt)
            opt.step()
    for (n, a), b in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


def test_process_age_counts_from_process_start():
    age = process_age()
    assert 0 < age < 7 * 24 * 3600
    time.sleep(0.05)
    assert process_age() >= age + 0.04


def test_fit_logs_first_training_step(small_folder, tmp_path, capsys):

    from cifarlab.config import load_config
    from cifarlab.train import fit

    cfg = load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(small_folder, **{"train.epochs": 1}))
    fit(cfg, tmp_path, "startup")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "first training step done" in ln]
    assert len(lines) == 1
    seconds = float(lines[0].split("done", 1)[1].split("s after")[0])
    assert 0 < seconds <= process_age()
