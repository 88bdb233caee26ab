"""More than fits in memory: a tiny device budget streams batches from the decode cache's memory map, with the
same batches and the same metrics as the in-memory path."""

from __future__ import annotations

import csv

import numpy as np
import torch
from safetensors.torch import load_file

from cifarlab.config import DataConfig, load_config
from cifarlab.data import load_data
from cifarlab.data.loader import DeviceBatches
from cifarlab.data.augment import BatchAugment
from cifarlab.data.streaming import HostImages, StreamingBatches, gather
from cifarlab.train import fit

from .conftest import REPO, tiny_overrides


def test_host_images_index_like_a_tensor():
    base = np.random.default_rng(0).integers(0, 256, (50, 6, 5, 3), dtype=np.uint8)
    idx = np.array([7, 3, 40, 3, 12])
    h = HostImages(base, idx)
    ref = torch.from_numpy(base[idx]).permute(0, 3, 1, 2)
    assert h.shape == ref.shape and len(h) == 5
    assert torch.equal(h[:], ref) and torch.equal(h[1:3], ref[1:3]) and torch.equal(h[2], ref[2])
    assert torch.equal(h[torch.tensor([4, 0])], ref[[4, 0]]) and h[:].is_contiguous()
    assert torch.equal(torch.cat(list(h.chunks(2))), ref)
    assert torch.equal(gather(base, np.array([9, 1, 9])), torch.from_numpy(base[[9, 1, 9]]).permute(0, 3, 1, 2))


def test_tiny_budget_streams_the_same_batches(small_folder):
    mem = load_data(DataConfig(path=str(small_folder)))
    streamed = load_data(DataConfig(path=str(small_folder), device_memory=0.01))
    assert streamed.info["streaming"] and not mem.info["streaming"]
    assert isinstance(streamed.train_x, HostImages) and mem.mean == streamed.mean and mem.std == streamed.std
    assert torch.equal(streamed.test_x[:], mem.test_x)
    cfg = DataConfig(translate=2, flip="random", cutout=4)
    kw = dict(mean=mem.mean, std=mem.std, device="cpu", shuffle=True, drop_last=True, seed=3)
    a = DeviceBatches(mem.train_x, mem.train_y, 64, augment=BatchAugment(cfg, len(mem.train_x), 3), **kw)
    b = StreamingBatches(streamed.train_x, streamed.train_y, 64, augment=BatchAugment(cfg, len(mem.train_x), 3), **kw)
    for epoch in (0, 1):
        for (sa, xa, ya), (sb, xb, yb) in zip(a.epoch(epoch), b.epoch(epoch), strict=True):
            assert sa == sb and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert [s for s, _, _ in b.epoch(0, start_step=3)] == list(range(3, len(b)))  # mid-epoch resume


def _rows(path):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_streamed_run_matches_in_memory_run(small_folder, tmp_path):
    runs = {}
    for name, budget in (("mem", None), ("stream", 0.01)):
        cfg = load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(small_folder, **{"data.device_memory": budget}))
        runs[name] = fit(cfg, tmp_path, name, quiet=True)["run_dir"]
    assert _rows(f"{runs['mem']}/metrics.csv") == _rows(f"{runs['stream']}/metrics.csv")
    wa, wb = load_file(f"{runs['mem']}/best.safetensors"), load_file(f"{runs['stream']}/best.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lr_finder_runs_on_a_streamed_data_set_with_the_same_curve(small_folder):
    """The lr finder builds its batches through the trainer's setup (``make_batches``): on a data set too large
    for the device budget it streams them from the decode cache, and its curve is the in-memory one."""
    from cifarlab.train.lr_finder import lr_find

    curves = {}
    for name, budget in (("mem", None), ("stream", 0.01)):
        cfg = load_config(REPO / "configs" / "cnn.yaml", tiny_overrides(small_folder, **{"data.device_memory": budget}))
        data = load_data(cfg.data)
        assert isinstance(data.train_x, HostImages) == (name == "stream")  # the budget really streams
        curves[name] = lr_find(cfg, data=data, num_it=12)
    assert len(curves["mem"].losses) == 12
    assert curves["mem"].losses == curves["stream"].losses and curves["mem"].lrs == curves["stream"].lrs
