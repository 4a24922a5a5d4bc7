"""Load check of ``edgetl device serve``: concurrent ``POST /api/predict`` on loopback, bounded in count and time.

Starts the real console (``python -m edgetl.cli device serve``) on 127.0.0.1 — only there; this tool never sends a
request anywhere else — over a copy of the committed 64 px MobileNetV2 bundle with a softmax head trained on the demo
data, warms it up with one request, then sends ``--requests`` predictions of the demo test images from
``--concurrency`` client threads, stopping early at ``--max-seconds``. Reports latency p50/p95/p99/max as the client
sees it, throughput, every non-200 answer and transport error, and the server's RSS (VmRSS) before and after the load
and its peak (VmHWM). Writes ``docs/results/serve_load.json``.

    .venv/bin/python tools/measure_serve_load.py                      # 400 requests, 8 at a time, at most 120 s
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUNDLE = ROOT / "tests" / "data" / "device-bundle" / "mnv2-64"
HOST = "127.0.0.1"  #: loopback only, by construction


def rss_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def post(port: int, token: str, body: bytes) -> tuple[int, float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request("POST", "/api/predict", body=body, headers={"Authorization": f"Bearer {token}",
                                                                 "Content-Type": "application/octet-stream"})
        res = conn.getresponse()
        res.read()
        return res.status, time.perf_counter() - start
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--threads", type=int, default=2, help="Runtime threads of the console.")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "serve_load.json")
    args = ap.parse_args()
    if args.requests < 1 or args.requests > 100_000 or args.concurrency < 1 or args.concurrency > 64:
        sys.exit("--requests must be 1..100000 and --concurrency 1..64")

    from edgetl.demo import demo_split
    from edgetl.device import DeviceRuntime

    images = [p.read_bytes() for p in sorted(demo_split("test").rglob("*.png"))]
    with tempfile.TemporaryDirectory(prefix="edgetl-serve-load-") as tmp:
        bundle = Path(shutil.copytree(BUNDLE, Path(tmp) / "bundle"))
        DeviceRuntime(bundle, threads=args.threads).train(demo_split("train"), seed=0)
        token = secrets.token_urlsafe(24)
        token_file = Path(tmp) / "token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        port = free_port()
        cmd = [sys.executable, "-m", "edgetl.cli", "device", "serve", str(bundle), "--host", HOST, "--port",
               str(port), "--token-file", str(token_file), "--threads", str(args.threads)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    status, _ = post(port, token, images[0])  # warm-up (session created, head loaded)
                    if status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    sys.exit(f"the console did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
                time.sleep(0.2)
            before = rss_mb(proc.pid)
            load_before = os.getloadavg()[0]
            stop_at = time.monotonic() + args.max_seconds
            latencies: list[float] = []
            statuses: dict[str, int] = {}
            lock = threading.Lock()

            def one(k: int) -> None:
                if time.monotonic() > stop_at:
                    key = "not sent (time bound)"
                    latency = None
                else:
                    try:
                        code, latency = post(port, token, images[k % len(images)])
                        key = str(code)
                    except OSError as exc:
                        key, latency = f"error: {type(exc).__name__}", None
                with lock:
                    statuses[key] = statuses.get(key, 0) + 1
                    if latency is not None and key == "200":
                        latencies.append(latency)

            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - start
            after = rss_mb(proc.pid)
            load_after = os.getloadavg()[0]
        finally:
            proc.terminate()
            proc.wait(30)
    ms = np.array(latencies) * 1000
    ok = statuses.get("200", 0)
    result = {
        "command": "python tools/measure_serve_load.py " + " ".join(sys.argv[1:]),
        "settings": {"requests": args.requests, "concurrency": args.concurrency, "max_seconds": args.max_seconds,
                     "threads": args.threads, "bundle": str(BUNDLE.relative_to(ROOT)) + " (64 px, FP32 ONNX)",
                     "host": HOST, "cpu_cores": os.cpu_count(),
                     "load_average_1min": {"before": round(load_before, 1), "after": round(load_after, 1)}},
        "answers": statuses,
        "ok": ok,
        "errors": args.requests - ok,
        "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 1), "p95": round(float(np.percentile(ms, 95)), 1),
                       "p99": round(float(np.percentile(ms, 99)), 1), "max": round(float(ms.max()), 1)}
        if len(ms) else None,
        "throughput_per_s": round(ok / wall, 1),
        "wall_s": round(wall, 1),
        "server_rss_mb": {"before": round(before["VmRSS"], 1), "after": round(after["VmRSS"], 1),
                          "peak": round(after["VmHWM"], 1)},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
