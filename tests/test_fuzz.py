"""Fuzzing the two doors user input comes through: image files and configs.

Each generated input must either load or fail with cifarlab's own error
(``CifarlabError``), never with an exception from deep inside Pillow, PyYAML or
torch. Images are random bytes or real images of every format and mode Pillow
writes, then cut short or with bytes overwritten; configs are random YAML
documents over the real keys, random text, and random ``--set`` strings.
"""

from __future__ import annotations

import io
import itertools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from cifarlab.config import SECTIONS, DataConfig, RunConfig, load_config
from cifarlab.data import load_data
from cifarlab.data.folder import decode_image
from cifarlab.errors import CifarlabError
from cifarlab.models import list_models, model_defaults

FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- images
FORMATS = [("JPEG", "RGB", "jpg"), ("JPEG", "L", "jpeg"), ("JPEG", "CMYK", "jpg"), ("PNG", "RGBA", "png"),
           ("PNG", "P", "png"), ("PNG", "LA", "png"), ("PNG", "I;16", "png"), ("PNG", "1", "png"),
           ("GIF", "P", "gif"), ("BMP", "RGB", "bmp"), ("TIFF", "RGB", "tif"), ("TIFF", "F", "tiff"),
           ("WEBP", "RGB", "webp"), ("PPM", "RGB", "ppm")]


@st.composite
def image_files(draw) -> tuple[bytes, str]:
    """(file bytes, extension): random bytes, or a real image that may be cut short or overwritten in places."""
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter: bytes that were never an image
        return draw(st.binary(max_size=600)), draw(st.sampled_from([f[2] for f in FORMATS]))
    fmt, mode, ext = draw(st.sampled_from(FORMATS))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    pixels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    data = bytearray(buf.getvalue())
    damage = draw(st.sampled_from(["none", "truncate", "overwrite", "both"]))
    if damage in ("overwrite", "both"):
        for pos, byte in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                                       min_size=1, max_size=8)):
            data[pos] = byte
    if damage in ("truncate", "both"):
        data = data[:draw(st.integers(0, len(data) - 1))]
    return bytes(data), ext


def test_fuzz_decode_image():
    outcomes = {"ok": 0, "error": 0}

    @settings(FUZZ, max_examples=300)
    @given(image_files(), st.sampled_from([8, 32]))
    def check(file, size):
        data, ext = file
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"x.{ext}"
            path.write_bytes(data)
            try:
                out = decode_image(path, size)
            except CifarlabError as e:
                assert str(path) in str(e)  # the message names the file
                outcomes["error"] += 1
                return
            assert out.shape == (size, size, 3) and out.dtype == np.uint8
            outcomes["ok"] += 1

    check()
    assert outcomes["ok"] > 30 and outcomes["error"] > 30, outcomes  # both paths were really exercised


@pytest.mark.parametrize("side", [10_000, 50_000])  # 1x-2x Pillow's pixel limit only warns; beyond, it raises
def test_header_claiming_a_huge_image_is_refused(side, tmp_path):
    """A damaged header must not make the loader allocate gigabytes (or leak Pillow's DecompressionBombError)."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="BMP")
    data = bytearray(buf.getvalue())
    data[18:26] = side.to_bytes(4, "little") * 2  # BITMAPINFOHEADER width and height
    path = tmp_path / "bomb.bmp"
    path.write_bytes(bytes(data))
    with pytest.raises(CifarlabError, match="cannot read image .*bomb.bmp"):
        decode_image(path, 32)


def test_fuzz_image_folder(tmp_path_factory):
    """Whole folders (a few classes, some files damaged) through load_data, with and without --skip-bad-images."""
    counter = itertools.count()
    outcomes = {"ok": 0, "error": 0}

    @settings(FUZZ, max_examples=25)
    @given(st.lists(st.lists(image_files(), min_size=1, max_size=4), min_size=1, max_size=3), st.booleans())
    def check(classes, skip):
        root = tmp_path_factory.mktemp(f"fuzz{next(counter)}")
        for split in ("train", "test"):
            for c, files in enumerate(classes):
                (root / split / f"c{c}").mkdir(parents=True)
                for i, (data, ext) in enumerate(files):
                    (root / split / f"c{c}" / f"{i}.{ext}").write_bytes(data)
        n = sum(len(f) for f in classes)
        try:
            data = load_data(DataConfig(path=str(root), image_size=32, train_size=n, val_size=0, skip_bad_images=skip))
        except CifarlabError:
            outcomes["error"] += 1
            return
        assert data.train_x.dtype == torch.uint8 and data.train_x.shape[1:] == (3, 32, 32)
        assert 0 < len(data.train_x) <= n and (skip or data.skipped == 0)
        outcomes["ok"] += 1

    check()
    assert outcomes["ok"] > 0 and outcomes["error"] > 0, outcomes


# --------------------------------------------------------------------------- configs
def _known_keys() -> dict[str, list[str]]:
    keys = {s: [f for f in cls.__dataclass_fields__ if f != "params"] for s, cls in SECTIONS.items()}
    keys["model"] += sorted({k for m in list_models() for k in model_defaults(m)})
    return keys


KEYS = _known_keys()
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.integers(-3, 300), st.sampled_from([10**400, -10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 2),
    st.text(max_size=12), st.sampled_from(["cnn", "vit", "resnet18", "speednet", "cpu", "auto", "fp32", "stop",
                                           "skip-batch", "cosine", "sgd", "adamw", "random", "1e-3", "[8, 16, 32]"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


@st.composite
def config_documents(draw) -> object:
    """Mostly well-formed section/key mappings with random values; now and then a wrong shape altogether."""
    if draw(st.integers(0, 9)) == 0:
        return draw(VALUES)
    doc = {}
    for section in draw(st.lists(st.sampled_from([*KEYS, "extra"]), max_size=4, unique=True)):
        keys = KEYS.get(section, ["x"])
        doc[section] = {k: draw(VALUES) for k in draw(st.lists(st.sampled_from([*keys, "nope"]), max_size=4,
                                                                unique=True))}
        if section == "model" and draw(st.booleans()):
            doc[section]["name"] = draw(st.sampled_from(list_models()))
    return doc


def _loads_or_cifarlab_error(path: Path | None, overrides: list[str], outcomes: dict) -> None:
    try:
        cfg = load_config(path, overrides)
    except CifarlabError:
        outcomes["error"] += 1
        return
    assert isinstance(cfg, RunConfig)
    RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))).validate()  # a valid config round-trips
    outcomes["ok"] += 1


def test_fuzz_config_documents(tmp_path):
    outcomes = {"ok": 0, "error": 0}

    @settings(FUZZ, max_examples=200)
    @given(config_documents())
    def check(doc):
        try:
            text = yaml.safe_dump(doc)
        except yaml.YAMLError:
            assume(False)
        path = tmp_path / "c.yaml"
        path.write_text(text)
        _loads_or_cifarlab_error(path, [], outcomes)

    check()
    assert outcomes["ok"] > 5 and outcomes["error"] > 50, outcomes


def test_fuzz_config_text(tmp_path):
    """Arbitrary text, YAML-ish text and bytes that are not UTF-8 at all."""
    outcomes = {"ok": 0, "error": 0}

    @settings(FUZZ, max_examples=150)
    @given(st.one_of(st.text(max_size=80), st.binary(max_size=80),
                     st.lists(st.sampled_from(["train:", "  epochs: 3", "optim:", "  lr: 1e-3", "- x", "{", "]",
                                               ": :", "model: {name: vit}", "\t", "&a x", "*a", "!!python/object:os.system"]),
                              max_size=6).map("\n".join)))
    def check(text):
        path = tmp_path / "c.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        _loads_or_cifarlab_error(path, [], outcomes)

    check()
    assert outcomes["ok"] > 0 and outcomes["error"] > 0, outcomes


def test_fuzz_set_overrides():
    outcomes = {"ok": 0, "error": 0}
    dotted = [f"{s}.{k}" for s, keys in KEYS.items() for k in keys]

    plausible = st.sampled_from(["0", "1", "3", "0.5", "1e-3", "true", "false", "32", "cnn", "cpu", "stop",
                                 "cosine", "[0.5, 1.0]", "[8, 16, 32]", ""])

    @settings(FUZZ, max_examples=250)
    @given(st.lists(st.tuples(st.one_of(st.sampled_from(dotted), st.sampled_from(dotted), st.text(max_size=10)),
                              st.one_of(plausible, plausible, st.text(max_size=12),
                                        SCALARS.map(lambda v: yaml.safe_dump(v).strip()))),
                    min_size=1, max_size=3))
    def check(pairs):
        _loads_or_cifarlab_error(None, [f"{k}={v}" for k, v in pairs], outcomes)

    check()
    assert outcomes["ok"] > 0 and outcomes["error"] > 50, outcomes  # one bad pair of three spoils the lot


@pytest.mark.parametrize("text", ["!!python/object/apply:os.system ['touch x']", "a: !!python/name:os.system"])
def test_yaml_tags_that_run_code_are_refused(text, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(CifarlabError, match="not valid YAML"):
        load_config(path)
