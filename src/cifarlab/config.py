"""One typed config per run: ``data``, ``model``, ``optim`` and ``train`` sections.

A config is loaded from YAML (``configs/*.yaml``), overridden by ``--set
section.key=value`` strings, validated with messages that name the key, and
saved in full with every run (``config.yaml``) so the run can be reproduced.

The ``model`` section is open: besides ``name`` it takes the keyword arguments of
the registered model builder, checked against that builder's signature.
"""

from __future__ import annotations

import math
import sys
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .coerce import coerce, parse_duration
from .errors import ConfigError


@dataclass
class DataConfig:
    # a data set name (cifar10, cifar100, mnist, ...), an image folder, an archive or None: $CIFARLAB_DATA, else cifar10
    path: str | None = None
    # CSV of image paths and labels (and optionally splits) under data.path; for an official archive by path, its
    # label set: coarse (CIFAR-100's superclasses; fine by default), mnist or fashion-mnist (IDX class names)
    labels: str | None = None
    image_size: int | None = None  # pixels; None: the images' own size; images of another size are resized to it
    train_size: int | None = None  # at most this many training images (a stratified subset); None: all the rest
    val_size: int | None = None  # images held out of the training set for validation (a count; overrides the fraction)
    val_fraction: float = 0.2  # of the training images, held out for validation where no val split is given
    test_fraction: float = 0.2  # of all images, held out for testing where the source gives no test split
    seed: int = 0  # seed of the train/validation (and carved test) split
    # MiB of images the training device may hold; a larger data set streams from the decode cache's memory map
    # (None: half of the device's free memory, measured at start)
    device_memory: float | None = None
    skip_bad_images: bool = False  # skip (and count) unreadable images instead of failing
    # Cleaning (docs/audit.md): a CSV with a path column (an edited label_issues.csv) or a text list of paths
    # (relative to data.path; split/index for archives) whose images are dropped from every split
    exclude: str | None = None
    relabel: str | None = None  # a CSV path,label: corrected labels (class names)
    # Study augmentation: with probability augment_p an image gets flip + rotation + random resized crop.
    augment_p: float = 0.0  # probability, 0..1
    augment_flip: bool = True  # horizontal flip (with prob 0.5) inside the applied augmentation (was data.hflip)
    rotation: float = 15.0  # degrees, rotation drawn from U(-rotation, rotation)
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])  # area fraction of the crop
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])  # aspect ratio of the crop
    # Fast-training augmentations (airbench / ResNet-9 recipes), applied to every training image.
    flip: str = "none"  # none | random | alternating: horizontal flip outside the study's augmentation
    translate: int = 0  # pixels: random crop with reflect padding of this many pixels (0 = off)
    cutout: int = 0  # side of a square zeroed at a random position (0 = off)
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup (0 = off)
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix (0 = off)
    trivial_augment: bool = False  # TrivialAugment-Wide, batched per op
    # Progressive resizing (FFCV's ResNet recipes; Howard's fast.ai DAWNBench entry): training batches are
    # downscaled to progressive_size pixels in the first epoch, growing linearly in steps of 4 pixels to
    # image_size at progressive_until x epochs; the rest of the run, and every evaluation, at full size.
    # A conv net's cost scales with the pixels: 16 -> 32 over 3/4 of 12 epochs costs ~7.2 full epochs.
    progressive_size: int = 0  # pixels in the first epoch (0 = off)
    progressive_until: float = 0.75  # fraction of the epochs after which training is at full size


@dataclass
class ModelConfig:
    name: str = "cnn"  # a registered model (`cifarlab models`) or timm/<architecture> (timm's zoo, extra `timm`)
    # Starting weights and the input they expect (docs/finetune.md; cifarlab.models.pretrained):
    pretrained: bool = False  # start from published ImageNet weights (resnet18: torchvision's; timm/*: timm's)
    weights: str | None = None  # a local state dict (safetensors, or torch's loaded with weights_only) to start from
    input_size: int = 0  # pixels the model sees; 0 = the pretrained weights' size, else data.image_size
    mean: list[float] | None = None  # input normalization in [0, 1] units; None = the pretrained weights', else
    std: list[float] | None = None  # the training split's. Batches of another size are resized on the device
    params: dict[str, Any] = field(default_factory=dict)  # builder kwargs, flattened into the section in YAML


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | muon (matrices and filters; the rest by optim.aux, train/muon.py)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.01  # decoupled weight decay (decay per step = lr x weight_decay)
    coupled_decay: bool = False  # SGD: add weight_decay x w to the gradient instead (torch's SGD, airbench94)
    momentum: float = 0.9  # SGD momentum (Nesterov)
    nesterov: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    schedule: str = "exponential"  # exponential | cosine | onecycle | linear | constant
    gamma: float = 0.95  # exponential decay per epoch
    warmup_epochs: float = 0.0  # linear warm-up (epochs, fractional allowed) for cosine / linear / onecycle / constant
    warmup_fraction: float = 0.0  # the warm-up as a share of the run (0..1): it scales with train.epochs
    min_lr_ratio: float = 0.0  # final lr / peak lr for cosine / linear
    warmup_start: float = 0.0  # lr / peak lr at step 0 of the warm-up (airbench94: 0.2); 0 = from ~zero
    lr_scale_rule: str = "none"  # none | linear | sqrt: scale lr by world size in distributed runs
    backbone_lr_scale: float = 1.0  # lr of everything but the head, relative to lr (discriminative lrs)
    # Muon (optim.name=muon): lr is the Muon group's; biases, norms, embeddings and the head go to optim.aux
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum
    muon_ns_steps: int = 5  # Newton-Schulz iterations per update
    aux: str = "sgd"  # sgd | adamw: the optimizer of the parameters Muon does not suit (momentum / betas above)
    aux_lr: float = 0.0  # their peak lr (0 = optim.lr)
    head_lr: float = 0.0  # the head's peak lr under Muon (0 = aux_lr's); airbench94_muon: 0.67 (biases 0.053)
    muon_normalize: bool = False  # rescale each filter bank to norm sqrt(out) before its step (airbench94_muon)
    muon_rms_scale: bool = True  # scale the update by sqrt(max(1, rows/cols)) (Keller Jordan's Muon); airbench: off


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128  # per process
    eval_batch_size: int = 1024
    val_every: int = 1  # validate every N epochs (and always after the last)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16: CUDA only)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (auto: CUDA, else Apple's MPS, else the CPU)
    seed: int = 0
    channels_last: bool = True  # memory format for conv nets
    compile: bool = False  # torch.compile the model (compile time is reported)
    num_threads: int = 0  # torch intra-op threads, 0 = all cores
    label_smoothing: float = 0.0
    class_weights: str = "none"  # none | balanced: weight the loss by inverse class frequency (imbalanced data)
    ema: float = 0.0  # decay of an exponential moving average of the weights (0 = off)
    ema_every: int = 1  # steps between EMA updates
    lookahead: float = 0.0  # airbench's lookahead: per-step decay of the slow weights (0 = off; airbench 0.95)
    lookahead_every: int = 5  # steps between lookahead syncs
    tta: str = "none"  # none | flip | flip_translate: test-time augmentation at evaluation
    grad_clip: float = 0.0  # max gradient norm (0 = off)
    checkpoint_every_steps: int = 0  # also write the last checkpoint every N steps (0 = per epoch only)
    nan_policy: str = "stop"  # stop | skip-batch
    log_every: int = 20  # steps between progress-bar updates (each costs one host sync)
    freeze_epochs: int = 0  # fine-tuning: train only the head for this many epochs, then everything
    freeze_bn: bool = False  # fine-tuning: BatchNorm layers keep their running statistics (eval mode) all run
    time_budget: str | float = ""  # train to a time budget ("" = off): seconds or 90s / 10m / 1.5h; sets steps and epochs
    steps: int = 0  # total optimizer steps (0 = epochs x steps per epoch; the last epoch stops at it)
    early_stop: int = 0  # stop after this many validations without a gain of early_stop_min_delta (0 = off)
    early_stop_min_delta: float = 0.0  # the validation accuracy gain that counts as one


_MODEL_FIELDS = {f.name for f in fields(ModelConfig)} - {"params"}  # model keys that are not builder kwargs

SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ----------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        params = d["model"].pop("params")
        d["model"].update(params)
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "RunConfig":
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ConfigError("config must be a mapping of sections (data, model, optim, train)")
        unknown = set(raw) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))} "
                              f"(expected: {', '.join(SECTIONS)})")
        cfg = cls()
        for section, values in raw.items():
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"config section '{section}' must be a mapping, got {type(values).__name__}")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value)
        return cfg

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text  # a kill mid-write must not tear it

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    # -------------------------------------------------------- overrides
    def set(self, dotted: str, value: Any) -> None:
        """Set ``section.key`` to ``value``, converting and type-checking it."""
        if "." not in dotted:
            raise ConfigError(f"config key '{dotted}' must look like section.key (e.g. optim.lr)")
        if dotted in RENAMED_KEYS:
            notice(f"{dotted} is now {RENAMED_KEYS[dotted]}; the old name still works for now")
            dotted = RENAMED_KEYS[dotted]
        section, key = dotted.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}' in '{dotted}' (expected: {', '.join(SECTIONS)})")
        obj = getattr(self, section)
        if section == "model" and key == "name":
            name = coerce(dotted, value, str)
            if name != obj.name:
                _reset_model_params(obj, name)
            obj.name = name
            return
        if section == "model" and key not in _MODEL_FIELDS:
            if key == "params":
                if not isinstance(value, dict):
                    raise ConfigError("model.params must be a mapping")
                obj.params.update(value)
            else:
                obj.params[key] = value
            return
        types_ = {f.name: f.type for f in fields(obj)}
        if key not in types_ or key == "params":
            raise ConfigError(f"unknown config key '{dotted}'; {section} keys are: "
                              f"{', '.join(k for k in types_ if k != 'params')}")
        setattr(obj, key, coerce(dotted, value, _resolve_type(type(obj), key)))
        if dotted in WARMUP_KEYS and getattr(obj, key) > 0:  # two spellings of one warm-up: the last one set wins
            other = WARMUP_KEYS[dotted].split(".", 1)[1]
            setattr(obj, other, 0.0)

    def apply_overrides(self, overrides: list[str]) -> None:
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"--set expects section.key=value, got '{item}'")
            key, text = item.split("=", 1)
            try:
                value = yaml.safe_load(text) if text.strip() else ""
            except yaml.YAMLError:
                value = text
            self.set(key.strip(), value)

    # -------------------------------------------------------- validation
    def validate(self) -> "RunConfig":
        """Check ranges and cross-field rules; raises ConfigError naming the key."""
        d, m, o, t = self.data, self.model, self.optim, self.train
        size = d.image_size if d.image_size is not None else 1 << 30  # None: checked again once the data tell it
        _check(size >= 8, "data.image_size", d.image_size, "must be >= 8")
        _check(d.train_size is None or d.train_size >= 1, "data.train_size", d.train_size, "must be >= 1")
        _check(d.val_size is None or d.val_size >= 0, "data.val_size", d.val_size, "must be >= 0")
        _check(0 <= d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in [0, 1)")
        _check(0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "must be in (0, 1)")
        _check(d.device_memory is None or d.device_memory > 0, "data.device_memory", d.device_memory,
               "must be a positive number of MiB")
        _check(0.0 <= d.augment_p <= 1.0, "data.augment_p", d.augment_p, "must be in [0, 1]")
        _check(0.0 <= d.rotation <= 180.0, "data.rotation", d.rotation, "must be in [0, 180] degrees")
        _pair(d.crop_scale, "data.crop_scale", lo=0.0, hi=1.0)
        _pair(d.crop_ratio, "data.crop_ratio", lo=0.0, hi=math.inf)
        _check(d.flip in ("none", "random", "alternating"), "data.flip", d.flip, "must be none, random or alternating")
        _check(0 <= d.translate < size, "data.translate", d.translate, "must be in [0, image_size)")
        _check(0 <= d.cutout <= size, "data.cutout", d.cutout, "must be in [0, image_size]")
        _check(d.progressive_size == 0 or 8 <= d.progressive_size <= size, "data.progressive_size",
               d.progressive_size, "must be 0 (off) or in [8, image_size]")
        _check(0 < d.progressive_until <= 1, "data.progressive_until", d.progressive_until, "must be in (0, 1]")
        _check(d.mixup >= 0 and d.cutmix >= 0, "data.mixup/cutmix", (d.mixup, d.cutmix), "must be >= 0")

        _check(o.name in ("adamw", "sgd", "muon"), "optim.name", o.name, "must be adamw, sgd or muon")
        _check(0 <= o.muon_momentum < 1, "optim.muon_momentum", o.muon_momentum, "must be in [0, 1)")
        _check(1 <= o.muon_ns_steps <= 50, "optim.muon_ns_steps", o.muon_ns_steps, "must be in [1, 50]")
        _check(o.aux in ("sgd", "adamw"), "optim.aux", o.aux, "must be sgd or adamw")
        _check(o.head_lr >= 0, "optim.head_lr", o.head_lr, "must be >= 0")
        _check(o.aux_lr >= 0, "optim.aux_lr", o.aux_lr, "must be >= 0 (0: optim.lr)")
        _check(math.isfinite(o.lr) and o.lr > 0, "optim.lr", o.lr, "must be a positive number")
        _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
        _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
        _pair(o.betas, "optim.betas", lo=0.0, hi=1.0)
        _check(o.schedule in ("exponential", "cosine", "onecycle", "linear", "constant"), "optim.schedule",
               o.schedule, "must be exponential, cosine, onecycle, linear or constant")
        _check(0 < o.gamma <= 1, "optim.gamma", o.gamma, "must be in (0, 1]")
        _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "must be >= 0")
        _check(not o.coupled_decay or o.name == "sgd", "optim.coupled_decay", o.coupled_decay,
               f"is for SGD (optim.name=sgd), not {o.name}")
        _check(0 <= o.warmup_start <= 1, "optim.warmup_start", o.warmup_start, "must be in [0, 1]")
        _check(0 <= o.warmup_fraction < 1, "optim.warmup_fraction", o.warmup_fraction,
               "must be in [0, 1): a share of the run")
        _check(not (o.warmup_epochs and o.warmup_fraction), "optim.warmup_epochs", o.warmup_epochs,
               f"and optim.warmup_fraction={o.warmup_fraction} both set the warm-up: give one")
        _check(o.schedule == "exponential" or o.warmup_epochs < t.epochs, "optim.warmup_epochs", o.warmup_epochs,
               f"must be shorter than the run (train.epochs={t.epochs}), or the lr never reaches its peak; "
               f"optim.warmup_fraction gives it as a share of the run")
        _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
        _check(o.lr_scale_rule in ("none", "linear", "sqrt"), "optim.lr_scale_rule", o.lr_scale_rule,
               "must be none, linear or sqrt")

        _check(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
        _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
        _check(t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size, "must be >= 1")
        _check(1 <= t.val_every <= t.epochs, "train.val_every", t.val_every,
               f"must be in [1, train.epochs={t.epochs}]")
        _check(t.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision", t.precision,
               "must be auto, fp32, bf16 or fp16")
        _check(t.device in ("auto", "cpu", "mps") or t.device.startswith("cuda"), "train.device", t.device,
               "must be auto, cpu, cuda, cuda:N or mps")
        _check(t.num_threads >= 0, "train.num_threads", t.num_threads, "must be >= 0")
        _check(0 <= t.label_smoothing < 1, "train.label_smoothing", t.label_smoothing, "must be in [0, 1)")
        _check(t.class_weights in ("none", "balanced"), "train.class_weights", t.class_weights,
               "must be none or balanced")
        _check(0 <= t.ema < 1, "train.ema", t.ema, "must be in [0, 1)")
        _check(t.ema_every >= 1, "train.ema_every", t.ema_every, "must be >= 1")
        _check(0 <= t.lookahead < 1, "train.lookahead", t.lookahead, "must be in [0, 1)")
        _check(t.lookahead_every >= 1, "train.lookahead_every", t.lookahead_every, "must be >= 1")
        _check(t.tta in ("none", "flip", "flip_translate"), "train.tta", t.tta, "must be none, flip or flip_translate")
        _check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0")
        _check(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", t.checkpoint_every_steps, "must be >= 0")
        _check(t.nan_policy in ("stop", "skip-batch"), "train.nan_policy", t.nan_policy, "must be stop or skip-batch")
        _check(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
        _check(0 <= t.freeze_epochs <= t.epochs, "train.freeze_epochs", t.freeze_epochs, "must be in [0, train.epochs]")
        _check(o.backbone_lr_scale >= 0, "optim.backbone_lr_scale", o.backbone_lr_scale, "must be >= 0")
        if t.time_budget:
            parse_duration("train.time_budget", t.time_budget)
        _check(t.steps >= 0, "train.steps", t.steps, "must be >= 0 (0: train.epochs whole epochs)")
        _check(t.early_stop >= 0, "train.early_stop", t.early_stop, "must be >= 0 (validations of patience; 0 = off)")
        _check(0 <= t.early_stop_min_delta < 1, "train.early_stop_min_delta", t.early_stop_min_delta,
               "must be in [0, 1)")
        # A decay schedule (cosine, linear, onecycle) is sized to train.epochs: its best epochs are its last, at
        # a small lr, so a run stopped mid-way compares weights trained at a high lr against the end it never
        # reached. Stopping early is sound where the lr does not depend on the run's length.
        _check(not t.early_stop or o.schedule in ("constant", "exponential"), "train.early_stop", t.early_stop,
               f"is unsound with optim.schedule={o.schedule} (its decay is sized to train.epochs, so a stopped run "
               f"ends at a high lr); use constant or exponential")

        from .models import model_defaults, validate_model_params  # late import: models import torch

        m.params = validate_model_params(m.name, m.params, image_size=d.image_size)
        # A builder that takes image_size makes a model fixed to it (the CNN's flatten, the ViT's positions).
        fixed_size = "image_size" in model_defaults(m.name)
        _check(not (d.progressive_size and d.progressive_size < size and fixed_size),
               "data.progressive_size", d.progressive_size,
               f"needs a model that takes any image size (resnet18, speednet); {m.name} is built for data.image_size")
        from .models.pretrained import check_model_config

        check_model_config(self)  # pretrained / weights / input_size / mean / std
        return self


# Keys renamed since they were first shipped: the old spelling is accepted with a notice.
# data.hflip (the study's flip inside augment_p) read too much like data.flip (the fast recipes' flip mode).
RENAMED_KEYS = {"data.hflip": "data.augment_flip"}
WARMUP_KEYS = {"optim.warmup_epochs": "optim.warmup_fraction", "optim.warmup_fraction": "optim.warmup_epochs"}


def notice(message: str) -> None:
    """A one-line note on stderr about something cifarlab changed or assumed for the user."""
    print(f"cifarlab: note: {message}", file=sys.stderr, flush=True)


def _reset_model_params(model: ModelConfig, name: str) -> None:
    """A new ``model.name`` keeps only the hyperparameters the new model has (the rest were the old model's)."""
    from .models import model_defaults  # late import: models import torch

    try:
        keys = model_defaults(name)
    except ConfigError:  # an unknown model: validate() names it
        return
    dropped = [k for k in model.params if k not in keys]
    kept = {k: v for k, v in model.params.items() if k in keys}
    if dropped:
        notice(f"model.name {model.name} -> {name}: dropped {', '.join(f'model.{k}' for k in dropped)} "
               f"({model.name}'s, not {name}'s)" + (f"; kept {', '.join(f'model.{k}={v}' for k, v in kept.items())}"
                                                    if kept else "") + f"; {name}'s defaults for the rest")
    model.params = kept


def fit_schedule_to_epochs(cfg: RunConfig, config_epochs: int, touched: set[str] | frozenset = frozenset(),
                           say=notice) -> RunConfig:
    """Keep a recipe's schedule whole when its length changes (``--epochs``, ``--set train.epochs=...``).

    An absolute ``optim.warmup_epochs`` is rescaled to the same share of the new ``train.epochs`` as of
    ``config_epochs`` (unless the warm-up itself was among the ``touched`` keys), with a one-line note;
    ``optim.warmup_fraction`` scales by itself. ``train.val_every`` is lowered to ``train.epochs`` if above.
    """
    o, t = cfg.optim, cfg.train
    if (t.epochs != config_epochs and o.warmup_epochs > 0 and config_epochs > 0
            and not touched & set(WARMUP_KEYS) and o.schedule != "exponential"):
        old, o.warmup_epochs = o.warmup_epochs, round(o.warmup_epochs * t.epochs / config_epochs, 3)
        say(f"optim.warmup_epochs {old:g} -> {o.warmup_epochs:g}: the same share ({old / config_epochs:.0%}) of "
            f"train.epochs={t.epochs} as of the config's {config_epochs}; set optim.warmup_epochs to choose")
    if t.val_every > t.epochs:  # silently: the loop validates after the last epoch anyway; the saved config says so
        t.val_every = t.epochs
    return cfg


def override_keys(overrides: list[str] | None) -> set[str]:
    """The ``section.key`` names of ``--set`` strings (old spellings mapped to the current ones)."""
    keys = {o.split("=", 1)[0].strip() for o in overrides or [] if "=" in o}
    return {RENAMED_KEYS.get(k, k) for k in keys}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults), apply ``--set`` overrides, fit the schedule to the epochs
    (:func:`fit_schedule_to_epochs`) and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    cfg = RunConfig.from_dict(raw)
    config_epochs = cfg.train.epochs
    cfg.apply_overrides(overrides or [])
    fit_schedule_to_epochs(cfg, config_epochs, override_keys(overrides))
    return cfg.validate()


# ------------------------------------------------------------------ helpers
def _resolve_type(cls: type, key: str) -> Any:
    return typing.get_type_hints(cls)[key]


def _check(ok: bool, key: str, value: Any, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} {msg}")


def _pair(value: list[float], key: str, lo: float, hi: float) -> None:
    _check(len(value) == 2 and lo < value[0] <= value[1] <= hi, key, value,
           f"must be [low, high] with {lo} < low <= high <= {hi}")
