"""benchmarks/throughput.py on a tiny run, with timm's ViT as the ViT's second peer."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from .conftest import REPO, load_benchmark


def test_timm_peer_has_the_shape_of_cifarlabs_vit():
    pytest.importorskip("timm")
    from cifarlab.config import load_config
    from cifarlab.models import build_model

    bench = load_benchmark("throughput")
    cfg = load_config(REPO / "configs" / "vit.yaml", ["data.image_size=32"])
    ours, theirs = build_model(cfg, 10), bench.timm_vit(cfg, 10)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    attn = theirs.blocks[0].attn
    assert (attn.num_heads, attn.head_dim) == (20, 16)  # 20 heads of 16 on a width of 32, as the study's
    assert len(theirs.blocks) == 4 and theirs.patch_embed.proj.kernel_size == (2, 2)
    assert theirs.blocks[0].mlp.fc1.out_features == 1024
    assert theirs(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_timm_peer_is_skipped_with_a_reason_without_timm(monkeypatch):
    bench = load_benchmark("throughput")
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    timm, reason = bench.timm_or_reason()
    assert timm is None and "timm not installed" in reason


def test_throughput_tiny_vit_run_times_the_timm_peer(small_folder, capsys):
    timm = pytest.importorskip("timm")
    bench = load_benchmark("throughput")
    assert bench.main(["--quick", "--models", "vit", "--steps", "2", "--rounds", "1", "--train-size", "300",
                       "--eval-images", "32", "--set", "train.batch_size=8", "--set", "model.num_encoder_layers=1",
                       "--no-startup", "--data", str(small_folder)]) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["timm"] == {"version": timm.__version__}
    for phase in ("train", "eval"):
        vit = res[phase]["vit"]
        assert vit["a"] > 0 and vit["b"] > 0 and vit["timm"] > 0
        assert vit["vs_timm"] == pytest.approx(vit["b"] / vit["timm"], rel=0.05)
        assert 0 < vit["timm_peak_fraction"] and 0 < vit["peak_fraction"]
    assert "# vit train: C = timm" in out and "batch 8;" in out
