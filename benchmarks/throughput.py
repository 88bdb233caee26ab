"""Throughput: the study's training pipeline (A) against cifarlab's defaults (B), on the same data.

    python benchmarks/throughput.py                 # the recorded run (about 7 minutes on 2 CPU cores)
    python benchmarks/throughput.py --quick         # under 3 minutes on 2 quiet CPU cores
    python benchmarks/throughput.py --models vit --steps 10 --rounds 2 --data PATH
    python benchmarks/throughput.py --models vit --train-size 300 --eval-images 32 --set train.batch_size=8  # tiny

For each of the study's models (configs/{cnn,resnet18,vit}.yaml: their hyperparameters, batch 128):

A, the study's way, written here as the study wrote it: an in-memory list of PIL images with the
   torchvision transforms RandomApply([RandomHorizontalFlip(), RandomRotation(15),
   RandomResizedCrop(32, scale, ratio)], p), ToTensor, Normalize, a DataLoader with 2 workers, fp32,
   AdamW on ``model.parameters()``, ``loss.item()`` every step, evaluation in batches of 128 under
   ``no_grad``, glibc's default malloc settings; for the ViT an attention of separate q/k/v Linear
   layers, matmul, softmax, dropout on the attention weights, matmul (``StudyViT``). The study's ViT
   at batch 128 holds 20 x 257 x 257 attention maps per image and layer: the process needs ~12 GB.
B, cifarlab's defaults through cifarlab's own code: ``setup_runtime`` (precision, channels-last,
   threads, allocator), the registered model, ``DeviceBatches`` + ``BatchAugment`` (uint8 data on
   the device, batched augmentation), ``build_optimizer`` and ``train_one_epoch``; evaluation
   through ``predict_logits`` (inference mode, ``train.eval_batch_size``). On a CUDA machine B
   takes cifarlab's CUDA defaults; ``--compile`` adds ``torch.compile`` and reports its cost.

One process, after warm-up, rounds alternating A and B (train, then evaluation), so that a busy
machine slows both alike; images/s are total images over total time of all rounds. A's worker
start-up at each round is not timed (it is paid once per epoch); A's loading runs concurrently
with its compute, as in the study. FLOPs per image are counted once per model with
``torch.utils.flop_counter.FlopCounterMode`` on the study's model (forward+backward for
training, forward for evaluation) and apply to both sides: they compute the same function.
The peak is a square matmul loop in fp32 and bf16 (best of a measurement before and after the
models); the peak fraction of B is taken against the peak of the precision B runs in.

Data: a stratified subset of the training set through ``cifarlab.data.load_data`` (10,000 images,
``--quick`` 4,000) and 2,048 held-out images for evaluation; both sides see the same images.

``startup_s`` is the wall time from launching ``python -m cifarlab train configs/cnn.yaml`` (on
the same data subset, warm decode cache) to its "first training step done" log line.

A second peer for the ViT, C: timm's ``VisionTransformer`` (``pip install timm``, or cifarlab's ``timm``
extra) at the same shape as cifarlab's ViT (patch size, width, depth, heads, head width, MLP width, and
cifarlab's MLP classifier head in place of timm's linear one; dropout at the same rate on timm's
positions: position embedding, after the attention projection, in the MLP, before the head), trained and
evaluated exactly as B (same runtime, batches, optimizer and loop), so that B/C compares the models'
implementations alone. Without timm, C is skipped with a note. The ViT's rows add
``timm`` (C's images/s), ``vs_timm`` (B/C) and ``timm_peak_fraction``.

The last line printed is JSON:
{"peak_gflops": {"fp32": F, "bf16": F},
 "train": {"cnn": {"a": IMG_S, "b": IMG_S, "ratio": R, "peak_fraction": P}, "resnet18": {...}, "vit": {...}},
 "eval": {same keys}, "startup_s": S, "timm": {"version": V} or {"skipped": REASON}}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cifarlab.config import RunConfig, load_config
from cifarlab.data.dataset import apply_data_defaults
from cifarlab.data import ImageData, load_data
from cifarlab.data.augment import BatchAugment
from cifarlab.data.loader import DeviceBatches
from cifarlab.models.resnet import CentreTapConv2d
from cifarlab.evaluation.inference import predict_logits
from cifarlab.models import build_model
from cifarlab.train.loop import train_one_epoch
from cifarlab.train.state import Parts, TrainState
from cifarlab.train.optim import build_optimizer, build_scheduler
from cifarlab.train.runtime import Runtime, keep_freed_memory, maybe_compile, setup_runtime

REPO = Path(__file__).resolve().parents[1]
MODELS = ("cnn", "resnet18", "vit")
SHARED_DATA = REPO.parent / "shared" / "datasets" / "cifar10-jpeg"


# ============================================================================ settings
@dataclass
class Plan:
    """How much to measure, per round and side. The study's ViT takes ~30 s a step on 2 CPU cores."""

    rounds: int
    steps: int  # training steps per round of the conv nets (A and B)
    vit_steps: int  # ... of cifarlab's ViT
    vit_a_steps: int  # ... of the study's ViT
    eval_images: int  # evaluation images per round of the conv nets (A and B)
    vit_eval_images: int  # ... of cifarlab's ViT
    vit_a_eval_images: int  # ... of the study's ViT
    peak_seconds: float  # per matmul peak measurement
    train_size: int  # training images (a stratified subset of the training set)


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        plan = Plan(rounds=2, steps=6, vit_steps=2, vit_a_steps=1, eval_images=1024, vit_eval_images=512,
                    vit_a_eval_images=128, peak_seconds=0.5, train_size=4000)
    else:
        plan = Plan(rounds=3, steps=20, vit_steps=8, vit_a_steps=2, eval_images=2048, vit_eval_images=1024,
                    vit_a_eval_images=256, peak_seconds=1.5, train_size=10000)
    if args.steps:
        plan.steps, plan.vit_steps, plan.vit_a_steps = args.steps, max(1, args.steps // 2), max(1, args.steps // 8)
    if args.rounds:
        plan.rounds = args.rounds
    if args.train_size:
        plan.train_size = args.train_size
    if args.eval_images:
        plan.eval_images = plan.vit_eval_images = plan.vit_a_eval_images = args.eval_images
    return plan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and images: under 3 minutes on 2 CPU cores")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--steps", type=int, default=0, metavar="N",
                   help="training steps per round of the conv nets (cifarlab's ViT N//2, the study's N//8)")
    p.add_argument("--rounds", type=int, default=0, metavar="R", help="alternating A/B rounds (default 3, quick 2)")
    p.add_argument("--data", metavar="PATH", help="data set (default: $CIFARLAB_DATA, else ../shared/datasets/"
                   "cifar10-jpeg beside the repository, else cifarlab's download)")
    p.add_argument("--compile", action="store_true", help="B with train.compile=true (compile time is reported)")
    p.add_argument("--no-startup", action="store_true", help="skip the `cifarlab train` start-up timing")
    p.add_argument("--no-timm", action="store_true", help="skip the timm ViT peer (C)")
    p.add_argument("--train-size", type=int, default=0, metavar="N",
                   help="training images (default 10,000, quick 4,000)")
    p.add_argument("--eval-images", type=int, default=0, metavar="N",
                   help="evaluation images per round for every model and side (default: the plan's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override in every model's config (repeatable), e.g. train.batch_size=8 for tiny runs")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        p.error(f"--models: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(MODELS)}")
    if args.steps < 0 or args.rounds < 0 or args.train_size < 0 or args.eval_images < 0:
        p.error("--steps, --rounds, --train-size and --eval-images must be >= 1")
    return args


def data_path(arg: str | None) -> str | None:
    if arg:
        return arg
    if os.environ.get("CIFARLAB_DATA"):
        return os.environ["CIFARLAB_DATA"]
    return str(SHARED_DATA) if SHARED_DATA.is_dir() else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ============================================================================ peak
def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """GFLOP/s of a square matmul loop (2048 on the CPU, 8192 on a GPU): the machine's practical peak."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, whatever B's runtime set
    try:
        for _ in range(2):
            a @ b
        sync(device)
        iters, t0 = 0, time.perf_counter()
        while True:
            a @ b
            iters += 1
            if iters % 2 == 0:
                sync(device)
                if time.perf_counter() - t0 >= seconds:
                    break
        return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


# ============================================================================ A: the study's way
class StudyAttention(nn.Module):
    """Attention as the study wrote it: separate q/k/v projections, dropout on the attention weights."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, dropout: float):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, head_dim)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        attn = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, heads, N, N)
        attn = self.attn_drop(torch.softmax(attn, dim=-1))
        out = torch.matmul(attn, v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(out)


class StudyBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_hidden: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = StudyAttention(dim, num_heads, head_dim, dropout)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class StudyViT(nn.Module):
    """The study's ViT with cifarlab's ``vit`` hyperparameters and layout, written without fused kernels."""

    def __init__(self, num_classes: int, image_size: int, patch_size: int, embed_dim: int, num_encoder_layers: int,
                 num_heads: int, head_dim: int, hidden_layer_depth: int, dropout: float,
                 mlp_head_hidden_layer_depth: int, **_ignored):
        super().__init__()
        self.patch = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        n = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[StudyBlock(embed_dim, num_heads, head_dim, hidden_layer_depth, dropout)
                                      for _ in range(num_encoder_layers)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Sequential(nn.Linear(embed_dim, mlp_head_hidden_layer_depth), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(mlp_head_hidden_layer_depth, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(self.pos_drop(x)))
        return self.head(x[:, 0])


def study_model(name: str, cfg: RunConfig) -> nn.Module:
    if name == "vit":
        from cifarlab.models import model_defaults

        params = {**model_defaults("vit"), **cfg.model.params, "image_size": cfg.data.image_size}
        return StudyViT(num_classes=10, **params)
    model = build_model(cfg, 10)  # the study's architectures; A runs them in fp32, NCHW
    for m in model.modules():  # and with torchvision's plain convolutions (no centre-tap shortcut)
        if isinstance(m, CentreTapConv2d):
            m.__class__ = nn.Conv2d
    return model


class PILImages(torch.utils.data.Dataset):
    """The study's data set: decoded PIL images in memory, transformed one by one in the workers."""

    def __init__(self, x_uint8: torch.Tensor, y: torch.Tensor, transform):
        from PIL import Image

        self.images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x_uint8]
        self.labels = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def study_transforms(cfg: RunConfig, mean: list[float], std: list[float], train: bool):
    from torchvision import transforms as T

    d = cfg.data
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if not train:
        return T.Compose(tail)
    aug = T.RandomApply([T.RandomHorizontalFlip(), T.RandomRotation(d.rotation),
                         T.RandomResizedCrop(d.image_size, scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio))],
                        p=d.augment_p)
    return T.Compose([aug, *tail])


@contextlib.contextmanager
def study_defaults(device: torch.device):
    """A runs with PyTorch's and glibc's defaults even after B's runtime changed them: no TF32 on CUDA,
    and on the CPU malloc's usual thresholds (B's runtime keeps freed memory for reuse)."""
    if device.type != "cuda":
        keep_freed_memory(False)
        try:
            yield
        finally:
            keep_freed_memory(True)
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = \
        False, True, False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


class StudySide:
    """A: the study's model, loaders and loop."""

    def __init__(self, name: str, cfg: RunConfig, data: ImageData, device: torch.device, eval_images: int):
        self.device = device
        self.model = study_model(name, cfg).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr,
                                           weight_decay=cfg.optim.weight_decay)
        self.criterion = nn.CrossEntropyLoss()
        kw = dict(batch_size=cfg.train.batch_size, num_workers=2, pin_memory=device.type == "cuda")
        train_set = PILImages(data.train_x, data.train_y, study_transforms(cfg, data.mean, data.std, True))
        self.train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, drop_last=True, **kw)
        eval_set = PILImages(data.val_x[:eval_images], data.val_y[:eval_images],
                             study_transforms(cfg, data.mean, data.std, False))
        self.eval_loader = torch.utils.data.DataLoader(eval_set, shuffle=False, **kw)

    def warm_up(self, images: int = 16) -> None:
        """One small training step and forward pass (the study's ViT needs ~30 s for a full one), and
        one batch from each loader, so that the first fork of this large process is not timed."""
        x = torch.randn(images, 3, 32, 32, device=self.device)
        y = torch.zeros(images, dtype=torch.long, device=self.device)
        with study_defaults(self.device):
            self.model.train()
            self.optimizer.zero_grad()
            self.criterion(self.model(x), y).backward()
            self.optimizer.zero_grad()  # no step: the weights stay as initialised
            self.model.eval()
            with torch.no_grad():
                self.model(x)
        for loader in (self.train_loader, self.eval_loader):
            it = iter(loader)
            next(it)
            del it

    def train(self, steps: int) -> tuple[int, float]:
        """(images, seconds) of ``steps`` training steps; the clock starts when the first batch is ready."""
        self.model.train()
        with study_defaults(self.device):
            it = iter(self.train_loader)  # workers start here, once per epoch in the study
            batch = next(it)
            sync(self.device)
            t0, n = time.perf_counter(), 0
            for i in range(steps):
                x, y = batch
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                self.optimizer.zero_grad()
                loss = self.criterion(self.model(x), y)
                loss.backward()
                self.optimizer.step()
                loss.item()  # the study's running loss: one host sync per step
                n += len(y)
                if i + 1 < steps:
                    batch = next(it)
            sync(self.device)
            seconds = time.perf_counter() - t0
            del it  # stop the workers before B's round
        return n, seconds

    @torch.no_grad()
    def evaluate(self) -> tuple[int, float]:
        self.model.eval()
        with study_defaults(self.device):
            it = iter(self.eval_loader)
            batch = next(it)
            sync(self.device)
            t0, n = time.perf_counter(), 0
            while batch is not None:
                x, y = batch
                self.model(x.to(self.device, non_blocking=True)).argmax(1).cpu()
                n += len(y)
                batch = next(it, None)
            sync(self.device)
            return n, time.perf_counter() - t0


# ============================================================================ B: cifarlab
class CifarlabSide:
    """B: cifarlab's defaults, through the same functions ``fit`` uses."""

    def __init__(self, name: str, cfg: RunConfig, data: ImageData, eval_images: int, model: nn.Module | None = None):
        """``model``: another implementation of the same network (the timm peer), trained as B is."""
        t = cfg.train
        self.cfg = cfg
        self.rt: Runtime = setup_runtime(t, name)
        self.model = (model if model is not None else build_model(cfg, data.num_classes)).to(self.rt.device)
        if self.rt.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batches = DeviceBatches(data.train_x, data.train_y, t.batch_size, mean=data.mean, std=data.std,
                                     device=self.rt.device, shuffle=True, drop_last=True,
                                     augment=BatchAugment(cfg.data, len(data.train_x), t.seed, epochs=t.epochs),
                                     seed=t.seed, channels_last=self.rt.channels_last)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler, self.per_step = build_scheduler(self.optimizer, cfg.optim, t.epochs, len(self.batches))
        self.train_model = maybe_compile(self.model, t.compile)
        # The trainer's parts (no spec needed: the loop and its step read none of it), so that B's steps are fit's.
        self.parts = Parts(cfg, None, self.rt, data, self.model, self.train_model, self.batches, self.optimizer,
                           self.scheduler, self.per_step)
        self.state = TrainState()
        self.eval_x = data.val_x[:eval_images]
        self.epoch = 0

    def train(self, steps: int) -> tuple[int, float]:
        """``steps`` steps of ``train_one_epoch``: the last ones of an epoch, so its end-of-epoch sync is timed."""
        steps = min(steps, len(self.batches))
        self.state.step = len(self.batches) - steps
        sync(self.rt.device)
        t0 = time.perf_counter()
        train_one_epoch(self.parts, self.state, self.epoch)
        sync(self.rt.device)
        self.epoch += 1
        return steps * self.cfg.train.batch_size, time.perf_counter() - t0

    def evaluate(self) -> tuple[int, float]:
        sync(self.rt.device)
        t0 = time.perf_counter()
        logits = predict_logits(self.model, self.eval_x, self.batches, self.rt, self.cfg.train.eval_batch_size)
        logits.argmax(1).cpu()
        sync(self.rt.device)
        return len(self.eval_x), time.perf_counter() - t0


# ============================================================================ C: timm's ViT
def timm_or_reason():
    """(the ``timm`` module, None), or (None, why the timm peer is skipped)."""
    import inspect

    try:
        import timm
        from timm.layers import Attention
    except ImportError:
        return None, "timm not installed (pip install timm, or cifarlab's timm extra)"
    if "attn_head_dim" not in inspect.signature(Attention).parameters:  # heads narrower than width / heads
        return None, f"timm {timm.__version__}'s Attention has no attn_head_dim: a newer timm is needed"
    return timm, None


def timm_vit(cfg: RunConfig, num_classes: int) -> nn.Module:
    """timm's ``VisionTransformer`` at the shape of cifarlab's ``vit`` as configured (see the module docstring)."""
    from timm.layers import Attention
    from timm.models.vision_transformer import VisionTransformer
    from cifarlab.models import model_defaults

    p = {**model_defaults("vit"), **cfg.model.params}
    # cifarlab's heads are head_dim wide whatever the width (the study's: 20 x 16 on a width of 32);
    # timm's Block builds dim // num_heads unless its attention layer is told otherwise.
    class HeadDimAttention(Attention):
        def __init__(self, dim: int, **kwargs):
            super().__init__(dim, attn_head_dim=p["head_dim"], **kwargs)

    d = p["dropout"]
    model = VisionTransformer(img_size=cfg.data.image_size, patch_size=p["patch_size"], num_classes=num_classes,
                              embed_dim=p["embed_dim"], depth=p["num_encoder_layers"], num_heads=p["num_heads"],
                              mlp_ratio=p["hidden_layer_depth"] / p["embed_dim"], qkv_bias=True,
                              attn_layer=HeadDimAttention,
                              drop_rate=d, pos_drop_rate=d, proj_drop_rate=d)
    model.head = nn.Sequential(nn.Linear(p["embed_dim"], p["mlp_head_hidden_layer_depth"]), nn.GELU(),
                               nn.Dropout(d), nn.Linear(p["mlp_head_hidden_layer_depth"], num_classes))
    return model


# ============================================================================ FLOPs
def count_flops(model: nn.Module, device: torch.device, train: bool, image_size: int = 32) -> float:
    """FLOPs per image: forward+backward (training) or forward (evaluation), on a batch of 2."""
    x = torch.randn(2, 3, image_size, image_size, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    model.train(train)
    with FlopCounterMode(display=False) as fc:
        if train:
            F.cross_entropy(model(x), y).backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 2


# ============================================================================ start-up
def measure_startup(data: str | None, train_size: int) -> float | None:
    """Seconds from launching ``python -m cifarlab train`` to its "first training step" log line."""
    sets = [f"data.train_size={train_size}", "data.val_size=1000", "train.epochs=1"]
    if data:
        sets.append(f"data.path={data}")
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "cifarlab", "train", "--config", str(REPO / "configs" / "cnn.yaml"),
               "--out", out, "--name", "startup", *[a for s in sets for a in ("--set", s)]]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seconds = None
        assert proc.stdout is not None
        tail = []
        for line in proc.stdout:
            if "first training step" in line:
                seconds = time.perf_counter() - t0
                break
            tail = (tail + [line])[-5:]
        proc.kill()
        proc.wait()
    if seconds is None:
        print("start-up timing failed; the command's last lines:\n" + "".join(tail), file=sys.stderr)
    return seconds


# ============================================================================ run
def load_bench_data(path: str | None, train_size: int, val_size: int = 2048) -> ImageData:
    from cifarlab.config import DataConfig

    return load_data(DataConfig(path=path, train_size=train_size, val_size=val_size))


def bench_model(name: str, data: ImageData, plan: Plan, args: argparse.Namespace, log, timm=None) -> dict:
    """``timm``: the timm module, for the ViT's second peer C (None: no C)."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml", [f"train.compile={'true' if args.compile else 'false'}",
                                                          *args.overrides])
    apply_data_defaults(cfg, data)  # data.image_size from the images, as fit does
    vit = name == "vit"
    b_steps, a_steps = (plan.vit_steps, plan.vit_a_steps) if vit else (plan.steps, plan.steps)
    b = CifarlabSide(name, cfg, data, plan.vit_eval_images if vit else plan.eval_images)
    a = StudySide(name, cfg, data, b.rt.device, plan.vit_a_eval_images if vit else plan.eval_images)
    c = (CifarlabSide(name, cfg, data, plan.vit_eval_images, model=timm_vit(cfg, data.num_classes))
         if vit and timm is not None else None)
    flops_train = count_flops(a.model, b.rt.device, train=True, image_size=cfg.data.image_size)
    flops_eval = count_flops(a.model, b.rt.device, train=False, image_size=cfg.data.image_size)

    # Warm-up: allocator, kernels, the first fork of the loaders, and torch.compile when asked for (timed).
    t0 = time.perf_counter()
    b.train(2)
    compile_s = time.perf_counter() - t0 if args.compile else None
    b.evaluate()
    a.warm_up()
    sides = [("a_train", lambda: a.train(a_steps)), ("b_train", lambda: b.train(b_steps)),
             ("a_eval", a.evaluate), ("b_eval", b.evaluate)]
    if c is not None:
        c.train(2)
        c.evaluate()
        sides += [("c_train", lambda: c.train(b_steps)), ("c_eval", c.evaluate)]

    totals = {k: [0, 0.0] for k, _ in sides}
    for r in range(plan.rounds):
        for key, fn in sides:
            n, s = fn()
            totals[key][0] += n
            totals[key][1] += s
        log(f"  {name} round {r + 1}/{plan.rounds}: " + ", ".join(
            f"{k} {v[0] / v[1]:.1f} img/s" for k, v in totals.items()))
    rate = {k: v[0] / v[1] for k, v in totals.items()}
    return {"rate": rate, "flops_train": flops_train, "flops_eval": flops_eval, "precision": b.rt.precision,
            "channels_last": b.rt.channels_last, "compile_s": compile_s, "steps": (a_steps, b_steps),
            "batch_size": cfg.train.batch_size}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    path = data_path(args.data)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 progress on stderr, results on stdout
    t_start = time.perf_counter()
    data = load_bench_data(path, plan.train_size, args.eval_images or 2048)
    probe = setup_runtime(load_config(REPO / "configs" / "cnn.yaml").train, "cnn")  # B's device and threads
    device = probe.device
    log(f"data: {len(data.train_x)} train / {len(data.val_x)} val images from {data.source}; device {device_name(device)}"
        f"; torch {torch.__version__}, {torch.get_num_threads()} threads")

    peaks = {"fp32": matmul_peak(device, torch.float32, plan.peak_seconds),
             "bf16": matmul_peak(device, torch.bfloat16, plan.peak_seconds)}
    timm, timm_note = (None, "--no-timm") if args.no_timm else timm_or_reason()
    results = {}
    for name in args.models:
        log(f"{name}: ...")
        results[name] = bench_model(name, data, plan, args, log, timm)
    for k, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peaks[k] = max(peaks[k], matmul_peak(device, dtype, plan.peak_seconds))
    startup = None if args.no_startup else measure_startup(path, plan.train_size)

    out = {"peak_gflops": {k: round(v, 1) for k, v in peaks.items()}, "train": {}, "eval": {}}
    rows = []
    for name, r in results.items():
        b_peak = peaks["bf16" if r["precision"] == "bf16" else "fp32"]
        for phase in ("train", "eval"):
            a_rate, b_rate = r["rate"][f"a_{phase}"], r["rate"][f"b_{phase}"]
            flops = r[f"flops_{phase}"]
            a_gf, b_gf = a_rate * flops / 1e9, b_rate * flops / 1e9
            out[phase][name] = {"a": round(a_rate, 1), "b": round(b_rate, 1), "ratio": round(b_rate / a_rate, 2),
                                "peak_fraction": round(b_gf / b_peak, 3)}
            if f"c_{phase}" in r["rate"]:  # the timm peer, in B's runtime and precision
                c_rate = r["rate"][f"c_{phase}"]
                out[phase][name].update(timm=round(c_rate, 1), vs_timm=round(b_rate / c_rate, 2),
                                        timm_peak_fraction=round(c_rate * flops / 1e9 / b_peak, 3))
            rows.append((name, phase, f"{a_rate:.1f}", f"{b_rate:.1f}", f"{b_rate / a_rate:.1f}x",
                         f"{flops / 1e9:.3f}", f"{a_gf:.1f} ({a_gf / peaks['fp32']:.0%} fp32)",
                         f"{b_gf:.1f} ({b_gf / b_peak:.0%} {r['precision']})"))
    out["startup_s"] = None if startup is None else round(startup, 2)
    out["timm"] = {"version": timm.__version__} if timm is not None else {"skipped": timm_note}

    print(f"# throughput: A = study pipeline (fp32, PIL + torchvision transforms, DataLoader 2 workers), "
          f"B = cifarlab defaults; device {device_name(device)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"# matmul peak: fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s; "
          f"{plan.rounds} rounds; batch {'/'.join(sorted({str(r['batch_size']) for r in results.values()}))}; "
          f"{len(data.train_x)} training images")
    head = ("model", "phase", "A img/s", "B img/s", "B/A", "GFLOP/img", "A GFLOP/s", "B GFLOP/s (of peak)")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in (head, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    for name, r in results.items():
        extra = f", compile {r['compile_s']:.1f} s (first 2 steps)" if r["compile_s"] is not None else ""
        print(f"# {name}: training steps per round A {r['steps'][0]}, B {r['steps'][1]}; B {r['precision']}"
              f"{', channels-last' if r['channels_last'] else ''}{extra}")
    for name, r in results.items():
        if "c_train" in r["rate"]:
            for phase in ("train", "eval"):
                o = out[phase][name]
                print(f"# {name} {phase}: C = timm {timm.__version__} VisionTransformer at the same shape, run as B: "
                      f"{o['timm']:.1f} img/s ({o['timm_peak_fraction']:.0%} of the {r['precision']} peak); "
                      f"B/C {o['vs_timm']:.2f}x; B at {o['peak_fraction']:.0%} of the peak")
    if "vit" in results and timm is None:
        print(f"# vit: the timm peer (C) was skipped: {timm_note}")
    print(f"# cifarlab train start to first training step: "
          f"{'not measured' if startup is None else f'{startup:.2f} s'}; total {time.perf_counter() - t_start:.0f} s")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
