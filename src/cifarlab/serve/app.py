"""The prediction service: a FastAPI app around one model, with dynamic batching and strict input checks.

Routes:

* ``POST /predict``: one or more images, as ``multipart/form-data`` (each file part is an image) or as the raw
  body (``Content-Type: image/*`` or ``application/octet-stream``); ``?top_k=K``. Returns the top-k classes
  and probabilities of each image, with the model and the test-time augmentation used.
* ``GET /health``: liveness and counters (requests in flight, batches); never needs the token, so that load
  balancers can probe it.
* ``GET /metadata``: classes, input size, normalization, model, measured accuracy, the server's limits.
* ``GET /``: a page to drop an image on and see its top classes as bars.

A client's mistake is a 4xx with ``{"error": {"code": ..., "message": ...}}``; the body is read in chunks and
refused as soon as it passes ``max_upload_mb``, images are refused from their header before decoding when they
have more than ``max_pixels`` pixels, and decoding runs in threads (at most ``decode_threads`` at a time, which
bounds the memory that decoded images can take).
"""


import asyncio
import json
import os
import secrets
import signal
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import CifarlabError
from .inputs import InputError, decode
from .model import TTA_CHOICES, default_threads

ENV = "CIFARLAB_SERVE_CONFIG"  # the config, as JSON, for worker processes (uvicorn's app factory)
RAW_TYPES = ("application/octet-stream",)  # and image/*


@dataclass
class ServeConfig:
    """Everything ``cifarlab serve`` takes; :meth:`validate` names the first bad value."""

    model: str  # a run directory, an exported .safetensors or an exported .onnx
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    threads: int | None = None  # intra-op threads per worker (default: cores / workers)
    device: str = "cpu"  # PyTorch models only
    tta: str | None = None  # default: the run's evaluate TTA (PyTorch), none (ONNX)
    max_batch: int = 32  # images per forward pass; 1 turns batching off
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_images: int = 32  # images in one request
    max_upload_mb: float = 10.0  # request body, MiB
    max_pixels: int = 25_000_000  # per image, from its header (a 24-megapixel camera photo passes)
    top_k: int = 5  # default for ?top_k
    decode_threads: int = 0  # images decoded at once (0: the number of cores)
    token: str | None = None  # required as "Authorization: Bearer TOKEN" on /predict and /metadata

    def validate(self) -> "ServeConfig":
        checks = [(self.workers >= 1, "--workers must be >= 1"), (self.max_batch >= 1, "--max-batch must be >= 1"),
                  (self.max_wait_ms >= 0, "--max-wait-ms must be >= 0"),
                  (self.max_images >= 1, "--max-images must be >= 1"),
                  (self.max_upload_mb > 0, "--max-upload-mb must be > 0"),
                  (self.max_pixels >= 1, "--max-pixels must be >= 1"), (self.top_k >= 1, "--top-k must be >= 1"),
                  (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
                  (self.decode_threads >= 0, "--decode-threads must be >= 0"),
                  (0 <= self.port <= 65535, "--port must be in 0..65535"),
                  (self.tta is None or self.tta in TTA_CHOICES, f"--tta must be one of {', '.join(TTA_CHOICES)}"),
                  (self.token is None or len(self.token) >= 8, "--token must be at least 8 characters")]
        for ok, msg in checks:
            if not ok:
                raise CifarlabError(msg)
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def limits(self) -> dict:
        return {"max_images": self.max_images, "max_upload_bytes": self.max_upload_bytes,
                "max_pixels": self.max_pixels}


def require_serve() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise CifarlabError(f"cifarlab serve needs {', '.join(missing)}: pip install 'cifarlab[serve]'")


def create_app(cfg: ServeConfig, backend=None):
    """The ASGI app; loads the model unless ``backend`` (a :class:`~cifarlab.serve.model.Backend`) is given."""
    require_serve()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .batching import Batcher
    from .model import load_backend

    cfg.validate()
    if backend is None:
        backend = load_backend(cfg.model, cfg.tta, cfg.threads or default_threads(cfg.workers), cfg.device)
    batcher = Batcher(backend.logits, cfg.max_batch, cfg.max_wait_ms)
    decoders = asyncio.Semaphore(cfg.decode_threads or os.cpu_count() or 1)
    state = {"in_flight": 0, "started": time.time()}
    info = {**backend.describe(), "limits": {**cfg.limits(), "max_top_k": len(backend.classes)},
            "batching": {"max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms}, "top_k": cfg.top_k}

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        restore = _flush_on_signal(batcher)
        try:
            yield
        finally:  # uvicorn runs this after the requests in flight are answered
            restore()
            await batcher.stop()

    app = FastAPI(title="cifarlab", version=_version(), lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.batcher, app.state.backend, app.state.config = batcher, backend, cfg

    def error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)

    @app.exception_handler(InputError)
    async def _input_error(request, exc: InputError):
        return error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):  # 404, 405, ...: the same JSON shape as every other error
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, "bad_parameter", f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):  # a bug, not the client's fault: say so without the traceback
        return error(500, "internal_error", f"{type(exc).__name__} while serving the request")

    def authorize(request: Request) -> None:
        if cfg.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), cfg.token.encode()):
            raise InputError(401, "unauthorized", "this server needs the header 'Authorization: Bearer TOKEN' "
                             "(cifarlab serve --token)", {"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "pid": os.getpid(), "in_flight": state["in_flight"], "auth": cfg.token is not None,
                "uptime_s": round(time.time() - state["started"], 3), **batcher.stats.to_dict()}

    @app.get("/metadata")
    async def metadata(request: Request):
        authorize(request)
        return info

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_page())

    @app.post("/predict")
    async def predict(request: Request, top_k: int | None = None):
        authorize(request)
        k = cfg.top_k if top_k is None else top_k
        if not 1 <= k <= len(backend.classes):
            raise InputError(422, "bad_parameter", f"top_k must be in 1..{len(backend.classes)}, got {k}")
        state["in_flight"] += 1
        try:
            files = await _read_images(request, cfg)
            async with decoders:
                arrays = await asyncio.to_thread(
                    lambda: [decode(data, backend.image_size, cfg.max_pixels, name) for name, data in files])
            logits = await batcher.submit(np.stack(arrays))
        finally:
            state["in_flight"] -= 1
        probs = _softmax(logits)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return {"model": backend.meta.get("model"), "format": backend.kind, "tta": backend.tta,
                "tta_views": info["tta_views"],
                "predictions": [{"image": name, "top_k": [{"label": backend.classes[j], "prob": float(probs[i, j])}
                                                          for j in top[i]]} for i, (name, _) in enumerate(files)]}

    return app


async def _read_body(request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is larger than ``limit`` bytes: before reading when Content-Length
    says so, else while the chunks arrive."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise InputError(413, "upload_too_large", f"the request body is {int(declared):,} bytes, over this "
                                 f"server's limit of {limit:,} (--max-upload-mb)")
        except ValueError:
            raise InputError(400, "bad_request", f"Content-Length is not a number: {declared!r}") from None
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise InputError(413, "upload_too_large", f"the request body is over this server's limit of {limit:,} "
                             f"bytes (--max-upload-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_images(request, cfg: ServeConfig) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the request: the file parts of a multipart form, or the raw body."""
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    multipart = media == "multipart/form-data"
    if not (multipart or media.startswith("image/") or media in RAW_TYPES):
        raise InputError(415, "unsupported_media_type", f"Content-Type {ctype or '(none)'!r} is not accepted: send "
                         f"multipart/form-data (curl -F image=@photo.jpg) or the image itself as the body with "
                         f"Content-Type image/* or application/octet-stream (curl --data-binary @photo.jpg -H "
                         f"'Content-Type: image/jpeg')")
    body = await _read_body(request, cfg.max_upload_bytes)
    if not body:
        raise InputError(400, "empty_body", "the request has no body: send one or more images")
    if not multipart:
        return [("image", body)]
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    request._body = body  # Starlette's form parser reads the body we already hold (and checked) from here
    try:
        # The parser stops at one file past the limit instead of spooling a hundred; Starlette reports that (and
        # any malformed form) as a 400 with the parser's message.
        async with request.form(max_files=cfg.max_images + 1, max_fields=100) as form:
            files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if isinstance(v, UploadFile)]
    except (HTTPException, MultiPartException, ValueError, KeyError, AssertionError) as e:
        reason = str(getattr(e, "detail", None) or e)
        if "too many files" in reason.lower():
            raise InputError(413, "too_many_images", f"more than {cfg.max_images} images in one request, over this "
                             f"server's limit (--max-images); send them in several requests") from None
        raise InputError(400, "bad_multipart", f"the multipart form cannot be parsed: {reason}") from None
    if not files:
        raise InputError(400, "no_images", "the multipart form has no file parts: send images as files "
                         "(curl -F image=@photo.jpg)")
    if len(files) > cfg.max_images:
        raise InputError(413, "too_many_images", f"{len(files)} images in one request, over this server's limit of "
                         f"{cfg.max_images} (--max-images); send them in several requests")
    return files


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _flush_on_signal(batcher):
    """On SIGINT / SIGTERM, before uvicorn's own handler (which stops accepting and waits for the requests in
    flight), end the batcher's waits, so that draining takes one forward pass and not ``max_wait_ms``.
    Returns a function that puts the previous handlers back. Only the main thread may set handlers: under a test
    client the app runs in another thread and this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        prev = signal.getsignal(sig)
        if not callable(prev):  # SIG_DFL / SIG_IGN: not under uvicorn, leave it alone
            continue

        def handler(signum, frame, prev=prev):
            batcher.flush_threadsafe()
            prev(signum, frame)

        previous[sig] = prev
        signal.signal(sig, handler)

    def restore():
        for sig, prev in previous.items():
            signal.signal(sig, prev)
    return restore


def _page() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def _version() -> str:
    from .. import __version__

    return __version__


def app_from_env():
    """uvicorn's app factory for worker processes: the config comes through the environment."""
    return create_app(ServeConfig(**json.loads(os.environ[ENV])))


def config_json(cfg: ServeConfig) -> str:
    d = asdict(cfg)
    d["model"] = str(Path(d["model"]).resolve())
    return json.dumps(d)
