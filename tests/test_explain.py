"""Grad-CAM (cifarlab.evaluation.explain): the heatmap peaks where the class is decided, on synthetic tasks whose
deciding place is known; Captum and the hooks agree; no gradient leaks into the parameters; every registered
model is explained; ``cifarlab predict --explain DIR`` end to end; the report's grid and the audit's gallery.

The synthetic models train for a fixed number of seeded steps (never for a time), so a slow machine only waits
longer. 32x32 images, noise in [0, 0.5) everywhere, an 8x8 patch at 1.0:

* the CNN task: class 0 has the patch top-left, class 1 bottom-right;
* the ViT task: both corners always hold a red or blue patch; the top-left one's colour is the class, the
  bottom-right one's is random (a distractor). On the CNN task the ViT (2 blocks, 150 steps) separates the
  classes but its token Grad-CAM, its gradient norms and its attention rollout all peaked in the *other* corner
  (0 of 40 images in the patch): in a two-corner task the empty corner decides the class as well as the full
  one. The distractor takes that shortcut away.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from cifarlab.cli.main import main
from cifarlab.evaluation import explain as E
from cifarlab.evaluation.explain import ExplainError, gradcam, heatmaps, overlay, side_by_side
from cifarlab.models import create_model, list_models, registry
from cifarlab.models.spec import ModelSpec
from cifarlab.train.checkpoint import save_weights

S, P = 32, 8  # image side, patch side
PEAK_IN_PATCH_CNN = 38  # of 40 test images (observed: 40)


def corner_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: bright patch top-left; class 1: bottom-right. Normalized (B, 3, S, S), labels (B,)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.rand(n, 3, S, S, generator=g) * 0.5
    for i in range(n):
        r = 0 if y[i] == 0 else S - P
        x[i, :, r:r + P, r:r + P] = 1.0
    return (x - 0.25) / 0.3, y


def colour_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-left patch red (class 0) or blue (class 1); a red or blue patch at random bottom-right."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.rand(n, 3, S, S, generator=g) * 0.5
    other = torch.randint(0, 2, (n,), generator=g)
    for i in range(n):
        x[i, :, :P, :P] = 0
        x[i, 0 if y[i] == 0 else 2, :P, :P] = 1.0
        x[i, :, S - P:, S - P:] = 0
        x[i, 0 if other[i] == 0 else 2, S - P:, S - P:] = 1.0
    return (x - 0.25) / 0.3, y


def train(model: nn.Module, task, steps: int, lr: float) -> nn.Module:
    torch.manual_seed(0)
    x, y = task(512, 0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def patch_cnn() -> nn.Module:
    torch.manual_seed(0)
    return train(create_model("cnn", 2, widths=[8, 16, 32], hidden=32, dropout=0.0), corner_task, 60, 3e-3)


def tiny_vit(num_classes: int = 2) -> nn.Module:
    return create_model("vit", num_classes, embed_dim=32, num_encoder_layers=2, num_heads=2, head_dim=16,
                        hidden_layer_depth=64, mlp_head_hidden_layer_depth=32, dropout=0.0)


def peaks(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = maps.flatten(1).argmax(1)
    return flat // S, flat % S


# ----------------------------------------------------------------------------- the heatmap finds the patch
def test_cnn_heatmap_peaks_on_the_deciding_patch(patch_cnn):
    x, y = corner_task(40, 123)
    with torch.no_grad():
        assert (patch_cnn(x).argmax(1) == y).all()  # the model learned the task
    maps, classes = gradcam(patch_cnn, x)
    assert maps.shape == (40, S, S) and torch.equal(classes, y)
    r, c = peaks(maps)
    corner = (y * (S - P))  # the patch's first row and column
    inside = (r >= corner) & (r < corner + P) & (c >= corner) & (c < corner + P)
    assert int(inside.sum()) >= PEAK_IN_PATCH_CNN, (r.tolist(), c.tolist())
    # Explaining the other class, the patch is no longer where the evidence lies.
    other, _ = gradcam(patch_cnn, x, 1 - y)
    patch = torch.zeros(40, S, S, dtype=torch.bool)
    for i in range(40):
        patch[i, corner[i]:corner[i] + P, corner[i]:corner[i] + P] = True
    assert float(other[patch].mean()) < 0.5 * float(maps[patch].mean())


def test_vit_token_heatmap_is_gradcam_over_the_patch_token_grid():
    """A ViT's map is Grad-CAM over its patch tokens entering the last block (the class token dropped, the N
    tokens on their sqrt(N) x sqrt(N) grid, row by row), computed here directly from a hook. Where a trained
    ViT's token map lands is not asserted: a tiny ViT that learned colour_task perfectly peaked on the deciding
    patch in 31 of 40 images on one machine and in 0 on another (over four training seeds, 0 to 22; gradient x
    activation did no better), so it depends on how training routed the evidence, not on this code."""
    torch.manual_seed(0)
    vit = train(tiny_vit(), colour_task, 20, 1e-3)
    x, y = colour_task(8, 123)
    maps, classes = gradcam(vit, x, y)
    assert E.explain_layer(vit, x) == ("tokens", "blocks.1.norm1") and torch.equal(classes, y)
    saved: list[torch.Tensor] = []
    handle = vit.blocks[1].norm1.register_forward_hook(lambda m, args, out: saved.append(out))
    logits = vit(x)
    handle.remove()
    (g,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), saved[0])
    a, g = saved[0].detach()[:, 1:], g[:, 1:]  # (B, N, D): the class token first, dropped
    n = math.isqrt(a.shape[1])
    cam = F.relu((g.mean(1, keepdim=True) * a).sum(-1)).reshape(len(x), 1, n, n)  # (B, 1, n, n), row-major
    want = F.interpolate(cam, size=(S, S), mode="bilinear", align_corners=False)[:, 0]
    want = want / want.amax(dim=(1, 2), keepdim=True)
    assert n * n == a.shape[1] and n > 1 and bool((want.amax(dim=(1, 2)) > 0).all())
    torch.testing.assert_close(maps, want)
    assert not torch.allclose(maps, want.flip(-1))  # the grid's orientation is checked, not only its values


# ----------------------------------------------------------------------------- Captum and the hooks
@pytest.mark.parametrize("name, kw", [("cnn", dict(widths=[8, 16, 32], hidden=32)), ("resnet18", {}),
                                      ("resnet18", dict(cifar_stem=True)), ("speednet", {}), ("timm/resnet18", {})])
def test_captum_agrees_with_the_hooks(name, kw):
    pytest.importorskip("captum")  # in the test extra: a skip fails under CI=true
    torch.manual_seed(0)
    model = create_model(name, 10, **kw).eval()
    x = torch.randn(4, 3, S, S)
    target = torch.tensor([0, 3, 5, 9])
    ours, _ = gradcam(model, x, target, backend="torch")
    theirs, _ = gradcam(model, x, target, backend="captum")
    assert ours.shape == theirs.shape == (4, S, S)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert float(ours.amax()) == pytest.approx(1.0)


def test_without_captum_the_hooks_serve_and_captum_is_named(patch_cnn, monkeypatch):
    x, _ = corner_task(4, 7)
    want, _ = gradcam(patch_cnn, x, backend="torch")
    monkeypatch.setattr(E, "_have_captum", lambda: False)
    got, _ = gradcam(patch_cnn, x)  # auto: the hooks
    torch.testing.assert_close(got, want)
    with pytest.raises(ExplainError, match=r"pip install 'cifarlab\[explain\]'") as e:
        gradcam(patch_cnn, x, backend="captum")
    assert "\n" not in str(e.value)


def test_captum_is_used_when_installed(patch_cnn, monkeypatch):
    pytest.importorskip("captum")
    calls = []
    real = E._captum_cam
    monkeypatch.setattr(E, "_captum_cam", lambda *a: calls.append(1) or real(*a))
    gradcam(patch_cnn, corner_task(2, 7)[0])
    assert calls


# ----------------------------------------------------------------------------- the model is left as it was
def test_no_gradient_reaches_the_parameters_and_modes_are_kept(patch_cnn):
    model = create_model("cnn", 2, widths=[8, 16, 32], hidden=32, dropout=0.0)
    model.load_state_dict(patch_cnn.state_dict())
    x, _ = corner_task(6, 9)
    want, _ = gradcam(model.eval(), x, backend="torch")
    assert all(p.grad is None for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm's running stats must not move
    for backend in ("torch", "auto"):
        got, _ = gradcam(model, x, backend=backend)
        torch.testing.assert_close(got, want)  # explained in eval mode although the model was training
    assert model.training
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # Under inference_mode (as evaluation code runs), channels-last, from a no_grad block: the same maps.
    model.eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        got, _ = gradcam(model, x.contiguous(memory_format=torch.channels_last), backend="torch")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list_models() + ["timm/resnet18", "timm/vit_tiny_patch16_224"])
def test_every_model_is_explained(name):
    kw = {"timm/vit_tiny_patch16_224": dict(img_size=S, patch_size=4)}.get(name, {})
    torch.manual_seed(0)
    model = create_model(name, 10, **kw).eval()
    x = torch.randn(2, 3, S, S)
    kind, layer = E.explain_layer(model, x)
    assert kind == ("tokens" if "vit" in name else "conv")
    maps, classes = gradcam(model, x)
    assert maps.shape == (2, S, S) and maps.dtype == torch.float32 and classes.shape == (2,)
    assert float(maps.min()) >= 0
    for m in maps:  # each map is scaled to its maximum, or all zeros where nothing speaks for the class
        assert float(m.max()) == pytest.approx(1.0) or float(m.max()) == 0.0


class _MLP(nn.Module):
    def __init__(self, num_classes: int, image_size: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, 16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.net(x))


def tiny_mlp(num_classes: int = 10, *, image_size: int = 32) -> nn.Module:
    return _MLP(num_classes, image_size)


@pytest.fixture
def mlp_registered(monkeypatch):
    """A model with no convolution and no attention, registered for this test only."""
    monkeypatch.setitem(registry._REGISTRY, "tiny_mlp", tiny_mlp)
    monkeypatch.setitem(registry._SPECS, "tiny_mlp", ModelSpec("tiny_mlp", "head"))
    return "tiny_mlp"


def test_a_model_with_nothing_to_explain_is_refused(mlp_registered, monkeypatch):
    model = create_model(mlp_registered, 10)
    with pytest.raises(ExplainError, match="'tiny_mlp' has no layer to explain") as e:
        gradcam(model, torch.randn(1, 3, S, S))
    assert "\n" not in str(e.value)
    # A conv net whose spec declares nothing to explain is refused too.
    monkeypatch.setitem(registry._SPECS, "cnn", replace(registry._SPECS["cnn"], explain=""))
    with pytest.raises(ExplainError, match="'cnn' has no layer to explain"):
        gradcam(create_model("cnn", 10), torch.randn(1, 3, S, S))


def test_overlay_and_side_by_side():
    img = np.zeros((S, S, 3), np.uint8)
    img[:, :, 1] = 200
    heat = np.zeros((S, S), np.float32)
    heat[:P, :P] = 1.0
    out = overlay(img, heat)
    assert out.shape == (S, S, 3) and out.dtype == np.uint8
    assert not np.array_equal(out[0, 0], out[S - 1, S - 1])  # hot corner and cold corner differ
    big = overlay(img, heat[:4, :4] * 0 + 1, size=96)
    assert big.shape == (96, 96, 3)
    pair = side_by_side(img, heat, size=64, gap=4)
    assert pair.shape == (64, 132, 3)
    assert np.array_equal(pair[:, 64:68], np.full((64, 4, 3), 255, np.uint8))
    assert np.array_equal(pair[:, :64], np.asarray(Image.fromarray(img).resize((64, 64), Image.Resampling.NEAREST)))


def test_heatmaps_of_uint8_images_through_normalize(patch_cnn):
    from cifarlab.data.loader import Normalize

    x, y = corner_task(5, 11)
    mean, std = [0.25] * 3, [0.3] * 3
    u8 = ((x * 0.3 + 0.25) * 255).round().clamp(0, 255).to(torch.uint8)
    maps, classes = heatmaps(patch_cnn, u8, Normalize(mean, std), list(y), batch_size=2)
    want, _ = gradcam(patch_cnn, Normalize(mean, std)(u8), y)
    assert maps.shape == (5, S, S) and np.array_equal(classes, y.numpy())
    np.testing.assert_allclose(maps, want.numpy(), atol=1e-6)


# ----------------------------------------------------------------------------- predict --explain
def test_predict_explain_writes_one_overlay_per_image(trained_run, small_folder, tmp_path, capsys):
    one = sorted((small_folder / "test" / "cat").iterdir())[0]
    folder = small_folder / "test" / "ship"
    n_folder = len(list(folder.iterdir()))
    out = tmp_path / "why"
    with pytest.raises(SystemExit) as e:
        main(["predict", str(trained_run), str(one), str(folder), "--format", "json", "--explain", str(out)])
    assert e.value.code == 0
    cap = capsys.readouterr()
    preds = json.loads(cap.out)  # the predictions are printed as without --explain
    assert len(preds) == 1 + n_folder
    assert f"{1 + n_folder} Grad-CAM overlays" in cap.err
    files = sorted(out.iterdir())
    assert len(files) == 1 + n_folder
    # Named after the inputs; the cat's 0000.jpg and the ship folder's 0000.jpg keep their folders' names.
    assert (out / f"cat_{one.stem}.png").is_file() and (out / f"ship_{one.stem}.png").is_file()
    assert (out / f"{sorted(folder.iterdir())[-1].stem}.png").is_file()  # a name no other input has: as it is
    with Image.open(out / f"cat_{one.stem}.png") as im:
        assert im.size == (2 * 128 + 4, 128) and im.mode == "RGB"
        assert im.text["image"] == str(one) and im.text["explained"] == preds[0]["top_k"][0]["label"]
        pixels = np.asarray(im)
    assert pixels[:, 128:132].min() == 255 and pixels[:, 132:].std() > 0


def test_overlay_names_take_folders_only_where_file_names_repeat():
    from cifarlab.predict import overlay_names

    assert overlay_names(["/p/cat/1.jpg", "/p/dog/1.jpg", "/p/dog/2.jpg", "image[3]"]) == \
        ["cat_1.png", "dog_1.png", "2.png", "image[3].png"]
    assert overlay_names(["a/x/1.jpg", "b/x/1.jpg", "1.png", "a/x/1.jpg"]) == \
        ["a_x_1.png", "b_x_1.png", "1.png", "a_x_1-2.png"]  # deeper where needed; the same file twice: -2
    assert overlay_names(["/d/my photo.jpg"]) == ["my_photo.png"]


def test_predict_explain_on_a_model_with_nothing_to_explain_exits_2(mlp_registered, tmp_path, capsys):
    model = create_model(mlp_registered, 2)
    weights = tmp_path / "mlp.safetensors"
    save_weights(weights, model, {"model": mlp_registered, "num_classes": 2, "classes": ["a", "b"],
                                  "image_size": S, "mean": [0.5] * 3, "std": [0.25] * 3})
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(img)
    with pytest.raises(SystemExit) as e:
        main(["predict", str(weights), str(img), "--explain", str(tmp_path / "why")])
    cap = capsys.readouterr()
    assert e.value.code == 2
    assert cap.out == ""  # refused before any prediction is printed
    assert len(cap.err.strip().splitlines()) == 1 and "no layer to explain" in cap.err
    assert not (tmp_path / "why").exists()
    # Without --explain the same model predicts.
    with pytest.raises(SystemExit) as e:
        main(["predict", str(weights), str(img)])
    assert e.value.code == 0


# ----------------------------------------------------------------------------- the report and the audit
def test_report_grid_shows_heatmaps(trained_run, tmp_path):
    from cifarlab.report import make_report
    from cifarlab.report.runs import load_run
    from cifarlab.report.single import WRONG_GRID, load_test_images, wrong_heatmaps

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    make_report(run)
    m = json.loads((run / "report" / "metrics.json").read_text())
    assert m["warnings"] == [] and "confidently_wrong.png" in m["figures"]
    page = (run / "report" / "report.html").read_text()
    assert "Grad-CAM heatmap for the predicted (wrong) class" in page
    # The overlays are the maps of the predicted classes over the images, by the run's best weights.
    images, _ = load_test_images(load_run(run))
    wrong = m["most_confidently_wrong"][:3]
    idx = [w["index"] for w in wrong]
    classes = json.loads((run / "best.json").read_text())["classes"]
    over, why = wrong_heatmaps(load_run(run), images[idx], [classes.index(w["predicted"]) for w in wrong])
    assert why is None and over.shape == images[idx].shape and over.dtype == np.uint8
    assert len(m["most_confidently_wrong"]) <= WRONG_GRID
    # Without weights the grid stays, without heatmaps, and a warning says why.
    (run / "best.safetensors").unlink()
    make_report(run)
    m = json.loads((run / "report" / "metrics.json").read_text())
    assert "confidently_wrong.png" in m["figures"] and any("heatmaps" in w for w in m["warnings"])


def test_audit_gallery_has_the_run_models_heatmaps(trained_run, tmp_path):
    from cifarlab.audit.run import audit_run

    summary = audit_run(trained_run, tmp_path / "audit")
    page = (tmp_path / "audit" / "audit.html").read_text()
    assert summary["label_issues"] > 0
    shown = min(60, summary["label_issues"])
    assert page.count('class="heat"') == shown
    assert page.count('alt="Grad-CAM: ') == shown


def test_fold_audits_explain_each_image_by_the_fold_that_held_it_out(tmp_path):
    from cifarlab.audit.folds import assign_folds
    from cifarlab.report.audit import fold_models

    y = np.repeat(np.arange(3), 8)
    model_of = fold_models(tmp_path, y, 4, seed=5)
    fold_of = assign_folds(y, 4, 5)
    assert [model_of(i) for i in range(len(y))] == [tmp_path / f"fold-{k}" for k in fold_of]
    assert model_of(len(y)) == model_of(len(y) + 7) == tmp_path / "fold-0"  # validation and test images


def test_audit_heatmaps_skip_a_fold_whose_weights_are_elsewhere(trained_run, tmp_path, capsys):
    from cifarlab.report.audit import model_heatmaps

    images = np.random.default_rng(0).integers(0, 256, (4, S, S, 3), dtype=np.uint8)
    maps = model_heatmaps(lambda i: trained_run if i < 2 else tmp_path / "fold-3", lambda i: images[i],
                          [0, 1, 2, 3], [0, 1, 2, 3])
    assert [m is None for m in maps] == [False, False, True, True]  # another machine trained fold 3
    assert maps[0].shape == (S, S) and 0 <= maps[0].min() and maps[0].max() <= 1
    assert "no heatmaps from" in capsys.readouterr().err
