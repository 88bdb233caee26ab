"""Every registered model: forward and backward on a small CPU batch, finite outputs, right shapes."""

import pytest
import torch

from cifarlab.errors import ConfigError
from cifarlab.models import count_parameters, create_model, list_models, model_defaults

SMALL = {  # narrow variants keep the suite fast; defaults are exercised by test_default_shapes
    "cnn": {"widths": [8, 16, 32], "hidden": 16},
    "resnet18": {},
    "vit": {"patch_size": 4, "embed_dim": 16, "num_encoder_layers": 2, "num_heads": 2, "head_dim": 8,
            "hidden_layer_depth": 32, "mlp_head_hidden_layer_depth": 16},
}


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, **SMALL.get(name, {}))
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (4, 7)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert count_parameters(model) > 0


@pytest.mark.parametrize("name", list_models())
def test_eval_mode_is_deterministic(name):
    model = create_model(name, 10, **SMALL.get(name, {})).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x), model(x))


def test_study_vit_shapes():
    """The study's tuned ViT: 257 tokens, inner width 20*16=320 != embed_dim 32."""
    model = create_model("vit", 10, patch_size=2, embed_dim=32, num_encoder_layers=4, hidden_layer_depth=1024,
                         head_dim=16, num_heads=20, dropout=0.25, mlp_head_hidden_layer_depth=1024)
    assert model.pos_embed.shape == (1, 257, 32)
    assert model.blocks[0].attn.qkv.out_features == 3 * 320
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vit_conv_stem_gives_the_patch_grid():
    """stem_channels=[8, 16, 24] with patch 4: one stride-1 conv, then two stride-2 convs, then a 1x1
    projection; the tokens keep the patch embedding's (B, 64, D) shape and the model trains through BN."""
    kw = SMALL["vit"]
    model = create_model("vit", 10, stem_channels=[8, 16, 24], **kw)
    strides = [m.stride[0] for m in model.patch_embed.convs if isinstance(m, torch.nn.Conv2d)]
    assert strides == [1, 2, 2]
    x = torch.randn(3, 3, 32, 32)
    tokens = model.patch_embed(x)
    assert tokens.shape == create_model("vit", 10, **kw).patch_embed(x).shape == (3, 64, 16)
    assert model.pos_embed.shape == (1, 65, 16)
    model(x).sum().backward()
    assert model.patch_embed.convs[0].weight.grad.abs().sum() > 0
    assert create_model("vit", 10, stem_channels=[], **kw).patch_embed.__class__.__name__ == "PatchEmbed"


def test_resnet_cifar_stem_keeps_resolution():
    plain = create_model("resnet18", 10)
    cifar = create_model("resnet18", 10, cifar_stem=True)
    x = torch.randn(1, 3, 32, 32)
    f_plain = plain.maxpool(plain.relu(plain.bn1(plain.conv1(x))))
    f_cifar = cifar.maxpool(cifar.relu(cifar.bn1(cifar.conv1(x))))
    assert f_plain.shape[-1] == 8 and f_cifar.shape[-1] == 32


def test_cnn_structure_follows_the_study():
    m = create_model("cnn", 10)
    kinds = [type(layer).__name__ for layer in m.features]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 3
    assert sum(type(layer).__name__ == "Linear" for layer in m.classifier) == 2
    assert any(type(layer).__name__ == "Dropout" for layer in m.classifier)


@pytest.mark.parametrize("name,kwargs,match", [
    ("nope", {}, "unknown model 'nope'"),
    ("cnn", {"depth": 3}, "unknown config key 'model.depth'"),
    ("cnn", {"hidden": "wide"}, "model.hidden must be an integer"),
    ("vit", {"patch_size": 5}, "patch_size=5 must divide"),
    ("vit", {"num_heads": 0}, "must be > 0"),
    ("vit", {"patch_size": 8, "stem_channels": [16, 32]}, "at least log2"),
    ("vit", {"patch_size": 2, "stem_channels": [16, 0]}, "positive integers"),
    ("vit", {"stem_channels": 16}, "list of widths"),
    ("cnn", {"dropout": 1.5}, "model.dropout"),
])
def test_bad_hyperparameters(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_model(name, 10, **kwargs)


def test_defaults_listed():
    assert "patch_size" in model_defaults("vit")
    assert "num_classes" not in model_defaults("cnn")


def test_models_counts_a_config_whose_image_size_follows_the_data(capsys):
    """``cifarlab models --config`` on a recipe that leaves data.image_size to the data (all shipped ones)."""
    from cifarlab.cli.main import main

    from .conftest import REPO

    with pytest.raises(SystemExit) as e:
        main(["models", "--config", str(REPO / "configs" / "cnn.yaml")])
    assert e.value.code == 0
    assert "cnn.yaml: cnn 2,474,058 parameters (at 32 px" in capsys.readouterr().out
