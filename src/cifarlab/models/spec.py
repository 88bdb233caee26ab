"""A model's declared capabilities (:class:`ModelSpec`), kept apart so that the registry and the timm builders
both use it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """What the trainer, the loaders and the exporters need to know of a model, declared where it is registered
    (as timm's pretrained configs declare input size and normalization) instead of probed by name or ``hasattr``.

    Input size and normalization of pretrained weights are the pretrained config's (:mod:`.pretrained`)."""

    name: str
    head: str  # the classifier module's name: fine-tuning trains it first; loaded weights that do not fit skip it
    channels_last: bool = True  # convolutions gain from NHWC on CPU and GPU; attention models do not
    whitening: bool = False  # ``model.init_whitening(images)``: a data-dependent init from normalized training images
    start_epoch: bool = False  # ``model.start_epoch(epoch)``: per-epoch settings (speednet's stem bias freeze)
    param_groups: bool = False  # ``model.param_groups(weight_decay)`` defines the optimizer's groups
    # What Grad-CAM explains (cifarlab.evaluation.explain): "conv", the last feature map before global pooling;
    # "tokens", a ViT's patch tokens entering its last block (blocks[-1].norm1); "" nothing (predict --explain
    # refuses the model).
    explain: str = "conv"
