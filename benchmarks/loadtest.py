"""Load test of ``cifarlab serve``: throughput and latency at concurrency 1, 8 and 64, batching on and off, and the
server's memory over many requests. Loopback only, a fixed number of requests, a server it starts and stops itself.

    python benchmarks/loadtest.py runs/NAME/export/model.int8.onnx            # the recorded run
    python benchmarks/loadtest.py runs/NAME --requests 2000 --memory-requests 10000
    python benchmarks/loadtest.py runs/NAME --quick                           # a few hundred requests: checks it works

For each setting, batching on (``--max-batch``, default 32, ``--max-wait-ms`` 5) and off (``--max-batch 1``):
``python -m cifarlab serve MODEL --port 0`` on 127.0.0.1 (``--workers``, ``--threads`` passed through), a
warm-up, then for each concurrency C in ``--concurrency`` (1 8 64): ``--requests`` POST /predict requests, each one
PNG image at the model's input size (64 distinct seeded noise images, in turn; decoding cost is the same for
any content), sent by C client tasks that each wait for their answer before sending again (a closed loop, as
locust's users do). Reported: requests/s (requests over the wall time of the whole batch of requests), the
latency's p50 and p99, the mean forward-pass batch the server formed (from ``/health``) and the errors (any
answer but 200). The client is one asyncio process with httpx on the same machine: on a small CPU it takes its
share of the cores, so the figures are a lower bound for a server with a machine to itself.

Memory (batching on): after the warm-up, ``--memory-requests`` (default 10,000) more requests at concurrency 8,
and the server's resident memory (RSS, the process and its worker processes, from /proc) every 1,000 requests;
``growth_mb`` is the last sample minus the first. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a run directory, an exported .onnx (fp32 or int8) or .safetensors")
    p.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--memory-requests", type=int, default=10_000, help="requests of the memory run (0: none)")
    p.add_argument("--memory-every", type=int, default=1000, help="requests between two memory samples")
    p.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch when batching is on")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's --max-wait-ms when batching is on")
    p.add_argument("--workers", type=int, default=1, help="the server's --workers")
    p.add_argument("--threads", type=int, help="the server's --threads (model threads per worker)")
    p.add_argument("--warmup", type=int, default=200, help="requests before measuring")
    p.add_argument("--quick", action="store_true", help="a few hundred requests in all: checks that it works")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.warmup = min(args.requests, 64), min(args.warmup, 16)
        args.memory_requests, args.memory_every = min(args.memory_requests, 200), min(args.memory_every, 50)
    return args


# --------------------------------------------------------------------------- the server
class Server:
    def __init__(self, model: str, *flags: str):
        cmd = [sys.executable, "-m", "cifarlab", "serve", model, "--port", "0", "--no-access-log", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        found = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if "cifarlab serve:" in line and "http://" in line:
                    found.set()
        threading.Thread(target=read, daemon=True).start()
        if not found.wait(600):
            self.stop()
            sys.exit("the server printed no address:\n" + "".join(self.lines))
        self.url = re.search(r"http://[\d.]+:\d+", "".join(self.lines)).group(0)

    def wait_ready(self, client) -> None:
        for _ in range(3000):
            try:
                if client.get(self.url + "/health").status_code == 200:
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if self.proc.poll() is not None:
                sys.exit("the server exited:\n" + "".join(self.lines))
            time.sleep(0.2)
        sys.exit("the server did not come up")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants (uvicorn's workers), from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])  # kB
        except OSError:
            pass
        todo += children.get(p, [])
    return total / 1024


# --------------------------------------------------------------------------- the client
def request_images(size: int, n: int = 64) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


async def load(url: str, images: list[bytes], requests: int, concurrency: int, on_done=None) -> dict:
    """``requests`` POSTs from ``concurrency`` closed-loop client tasks; latencies in ms."""
    import httpx

    latencies, errors, counter = [], 0, iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:
        async def user():
            nonlocal errors
            for i in counter:
                t = time.perf_counter()
                try:
                    r = await client.post(url + "/predict", content=images[i % len(images)],
                                          headers={"Content-Type": "image/png"})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append((time.perf_counter() - t) * 1000)
                errors += not ok
                if on_done is not None:
                    on_done(len(latencies))

        t0 = time.perf_counter()
        await asyncio.gather(*[user() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    q = np.percentile(latencies, [50, 99]) if latencies else [float("nan")] * 2
    return {"requests": len(latencies), "errors": errors, "wall_s": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 2), "p50_ms": round(float(q[0]), 3),
            "p99_ms": round(float(q[1]), 3)}


def run_setting(args, batching: bool) -> dict:
    import httpx

    flags = ["--max-batch", str(args.max_batch if batching else 1), "--max-wait-ms", str(args.max_wait_ms),
             "--workers", str(args.workers)] + (["--threads", str(args.threads)] if args.threads else [])
    server = Server(args.model, *flags)
    out = {"flags": flags, "levels": {}}
    try:
        with httpx.Client(timeout=60) as c:
            server.wait_ready(c)
            meta = c.get(server.url + "/metadata").json()
            images = request_images(int(meta["input"]["image_size"]))
            out["model"] = {k: meta.get(k) for k in ("model", "format", "file", "tta")}
            asyncio.run(load(server.url, images, args.warmup, 8))
            for conc in args.concurrency:
                before = c.get(server.url + "/health").json()
                res = asyncio.run(load(server.url, images, args.requests, conc))
                after = c.get(server.url + "/health").json()
                batches = after["batches"] - before["batches"]
                # /health answers from one worker: with several, its counters cover that worker only
                res["mean_batch"] = round((after["images"] - before["images"]) / batches, 2) if batches else None
                out["levels"][conc] = res
                print(f"  batching {'on ' if batching else 'off'} concurrency {conc:3d}: {res['requests_per_s']:8.1f} "
                      f"req/s", file=sys.stderr)
            if batching and args.memory_requests:
                samples = [(0, round(tree_rss_mb(server.proc.pid), 1))]

                def sample(done):
                    if done % args.memory_every == 0:
                        samples.append((done, round(tree_rss_mb(server.proc.pid), 1)))
                mem = asyncio.run(load(server.url, images, args.memory_requests, 8, sample))
                out["memory"] = {"requests": mem["requests"], "errors": mem["errors"], "rss_mb": samples,
                                 "growth_mb": round(samples[-1][1] - samples[0][1], 1),
                                 "peak_mb": max(s[1] for s in samples)}
    finally:
        out["exit_code"] = server.stop()
    return out


def table(results: dict) -> str:
    head = f"{'batching':8s} {'conc':>5s} {'requests':>9s} {'req/s':>9s} {'p50 ms':>9s} {'p99 ms':>9s} " \
           f"{'mean batch':>10s} {'errors':>6s}"
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        for conc, r in res["levels"].items():
            mb = "-" if r["mean_batch"] is None else f"{r['mean_batch']:.2f}"
            lines.append(f"{name:8s} {conc:5d} {r['requests']:9d} {r['requests_per_s']:9.1f} {r['p50_ms']:9.2f} "
                         f"{r['p99_ms']:9.2f} {mb:>10s} {r['errors']:6d}")
    mem = results["on"].get("memory")
    if mem:
        lines.append(f"memory (RSS, batching on, concurrency 8): {mem['rss_mb'][0][1]:.1f} MB after warm-up, "
                     f"{mem['rss_mb'][-1][1]:.1f} MB after {mem['requests']} more requests "
                     f"({mem['growth_mb']:+.1f} MB, peak {mem['peak_mb']:.1f} MB, {mem['errors']} errors)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = {"on": run_setting(args, True), "off": run_setting(args, False)}
    print(table(results))
    out = {"model": results["on"].get("model"), "requests": args.requests, "workers": args.workers,
           "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "quick": args.quick, "results": results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
