"""``cifarlab serve`` as a user runs it: a real uvicorn process on 127.0.0.1 (an ephemeral port), Ctrl-C, workers.

Every server here is started by the test and stopped by it (SIGINT or SIGTERM, then a kill if it hangs).
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

import cifarlab
from cifarlab.export import run_test_images

START_TIMEOUT = 300  # s: importing torch and loading the model on a busy CI machine


class Server:
    """``python -m cifarlab serve ARGS --port 0``; the port is read from the line it prints."""

    def __init__(self, *args: str):
        cmd = [sys.executable, "-m", "cifarlab", "serve", *map(str, args), "--port", "0", "--no-access-log"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._url = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._url.wait(START_TIMEOUT):
            self.kill()
            raise AssertionError("no address printed:\n" + self.output)
        self.url = re.search(r"http://127\.0\.0\.1:\d+", self.output).group(0)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError("the server did not come up:\n" + self.output)
            time.sleep(0.2)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "cifarlab serve:" in line and "http://" in line:
                self._url.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()

    def post(self, **kw) -> httpx.Response:
        return httpx.post(self.url + "/predict", timeout=120, **kw)

    def stop(self, sig=signal.SIGINT, timeout: float = 120) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server_factory():
    servers = []

    def start(*args):
        servers.append(Server(*args))
        return servers[-1]

    yield start
    for s in servers:
        s.kill()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_ctrl_c_answers_the_requests_in_flight_then_exits(trained_run, server_factory):
    # A batch of 64 that waits up to 10 minutes to fill: the one request below can only be answered that soon
    # because Ctrl-C ends the wait and the server drains it.
    server = server_factory(trained_run, "--max-batch", "64", "--max-wait-ms", "600000")
    assert server.url.startswith("http://127.0.0.1:")  # loopback unless --host
    image = run_test_images(trained_run, limit=1).permute(0, 2, 3, 1).numpy()[0]
    result = {}

    def request():
        result["response"] = server.post(content=png(image), headers={"Content-Type": "image/png"})

    t = threading.Thread(target=request)
    t.start()
    deadline = time.monotonic() + 120
    while server.health()["in_flight"] != 1:
        assert time.monotonic() < deadline, "the request never arrived"
        time.sleep(0.05)
    assert t.is_alive()  # waiting for its batch
    rc = server.stop(signal.SIGINT)
    t.join(60)
    assert rc == 0, server.output
    r = result["response"]
    assert r.status_code == 200, r.text
    want = cifarlab.load(trained_run, device="cpu").predict(image, top_k=5)
    assert [p["label"] for p in r.json()["predictions"][0]["top_k"]] == want.labels
    assert "cifarlab serve: stopped" in server.output and "Traceback" not in server.output
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)


def test_bad_input_never_kills_the_worker(trained_run, server_factory):
    server = server_factory(trained_run, "--max-upload-mb", "0.5", "--max-images", "4")
    pid = server.health()["pid"]
    assert pid == server.proc.pid  # one process: the worker is the server
    image = run_test_images(trained_run, limit=1).permute(0, 2, 3, 1).numpy()[0]
    bomb = io.BytesIO()
    Image.new("1", (10_000, 6_000)).save(bomb, "PNG")
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    noise = png(np.random.default_rng(1).integers(0, 256, (500, 500, 3), dtype=np.uint8))
    bad = [
        (dict(content=b"<html>not a picture</html>", headers={"Content-Type": "image/gif"}), 422, "not_an_image"),
        (dict(content=b"GIF89a and nothing after", headers={"Content-Type": "image/gif"}), 422, "bad_image"),
        (dict(content=jpeg.getvalue()[:len(jpeg.getvalue()) // 2], headers={"Content-Type": "image/jpeg"}), 422,
         "truncated_image"),
        (dict(content=bomb.getvalue(), headers={"Content-Type": "image/png"}), 422, "too_many_pixels"),
        (dict(content=noise, headers={"Content-Type": "image/png"}), 413, "upload_too_large"),
        (dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type"),
        (dict(content=b"", headers={"Content-Type": "image/png"}), 400, "empty_body"),
        (dict(files=[("image", (f"{i}.png", png(image), "image/png")) for i in range(100)]), 413,
         "too_many_images"),
    ]
    for kwargs, status, code in bad:
        r = server.post(**kwargs)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
        ok = server.post(content=png(image), headers={"Content-Type": "image/png"})
        assert ok.status_code == 200 and server.health()["pid"] == pid
    assert server.stop(signal.SIGTERM) == 0, server.output  # docker stop / systemd: drained, exit 0
    assert "Traceback" not in server.output


def test_workers_serve_from_separate_processes(trained_run, server_factory):
    server = server_factory(trained_run, "--workers", "2")
    image = run_test_images(trained_run, limit=1).permute(0, 2, 3, 1).numpy()[0]
    pids = set()
    for _ in range(6):
        with httpx.Client(timeout=60) as c:  # a new connection each time
            pids.add(c.get(server.url + "/health").json()["pid"])
            assert c.post(server.url + "/predict", content=png(image),
                          headers={"Content-Type": "image/png"}).status_code == 200
    assert pids and server.proc.pid not in pids  # the parent only supervises
    assert "2 workers" in server.output
    assert server.stop(signal.SIGINT) == 0, server.output
    for pid in pids:  # the workers are gone with it
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
