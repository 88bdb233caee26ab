"""``cifarlab serve`` in process (FastAPI's TestClient): predictions, metadata, auth, batching, and every bad input.

Each bad input must get its own 4xx JSON error, and the next good request must still be answered. The real
server (uvicorn, worker processes, Ctrl-C) is tested in tests/test_serve_server.py, the page in Chromium in
tests/test_serve_browser.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageFile

import cifarlab
from cifarlab.cli.main import main
from cifarlab.export import export_int8, export_run, run_test_images
from cifarlab.serve import ServeConfig, create_app
from cifarlab.serve.batching import Batcher


def encode(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(trained_run) -> list[np.ndarray]:
    """Eight of the run's test images as (32, 32, 3) uint8."""
    return list(run_test_images(trained_run, limit=8).permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope="module")
def client(trained_run):
    app = create_app(ServeConfig(model=str(trained_run), max_images=16, max_upload_mb=1.0))
    with TestClient(app) as c:
        yield c


def expected(trained_run, arrays, k=5):
    return [p.to_dict()["top_k"] for p in cifarlab.load(trained_run, device="cpu").predict(arrays, top_k=k)]


def assert_same_top_k(got, want):
    assert [t["label"] for t in got] == [t["label"] for t in want]
    np.testing.assert_allclose([t["prob"] for t in got], [t["prob"] for t in want], atol=1e-5)


def good_request(client, trained_run, image) -> None:
    """The request that must still succeed after a bad one."""
    r = client.post("/predict", content=encode(image), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert_same_top_k(r.json()["predictions"][0]["top_k"], expected(trained_run, [image])[0])


# --------------------------------------------------------------------------- good requests
def test_predict_matches_cifarlab_predict(client, trained_run, images):
    files = [("image", (f"img{i}.png", encode(im), "image/png")) for i, im in enumerate(images[:3])]
    files.append(("image", ("img3.jpg", encode(images[3], "JPEG", quality=95), "image/jpeg")))
    r = client.post("/predict?top_k=3", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "cnn" and body["format"] == "pytorch" and body["tta"] == "none" and body["tta_views"] == 1
    assert [p["image"] for p in body["predictions"]] == ["img0.png", "img1.png", "img2.png", "img3.jpg"]
    decoded_jpeg = np.asarray(Image.open(io.BytesIO(encode(images[3], "JPEG", quality=95))).convert("RGB"))
    want = expected(trained_run, images[:3] + [decoded_jpeg], k=3)
    for p, w in zip(body["predictions"], want):
        assert len(p["top_k"]) == 3
        assert_same_top_k(p["top_k"], w)

    # The raw body (any image/* or octet-stream), any size and mode: converted as cifarlab predict converts it.
    big = np.asarray(Image.fromarray(images[0]).resize((97, 61)).convert("RGBA"))
    r = client.post("/predict", content=encode(big), headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200
    assert_same_top_k(r.json()["predictions"][0]["top_k"], expected(trained_run, [big])[0])
    assert len(r.json()["predictions"][0]["top_k"]) == 5  # --top-k's default


def test_health_and_metadata(client, trained_run):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["auth"] is False and h["in_flight"] == 0
    m = client.get("/metadata").json()
    best = json.loads((trained_run / "best.json").read_text())
    metrics = json.loads((trained_run / "test_metrics.json").read_text())
    assert m["classes"] == best["classes"] and m["num_classes"] == 10 and m["model"] == "cnn"
    assert m["input"]["image_size"] == 32 and m["normalization"] == {"mean": best["mean"], "std": best["std"]}
    assert m["accuracy"]["test_acc"] == pytest.approx(metrics["test_acc"]) and m["accuracy"]["tta"] == "none"
    assert m["limits"] == {"max_images": 16, "max_upload_bytes": 1024 * 1024, "max_pixels": 25_000_000, "max_top_k": 10}
    assert m["tta"] == "none" and m["format"] == "pytorch"


def test_the_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert 'id="file"' in page and "/predict" in page and 'id="results"' in page
    # nothing fetched from elsewhere: it must work on a server without internet
    assert "http://" not in page and "https://" not in page and 'src="//' not in page


# --------------------------------------------------------------------------- bad input
def bomb() -> bytes:
    """64 megapixels of one colour: an 8 kB PNG that would take 192 MB as RGB."""
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 20_000
    return buf.getvalue()


def noise_png(side: int) -> bytes:
    return encode(np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8))


def truncated_jpeg() -> bytes:
    data = encode(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG", quality=90)
    return data[:len(data) // 2]


def chunks(data: bytes, n: int = 64 * 1024):
    for i in range(0, len(data), n):
        yield data[i:i + n]  # no Content-Length: the server must count while reading


BAD = {
    "not_an_image": (dict(content=b"this is a text file, not a picture\n" * 20, headers={"Content-Type": "image/png"}),
                     422, "not_an_image"),
    "pdf_in_multipart": (dict(files=[("image", ("doc.pdf", b"%PDF-1.4\n%\xe2\xe3\n1 0 obj\n", "application/pdf"))]),
                         422, "not_an_image"),
    "postscript_refused_unread": (dict(content=b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n",
                                       headers={"Content-Type": "image/x-eps"}), 422, "not_an_image"),
    "truncated_image": (dict(content=truncated_jpeg(), headers={"Content-Type": "image/jpeg"}), 422,
                        "truncated_image"),
    "png_cut_in_its_header": (dict(content=noise_png(8)[:20], headers={"Content-Type": "image/png"}), 422,
                              "bad_image"),
    "decompression_bomb": (dict(content=bomb(), headers={"Content-Type": "image/png"}), 422, "too_many_pixels"),
    "upload_over_the_limit": (dict(content=noise_png(700), headers={"Content-Type": "image/png"}), 413,
                              "upload_too_large"),
    "upload_over_the_limit_chunked": (dict(content=chunks(noise_png(700)), headers={"Content-Type": "image/png"}),
                                      413, "upload_too_large"),
    "wrong_content_type": (dict(content=b'{"image": "cat.png"}', headers={"Content-Type": "application/json"}), 415,
                           "unsupported_media_type"),
    "form_urlencoded": (dict(content=b"image=cat.png", headers={"Content-Type": "application/x-www-form-urlencoded"}),
                        415, "unsupported_media_type"),
    "empty_body": (dict(content=b"", headers={"Content-Type": "image/png"}), 400, "empty_body"),
    "empty_file_part": (dict(files=[("image", ("empty.png", b"", "image/png"))]), 400, "empty_image"),
    "no_file_parts": (dict(content=b'--zzz\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--zzz--\r\n',
                           headers={"Content-Type": "multipart/form-data; boundary=zzz"}), 400, "no_images"),
    "malformed_multipart": (dict(content=b"--zzz\r\nnot a part", headers={
        "Content-Type": "multipart/form-data; boundary=zzz"}), 400, "bad_multipart"),
    "too_many_images": (dict(files=[("image", (f"{i}.png", b"\x89PNG", "image/png")) for i in range(100)]), 413,
                        "too_many_images"),
    "top_k_out_of_range": (dict(params={"top_k": 11}, content=noise_png(8), headers={"Content-Type": "image/png"}),
                           422, "bad_parameter"),
    "top_k_not_a_number": (dict(params={"top_k": "all"}, content=noise_png(8), headers={"Content-Type": "image/png"}),
                           422, "bad_parameter"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_clear_4xx_and_the_next_request_succeeds(case, client, trained_run, images, monkeypatch):
    kwargs, status, code = BAD[case]
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    pid = client.get("/health").json()["pid"]
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (code is None or err["code"] == code) and err["message"] and "\n" not in err["message"]
    if case == "decompression_bomb":
        assert decoded == [], "the bomb was decoded"  # refused from its header
        assert "8000 x 8000 = 64,000,000 pixels" in err["message"] and "--max-pixels" in err["message"]
    if case.startswith("upload_over"):
        assert "--max-upload-mb" in err["message"]
    if case == "too_many_images":
        assert "--max-images" in err["message"]
    good_request(client, trained_run, images[5])
    if case == "decompression_bomb":
        assert decoded, "the spy on decoding saw nothing"  # so decoded == [] above means something
    assert client.get("/health").json()["pid"] == pid


def test_the_pixel_limit_is_the_servers(trained_run, images):
    app = create_app(ServeConfig(model=str(trained_run), max_pixels=32 * 32))
    with TestClient(app) as c:
        assert c.post("/predict", content=encode(images[0]), headers={"Content-Type": "image/png"}).status_code == 200
        r = c.post("/predict", content=noise_png(33), headers={"Content-Type": "image/png"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_pixels"


def test_unknown_routes_and_methods_are_json(client):
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/predict")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# --------------------------------------------------------------------------- token
def test_token_is_required_on_predict_and_metadata_not_health(trained_run, images):
    app = create_app(ServeConfig(model=str(trained_run), token="s3cret-token"))
    png = encode(images[0])
    with TestClient(app) as c:
        assert c.get("/health").json()["auth"] is True
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic s3cret-token"}):
            r = c.post("/predict", content=png, headers={"Content-Type": "image/png", **headers})
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            assert c.get("/metadata", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret-token"}
        assert c.post("/predict", content=png, headers={"Content-Type": "image/png", **ok}).status_code == 200
        assert c.get("/metadata", headers=ok).status_code == 200
        assert c.get("/").status_code == 200  # the page itself holds no data; it asks for the token


# --------------------------------------------------------------------------- batching
def test_batcher_groups_concurrent_requests():
    calls = []

    def fn(x):
        calls.append(len(x))
        return x.reshape(len(x), -1)[:, :2].astype(np.float32)

    def image(v, n=1):
        return np.full((n, 2, 2, 3), v, np.uint8)

    async def scenario(max_batch, sizes):
        b = Batcher(fn, max_batch=max_batch, max_wait_ms=600_000)  # only a full batch (or a flush) ends the wait
        await b.start()
        outs = await asyncio.gather(*[b.submit(image(i, n)) for i, n in enumerate(sizes)])
        await b.stop()
        for i, (n, out) in enumerate(zip(sizes, outs)):  # each request gets its own rows back
            assert out.shape == (n, 2) and (out == i).all()
        return b.stats

    s = asyncio.run(scenario(4, [1, 1, 1, 1]))
    assert calls == [4] and s.batches == 1 and s.requests == 4
    calls.clear()
    s = asyncio.run(scenario(1, [1, 1, 1]))  # batching off: one request per forward pass
    assert calls == [1, 1, 1] and s.batches == 3
    calls.clear()
    # In arrival order, never over max_batch, except a request larger than it, which runs alone.
    s = asyncio.run(scenario(4, [3, 2, 6, 1, 3]))
    assert calls == [3, 2, 6, 4] and s.requests == 5
    calls.clear()

    async def flushed():  # a batch that cannot fill is run at once after flush (what Ctrl-C does)
        b = Batcher(fn, max_batch=64, max_wait_ms=600_000)
        await b.start()
        task = asyncio.create_task(b.submit(image(7, 2)))
        await asyncio.sleep(0)
        b.flush()
        out = await asyncio.wait_for(task, 60)
        await b.stop()
        return out

    assert (asyncio.run(flushed()) == 7).all() and calls == [2]


def test_batcher_survives_a_failing_batch():
    def fn(x):
        if (x == 13).any():
            raise RuntimeError("boom")
        return np.zeros((len(x), 2), np.float32)

    async def scenario():
        b = Batcher(fn, max_batch=2, max_wait_ms=600_000)
        await b.start()
        res = await asyncio.gather(b.submit(np.full((1, 2, 2, 3), 13, np.uint8)),
                                   b.submit(np.zeros((1, 2, 2, 3), np.uint8)), return_exceptions=True)
        after = await asyncio.gather(b.submit(np.zeros((1, 2, 2, 3), np.uint8)),
                                     b.submit(np.zeros((1, 2, 2, 3), np.uint8)))
        await b.stop()
        return res, after

    res, after = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) for r in res)  # the batch's requests get the error
    assert all(a.shape == (1, 2) for a in after)  # and the batcher lives on


@pytest.mark.parametrize("max_batch, batches", [(8, 1), (1, 8)])
def test_concurrent_http_requests_share_a_forward_pass(trained_run, images, max_batch, batches):
    app = create_app(ServeConfig(model=str(trained_run), max_batch=max_batch, max_wait_ms=600_000))

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                rs = await asyncio.gather(*[c.post("/predict", content=encode(im), headers={
                    "Content-Type": "image/png"}) for im in images])
                return rs, (await c.get("/health")).json()

    rs, health = asyncio.run(scenario())
    want = expected(trained_run, images)
    for r, w in zip(rs, want):
        assert r.status_code == 200
        assert_same_top_k(r.json()["predictions"][0]["top_k"], w)
    assert health["batches"] == batches and health["images"] == 8 and health["largest_batch"] == 8 // batches


# --------------------------------------------------------------------------- ONNX files
def test_serving_the_int8_export(trained_run, tmp_path, images):
    fp32 = export_run(trained_run, "onnx", tmp_path)
    int8, rec = export_int8(trained_run, fp32, calibration=128)
    png = [("image", (f"{i}.png", encode(im), "image/png")) for i, im in enumerate(images)]
    with TestClient(create_app(ServeConfig(model=str(int8)))) as c8, \
            TestClient(create_app(ServeConfig(model=str(fp32)))) as c32:
        m = c8.get("/metadata").json()
        assert m["format"] == "onnx-int8" and m["tta"] == "none" and m["file"] == "model.int8.onnx"
        assert m["accuracy"]["test_acc"] == pytest.approx(rec["int8"]) and m["accuracy"]["images"] == 200
        assert c32.get("/metadata").json()["accuracy"]["test_acc"] == pytest.approx(rec["fp32"])
        p8 = c8.post("/predict", files=png).json()["predictions"]
        p32 = c32.post("/predict", files=png).json()["predictions"]
    # fp32 ONNX is the PyTorch model; int8 keeps its decisions on (nearly) every image
    for p, w in zip(p32, expected(trained_run, images)):
        assert_same_top_k(p["top_k"], w)
    agree = np.mean([a["top_k"][0]["label"] == b["top_k"][0]["label"] for a, b in zip(p8, p32)])
    assert agree >= 0.75


def test_onnx_with_tta_averages_the_views_in_the_server(trained_run, tmp_path, images):
    import onnxruntime as ort

    fp32 = export_run(trained_run, "onnx", tmp_path)
    with TestClient(create_app(ServeConfig(model=str(fp32), tta="flip"))) as c:
        body = c.post("/predict?top_k=10", content=encode(images[0]), headers={"Content-Type": "image/png"}).json()
    assert body["tta"] == "flip" and body["tta_views"] == 2
    sess = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    x = images[0].transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    logits = (sess.run(["logits"], {"image": x})[0] + sess.run(["logits"], {"image": x[..., ::-1].copy()})[0]) / 2
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    got = {t["label"]: t["prob"] for t in body["predictions"][0]["top_k"]}
    classes = json.loads((trained_run / "best.json").read_text())["classes"]
    np.testing.assert_allclose([got[c] for c in classes], probs[0], atol=1e-5)


def test_an_onnx_server_does_not_import_pytorch(trained_run, tmp_path, images):
    """500 MB of resident memory per worker that an ONNX server does not need (with TTA it does: evaluate's code)."""
    import subprocess
    import sys

    fp32 = export_run(trained_run, "onnx", tmp_path)
    (tmp_path / "a.png").write_bytes(encode(images[0]))
    code = f"""
import sys
from fastapi.testclient import TestClient
from cifarlab.serve import ServeConfig, create_app
image = open({str(tmp_path / "a.png")!r}, "rb").read()
with TestClient(create_app(ServeConfig(model={str(fp32)!r}))) as c:
    r = c.post("/predict", content=image, headers={{"Content-Type": "image/png"}})
    assert r.status_code == 200, r.text
    print(r.json()["predictions"][0]["top_k"][0]["label"], "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [expected(trained_run, [images[0]])[0][0]["label"], "False"]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "PA", "1", "I;16", "I", "F", "CMYK", "YCbCr"])
def test_the_servers_conversion_is_predicts(mode):
    """The server converts with the very function the training folders and predict use (cifarlab.pixels, which
    imports no PyTorch), and every image mode comes out (size, size, 3) uint8 RGB."""
    from cifarlab.data.folder import to_rgb_array as reference
    from cifarlab.pixels import to_rgb_array
    from cifarlab.serve import inputs

    assert inputs.to_rgb_array is to_rgb_array is reference

    rng = np.random.default_rng(3)
    base = Image.fromarray(rng.integers(0, 256, (45, 37, 4), dtype=np.uint8), "RGBA")
    im = base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE) if mode in ("P", "PA") else base
    if mode == "PA":
        im = im.convert("PA")
    elif mode != "P":
        im = im.convert(mode)
    if mode == "P":
        im.info["transparency"] = 3
    for size in (32, 45):
        out = to_rgb_array(im.copy(), size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        if mode == "RGB":  # Pillow's bicubic resize, nothing else
            np.testing.assert_array_equal(out, np.asarray(im.resize((size, size), Image.Resampling.BICUBIC)))
    if mode == "RGBA":  # transparency composited on black: a fully transparent image is zeros
        clear = np.asarray(im).copy()
        clear[..., 3] = 0
        assert not to_rgb_array(Image.fromarray(clear, "RGBA"), 32).any()


# --------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("args, message", [
    (["serve", "{tmp}/missing"], "not found"),
    (["serve", "{run}", "--max-batch", "0"], "--max-batch must be >= 1"),
    (["serve", "{run}", "--token", "short"], "--token must be at least 8 characters"),
    (["serve", "{tmp}/notes.txt"], "serve takes a run directory, an exported .onnx or an exported .safetensors"),
    (["serve", "{tmp}/fake.onnx"], "cannot load"),
])
def test_serve_cli_errors_are_one_line(trained_run, tmp_path, capsys, args, message):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "fake.onnx").write_bytes(b"not onnx")
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path, run=trained_run) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_missing_serve_extra_names_it(trained_run, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        main(["serve", str(trained_run)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "pip install 'cifarlab[serve]'" in err and len(err.strip().splitlines()) == 1
