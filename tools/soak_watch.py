"""Soak test of `edgetl device watch`: write N copies of real demo images into an inbox progressively while the real
CLI runs as a subprocess; sample its RSS; check count in = count out, no file twice; SIGTERM must exit 0.

    python tools/soak_watch.py                          # 10,000 images, MobileNetV2 224 px FP32 bundle exported here
    python tools/soak_watch.py --bundle B --images 2000 --move-done

Without --bundle a bundle is exported (needs the host extra) and a head trained on the demo training images. Half the
images are written in place (the watcher waits for them to settle), half written as *.part and renamed into place.
RSS "start" is taken once --warmup images are recorded (runtime session and buffers created), "end" once all are.

With --hostile F a fraction F of the items is hostile, in equal parts: undecodable files (random bytes, a truncated
PNG, empty; each must get one "failed" line and land in INBOX/_failed), links named like images (to an image outside
the inbox and to /dev/zero; never recorded, never followed — the outside image must be untouched), FIFOs named like
images (never opened), slow writes (half the image, a pause longer than --settle, then the rest; must end "ok", not
failed) and renames (written under one image name, renamed to another 0.1 s later; the final name must be recorded).

    python tools/soak_watch.py --bundle B --images 10000 --hostile 0.2 --report docs/results/soak_watch_hostile.json
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
    ap.add_argument("--hostile", type=float, default=0.0, help="fraction of hostile items (see above)")
    ap.add_argument("--stall", type=float, default=0.6, help="pause of a slow writer (s; between settle and 2 settle)")
    args = ap.parse_args()

    waited = 0.0
    while load1() >= args.wait_load and waited < 600:
        time.sleep(10)
        waited += 10
    load_start = load1()

    from edgetl.demo import DEMO_ROOT

    sources = sorted(DEMO_ROOT.glob("*/*/*.png"))
    import numpy as np

    rng = np.random.default_rng(args.seed)
    order = rng.integers(0, len(sources), size=args.images)
    hostile_kinds = ["bad", "link", "fifo", "slow", "rename"]
    kinds = [str(rng.choice(hostile_kinds)) if rng.random() < args.hostile else "good" for _ in range(args.images)]
    junk = [rng.bytes(int(n)) for n in rng.integers(1, 4000, size=16)]

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
        # stderr to a file, not a pipe: a pipe nobody reads fills after ~64 KB of warnings (one per set-aside file)
        # and then blocks the watcher
        err_file = open(work / "watch.err", "w+", encoding="utf-8")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(cmd, stderr=err_file, text=True, cwd=work)
        samples: list[tuple[float, int, float]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set() and proc.poll() is None:
                samples.append((time.monotonic(), count_lines(journal), rss_mb(proc.pid)))
                stop.wait(0.5)

        outside = work / "outside"
        outside.mkdir()
        victim = outside / "victim.png"
        shutil.copyfile(sources[0], victim)
        victim_before = (victim.read_bytes(), victim.stat().st_mtime_ns)
        timers: list[threading.Timer] = []

        def finish(path: Path, rest: bytes) -> None:
            with open(path, "ab") as fh:
                fh.write(rest)

        def write() -> None:
            t0 = time.monotonic()
            for i, k in enumerate(order):
                name = f"img{i:05d}.png"
                kind = kinds[i]
                if kind == "bad":
                    data = sources[k].read_bytes()
                    payload = [junk[i % len(junk)], data[: len(data) // 3], b""][i % 3]
                    (inbox / name).write_bytes(payload)
                elif kind == "link":
                    os.symlink(victim if i % 2 else "/dev/zero", inbox / name)
                elif kind == "fifo":
                    os.mkfifo(inbox / name)
                elif kind == "slow":
                    data = sources[k].read_bytes()
                    (inbox / name).write_bytes(data[: len(data) // 2])
                    timer = threading.Timer(args.stall, finish, (inbox / name, data[len(data) // 2:]))
                    timer.start()
                    timers.append(timer)
                elif kind == "rename":
                    shutil.copyfile(sources[k], inbox / f"tmp{i:05d}.png")
                    threading.Timer(0.1, os.replace, (inbox / f"tmp{i:05d}.png", inbox / name)).start()
                elif i % 2:
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
        expected_ok = [f"img{i:05d}.png" for i in range(args.images) if kinds[i] in ("good", "slow", "rename")]
        expected_failed = [f"img{i:05d}.png" for i in range(args.images) if kinds[i] == "bad"]
        never = [f"img{i:05d}.png" for i in range(args.images) if kinds[i] in ("link", "fifo")]
        n_expected = len(expected_ok) + len(expected_failed)
        deadline = time.monotonic() + max(600.0, args.images / 5)
        last_parse = 0.0
        while time.monotonic() < deadline and proc.poll() is None:
            n = count_lines(journal)
            if rss_start is None and n >= args.warmup:
                rss_start, t_warm, n_warm = rss_mb(proc.pid), time.monotonic(), n
            if n >= n_expected and time.monotonic() - last_parse > 1.0:
                last_parse = time.monotonic()
                recorded = {json.loads(line)["file"] for line in journal.read_text().splitlines()}
                if recorded >= {*expected_ok, *expected_failed}:
                    break
            time.sleep(0.05)
        t_end = time.monotonic()
        writer.join()
        rss_end = rss_mb(proc.pid) if proc.poll() is None else float("nan")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        err_file.seek(0)
        err = err_file.read()
        err_file.close()
        stop.set()
        for timer in timers:
            timer.join()
        records = [json.loads(line) for line in journal.read_text().splitlines()]
        transient = [r["file"] for r in records if r["file"].startswith("tmp")]  # renamed after it was classified
        records = [r for r in records if not r["file"].startswith("tmp")]
        files = [r["file"] for r in records]
        ok_files = sorted(r["file"] for r in records if r["status"] == "ok")
        failed_files = sorted(r["file"] for r in records if r["status"] == "failed")
        left = sorted(p.name for p in inbox.glob("img*.png") if p.is_file() and not p.is_symlink())
        done = sorted(p.name for p in (work / "done").glob("*.png")) if args.move_done else \
            sorted(set(left) - set(never))
        in_failed = sorted(p.name for p in (inbox / "_failed").glob("*.png"))
        expected = sorted(expected_ok)
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
            "count_in_equals_count_out": (len(files) == len(set(files)) and ok_files == expected and done == expected
                                          and failed_files == sorted(expected_failed)
                                          and in_failed == sorted(expected_failed)
                                          and not set(files) & set(never)),
            "hostile_fraction": args.hostile,
            "items_by_kind": {k: kinds.count(k) for k in ["good", *hostile_kinds]},
            "expected_ok": len(expected_ok), "expected_failed": len(expected_failed),
            "ok_out": len(ok_files), "failed_out": len(failed_files), "in_failed_folder": len(in_failed),
            "links_and_fifos_recorded": len(set(files) & set(never)),
            "transient_rename_names_recorded": len(transient),
            "outside_file_untouched": (victim.read_bytes(), victim.stat().st_mtime_ns) == victim_before,
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
              and result["outside_file_untouched"]
              and result["rss_growth_mb"] is not None and result["rss_growth_mb"] < 10)
        sys.exit(0 if ok else 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
