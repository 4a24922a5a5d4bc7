"""Soak test of `edgetl device watch`: write N copies of real demo images into an inbox progressively while the real
CLI runs as a subprocess; sample its RSS; check count in = count out, no file twice; SIGTERM must exit 0.

    python tools/soak_watch.py                          # 10,000 images, MobileNetV2 224 px FP32 bundle exported here
    python tools/soak_watch.py --bundle B --images 2000 --move-done

Without --bundle a bundle is exported (needs the host extra) and a head trained on the demo training images. Half the
images are written in place (the watcher waits for them to settle), half written as *.part and renamed into place.
RSS "start" is taken once --warmup images are recorded (runtime session and buffers created), "end" once all are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def make_bundle(work: Path, precision: str) -> Path:
    from edgetl.demo import demo_split
    from edgetl.device import DeviceRuntime
    from edgetl.host.export import export

    bundle = export(work / "bundle", demo_split("train"), model="mobilenet_v2", precisions=tuple({"fp32", precision}),
                    calib_size=64, eval_size=200)
    DeviceRuntime(bundle, precision=precision).train(demo_split("train"))
    return bundle


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return fh.read().count(b"\n")
    except FileNotFoundError:
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None, help="bundle with a trained head (default: export one)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=400.0, help="images written per second")
    ap.add_argument("--warmup", type=int, default=500, help="images recorded before the start RSS is taken")
    ap.add_argument("--move-done", action="store_true", help="run watch with --move-done")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--wait-load", type=float, default=1.0, help="wait (up to 10 min) for the 1-min load below this")
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "results" / "soak_watch.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    waited = 0.0
    while load1() >= args.wait_load and waited < 600:
        time.sleep(10)
        waited += 10
    load_start = load1()

    from edgetl.demo import DEMO_ROOT

    sources = sorted(DEMO_ROOT.glob("*/*/*.png"))
    import numpy as np

    order = np.random.default_rng(args.seed).integers(0, len(sources), size=args.images)

    work = Path(tempfile.mkdtemp(prefix="edgetl-soak-"))
    try:
        bundle = args.bundle or make_bundle(work, args.precision)
        inbox = work / "inbox"
        inbox.mkdir()
        journal = work / "results.jsonl"
        cmd = [sys.executable, "-m", "edgetl.cli", "device", "watch", str(bundle), str(inbox), "--out", str(journal),
               "--interval", "0.2", "--settle", "0.5", "--no-learn", "--quiet", "--precision", args.precision]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.move_done:
            cmd += ["--move-done", str(work / "done")]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=work)
        samples: list[tuple[float, int, float]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set() and proc.poll() is None:
                samples.append((time.monotonic(), count_lines(journal), rss_mb(proc.pid)))
                stop.wait(0.5)

        def write() -> None:
            t0 = time.monotonic()
            for i, k in enumerate(order):
                name = f"img{i:05d}.png"
                if i % 2:
                    shutil.copyfile(sources[k], inbox / name)
                else:
                    shutil.copyfile(sources[k], inbox / f"{name}.part")
                    os.replace(inbox / f"{name}.part", inbox / name)
                ahead = t0 + (i + 1) / args.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)

        sampler = threading.Thread(target=sample, daemon=True)
        writer = threading.Thread(target=write)
        t_start = time.monotonic()
        sampler.start()
        writer.start()
        rss_start = t_warm = n_warm = None
        deadline = time.monotonic() + max(600.0, args.images / 5)
        while time.monotonic() < deadline and proc.poll() is None:
            n = count_lines(journal)
            if rss_start is None and n >= args.warmup:
                rss_start, t_warm, n_warm = rss_mb(proc.pid), time.monotonic(), n
            if n >= args.images:
                break
            time.sleep(0.05)
        t_end = time.monotonic()
        writer.join()
        rss_end = rss_mb(proc.pid) if proc.poll() is None else float("nan")
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        stop.set()
        records = [json.loads(line) for line in journal.read_text().splitlines()]
        files = [r["file"] for r in records]
        left = sorted(p.name for p in inbox.glob("*.png"))
        done = sorted(p.name for p in (work / "done").glob("*.png")) if args.move_done else left
        expected = [f"img{i:05d}.png" for i in range(args.images)]
        samples = [s for s in samples if s[0] <= t_end]  # before SIGTERM (the exiting process frees memory)
        rss_series = [s[2] for s in samples]
        marks, by_images = [args.images * k // 10 for k in range(1, 11)], []
        for _, n_done, rss in samples:  # RSS after every further tenth of the images
            if marks and n_done >= marks[0]:
                by_images.append([n_done, round(rss, 1)])
                while marks and n_done >= marks[0]:
                    marks.pop(0)
        result = {
            "images_in": args.images, "lines_out": len(records), "distinct_files_out": len(set(files)),
            "failed": sum(r["status"] != "ok" for r in records),
            "count_in_equals_count_out": sorted(files) == expected and done == expected,
            "watch_exit_code_on_sigterm": proc.returncode,
            "wall_s": round(t_end - t_start, 1),
            "images_per_s_overall": round(len(records) / (t_end - t_start), 1),
            "images_per_s_after_warmup": round((len(records) - n_warm) / (t_end - t_warm), 1) if t_warm else None,
            "write_rate_limit": args.rate,
            "rss_mb_start": round(rss_start, 1) if rss_start else None, "rss_mb_end": round(rss_end, 1),
            "rss_growth_mb": round(rss_end - rss_start, 1) if rss_start else None,
            "rss_mb_first_sample": round(rss_series[0], 1) if rss_series else None,
            "rss_mb_peak": round(max(rss_series), 1) if rss_series else None,
            "rss_mb_by_images": by_images,
            "warmup_images": args.warmup, "precision": args.precision, "move_done": args.move_done,
            "head_versions": sorted({r.get("head_version") for r in records} - {None}),
            "load1_start": load_start, "load1_end": load1(), "waited_for_load_s": waited,
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(["python", "tools/soak_watch.py", *sys.argv[1:]]),
        }
        print(json.dumps(result, indent=2))
        if err.strip():
            print(err.strip()[-2000:], file=sys.stderr)
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(result, indent=2) + "\n")
        ok = (result["count_in_equals_count_out"] and result["watch_exit_code_on_sigterm"] == 0
              and result["rss_growth_mb"] is not None and result["rss_growth_mb"] < 10)
        sys.exit(0 if ok else 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
