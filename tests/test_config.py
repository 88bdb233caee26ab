"""Config: YAML + --set overrides, typed and validated, saved in full."""

from pathlib import Path

import pytest
import yaml

from cifarlab.config import RunConfig, load_config
from cifarlab.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cnn", "resnet18", "vit"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.model.name == name
    assert cfg.optim.name == "adamw" and cfg.optim.schedule == "exponential"
    # The study's 40,000 / 10,000 split of CIFAR-10's 50,000 training images, as a fraction that fits any data
    assert cfg.data.train_size is None and cfg.data.val_size is None and cfg.data.val_fraction == 0.2
    assert cfg.data.image_size is None  # the data's own size


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_builds_its_model(path):
    """Each shipped recipe loads and its model builds with the recipe's hyperparameters."""
    from cifarlab.models import create_model

    cfg = load_config(path)
    model = create_model(cfg.model.name, 10, **cfg.model.params)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_vit_stem_from_the_command_line():
    cfg = load_config(REPO / "configs" / "vit-strong.yaml")
    assert cfg.model.params["stem_channels"] == [32, 64, 128]
    plain = load_config(REPO / "configs" / "vit-strong.yaml", ["model.stem_channels=[]"])
    assert plain.model.params["stem_channels"] == []
    with pytest.raises(ConfigError, match="stem_channels"):
        load_config(REPO / "configs" / "vit-strong.yaml", ["model.patch_size=16"])  # 4 stride-2 layers > 3


def test_study_vit_values():
    cfg = load_config(REPO / "configs" / "vit.yaml")
    p = cfg.model.params
    assert (p["patch_size"], p["embed_dim"], p["num_encoder_layers"], p["hidden_layer_depth"], p["head_dim"],
            p["num_heads"], p["dropout"], p["mlp_head_hidden_layer_depth"]) == (2, 32, 4, 1024, 16, 20, 0.25, 1024)
    assert (cfg.optim.lr, cfg.optim.gamma, cfg.optim.weight_decay, cfg.train.batch_size, cfg.train.epochs) == (
        0.000365, 0.9, 0.1, 128, 60)


def test_overrides_and_roundtrip(tmp_path):
    cfg = load_config(REPO / "configs" / "cnn.yaml",
                      ["data.train_size=2000", "optim.lr=3e-4", "model.widths=[8,16,32]", "train.epochs=1"])
    assert cfg.data.train_size == 2000 and cfg.optim.lr == 3e-4 and cfg.model.params["widths"] == [8, 16, 32]
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["model"]["widths"] == [8, 16, 32]


@pytest.mark.parametrize("override,match", [
    ("optim.nope=1", "unknown config key 'optim.nope'"),
    ("bogus.lr=1", "unknown config section 'bogus'"),
    ("lr=1", "section.key"),
    ("optim.lr=abc", "optim.lr must be a number"),
    ("optim.lr=-0.1", "optim.lr=-0.1 must be a positive number"),
    ("train.epochs=1.5", "train.epochs must be an integer"),
    ("train.epochs=0", "train.epochs=0 must be >= 1"),
    ("data.augment_p=1.5", r"data.augment_p=1.5 must be in \[0, 1\]"),
    ("train.precision=fp8", "train.precision"),
    ("model.nope=3", "unknown config key 'model.nope'"),
    ("train.channels_last=maybe", "must be true or false"),
    ("data.crop_scale=[0.9, 0.1]", "data.crop_scale"),
])
def test_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(REPO / "configs" / "cnn.yaml", [override])


def test_vit_geometry_checked():
    with pytest.raises(ConfigError, match="patch_size=3 must divide"):
        load_config(REPO / "configs" / "vit.yaml", ["model.patch_size=3", "data.image_size=32"])
    cfg = load_config(REPO / "configs" / "vit.yaml", ["model.patch_size=3"])  # the size is the data's: later
    cfg.data.image_size = 30
    assert cfg.validate().model.params["patch_size"] == 3
    with pytest.raises(ConfigError, match="head_dim"):
        load_config(REPO / "configs" / "vit.yaml", ["model.head_dim=0"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("data: 3\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)
    bad.write_text("extra: {}\n")
    with pytest.raises(ConfigError, match="unknown config section"):
        load_config(bad)


def test_defaults_validate():
    RunConfig().validate()
