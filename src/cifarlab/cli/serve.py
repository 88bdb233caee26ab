"""``cifarlab serve RUN_DIR | model.onnx``: an HTTP prediction service (FastAPI on uvicorn)."""

from __future__ import annotations

import argparse

from .common import DEVICE_HELP


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a trained run or an exported model over HTTP",
                       description="Serve RUN_DIR (PyTorch, with the run's test-time augmentation) or an exported "
                                   "model.onnx / model.int8.onnx (ONNX Runtime) over HTTP: POST /predict (images as "
                                   "multipart or the raw body) returns the top-k classes; GET /metadata, GET /health, "
                                   "and GET / (a page to drop images on). Concurrent requests are batched. Binds "
                                   "127.0.0.1 unless --host says otherwise; Ctrl-C answers the requests in flight, "
                                   "then stops. Needs pip install 'cifarlab[serve]'.")
    p.add_argument("model", metavar="RUN_DIR|MODEL", help="a run directory, an exported .onnx or .safetensors")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one, printed)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="server processes, each with the model "
                   "(default: 1)")
    p.add_argument("--threads", type=int, metavar="N", help="model threads per worker (default: cores / workers)")
    p.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="images per forward pass across concurrent requests; 1 turns batching off (default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long a request waits for others to fill its batch (default: 5)")
    p.add_argument("--max-images", type=int, default=32, metavar="N", help="images per request (default: 32)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MIB",
                   help="request body limit in MiB (default: 10)")
    p.add_argument("--max-pixels", type=int, default=25_000_000, metavar="N",
                   help="pixels per image, checked before decoding (default: 25,000,000)")
    p.add_argument("--decode-threads", type=int, default=0, metavar="N",
                   help="images decoded at a time, which bounds their memory (default: the number of cores)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes per image unless ?top_k= (default: 5)")
    p.add_argument("--tta", choices=["none", "flip", "flip_translate"],
                   help="test-time augmentation (default: the run's, as cifarlab predict; none for an ONNX file)")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on /predict and /metadata, at least 8 "
                   "characters (default: $CIFARLAB_SERVE_TOKEN if set, else no token)")
    p.add_argument("--device", default="cpu", help=f"PyTorch models: {DEVICE_HELP} (default: cpu)")
    p.add_argument("--graceful-timeout", type=float, default=30.0, metavar="S",
                   help="on Ctrl-C, seconds to wait for the requests in flight (default: 30)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="do not log every request")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import signal

    from ..errors import CifarlabError
    from ..serve.app import ENV, ServeConfig, config_json, create_app, require_serve
    from ..serve.model import default_threads, load_backend

    token = args.token or os.environ.get("CIFARLAB_SERVE_TOKEN") or None
    cfg = ServeConfig(model=args.model, host=args.host, port=args.port, workers=args.workers, threads=args.threads,
                      device=args.device, tta=args.tta, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                      max_images=args.max_images, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
                      top_k=args.top_k, decode_threads=args.decode_threads, token=token).validate()
    if args.graceful_timeout <= 0:
        raise CifarlabError(f"--graceful-timeout must be > 0, got {args.graceful_timeout}")
    require_serve()
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    common = dict(host=cfg.host, port=cfg.port, access_log=args.access_log, server_header=False,
                  timeout_graceful_shutdown=args.graceful_timeout)
    if cfg.workers == 1:
        app = create_app(cfg)  # loads the model: a bad file is a one-line error before anything listens
        backend = app.state.backend
        config = uvicorn.Config(app, **common)
    else:
        # Each worker loads its own copy; load it here once first, so that a bad file is one line, not N tracebacks.
        backend = load_backend(cfg.model, cfg.tta, cfg.threads or default_threads(cfg.workers), cfg.device)
        os.environ[ENV] = config_json(cfg)
        config = uvicorn.Config("cifarlab.serve.app:app_from_env", factory=True, workers=cfg.workers, **common)
    sock = _bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"cifarlab serve: {backend.meta.get('model')} ({backend.kind}, tta {backend.tta}) on http://{shown}:{port} "
          f"with {cfg.workers} worker{'s' if cfg.workers > 1 else ''}, batches of up to {cfg.max_batch}"
          f"{', token required' if token else ''}; Ctrl-C answers the requests in flight, then stops", flush=True)
    del backend
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not token:
        print("cifarlab serve: warning: listening beyond this machine without --token: anyone who can reach "
              f"{cfg.host}:{port} can use the model", flush=True)
    # uvicorn drains on SIGINT and SIGTERM, then re-raises the signal under the handler it found: make that a
    # KeyboardInterrupt for SIGTERM too (docker stop, systemd), so that a drained server exits 0 either way.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if cfg.workers > 1:
            Multiprocess(config, sockets=[sock]).run()  # as uvicorn.run: restarts a worker that dies
        else:
            uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    print("cifarlab serve: stopped", flush=True)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _bind(host: str, port: int):
    """The listening socket, bound here so that a taken port is a one-line error and port 0's pick is known."""
    import socket

    from ..errors import CifarlabError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CifarlabError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)  # worker processes serve on it too
    return sock
