"""Serving a trained model over HTTP: ``cifarlab serve RUN_DIR | model.onnx`` (FastAPI on uvicorn).

``app`` builds the ASGI app (routes, limits, auth), ``batching`` groups concurrent requests into one forward
pass, ``inputs`` turns uploaded bytes into the model's image or a clear 4xx error, ``model`` loads a run
(PyTorch) or an exported ONNX file (ONNX Runtime). FastAPI, uvicorn and python-multipart are the ``serve``
extra: ``pip install 'cifarlab[serve]'``.
"""

from .app import ServeConfig, create_app  # noqa: F401
