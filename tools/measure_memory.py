"""Peak resident memory of each device command, under the 512 MB Raspberry Pi Zero 2 W profile and the default one.

Each command is the real CLI (``edgetl device ...``) run as its own process, started by a ~10 MB launcher; its peak
RSS is the ``ru_maxrss`` that ``os.wait4`` returns to the launcher, which covers the process and every child it waited
for (``device bench`` measures in child processes). Nothing else runs in that process, so the figure is what the
command itself needs.

    python tools/measure_memory.py                      # export MobileNetV2 224 px (ONNX + LiteRT, FP32 + INT8) here
    python tools/measure_memory.py --bundle B           # reuse a bundle with INT8 ONNX and LiteRT graphs

Data: Fashion-MNIST (``edgetl.datasets.fashion_mnist``): 1,000 training images (100 per class) for ``train`` and the
``watch`` inbox, 200 test images (20 per class) for ``predict`` and ``evaluate``; the export calibrates on 150 other
training images. Per backend and profile: ``train`` on a fresh copy of the bundle (nothing cached), then ``predict``,
``evaluate``, ``bench`` and ``watch --once`` on the 1,000-image inbox with that head. Writes a JSON report and prints a
markdown table (command x backend x profile: peak RSS, seconds, pass/fail against the budget).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EDGETL = [sys.executable, "-m", "edgetl.cli"] if not (Path(sys.executable).parent / "edgetl").exists() \
    else [str(Path(sys.executable).parent / "edgetl")]
COMMANDS = ("train", "predict", "evaluate", "bench", "watch")
ZERO = "raspberry-pi-zero-2w"
DEFAULT = "generic-cpu"


def make_data(work: Path, train_per_class: int, test_per_class: int) -> dict[str, Path]:
    from edgetl.datasets.fashion_mnist import write_image_folder

    data = {"train": work / "train", "test": work / "test", "calib": work / "calib", "inbox": work / "inbox-src"}
    if not (data["train"] / ".done").exists():
        write_image_folder(data["train"], "train", train_per_class, 0)
        (data["train"] / ".done").touch()
    if not (data["test"] / ".done").exists():
        write_image_folder(data["test"], "test", test_per_class, 0)
        (data["test"] / ".done").touch()
    if not (data["calib"] / ".done").exists():
        write_image_folder(data["calib"], "train", 15, 1)
        (data["calib"] / ".done").touch()
    if not data["inbox"].exists():  # the watch inbox: the training images, flat
        tmp = work / "inbox-src.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for p in sorted(data["train"].glob("*/*.png")):
            shutil.copy(p, tmp / f"{p.parent.name}_{p.name}")
        tmp.rename(data["inbox"])
    return data


def export_bundle(out: Path, calib: Path, image_size: int) -> Path:
    from edgetl.host.export import export

    return export(out, calib, model="mobilenet_v2", formats=("onnx", "tflite"), precisions=("fp32", "int8"),
                  keep_failed=True, image_size=image_size, calib_size=64, eval_size=86)


#: a small launcher between this process and the command: a child's ru_maxrss counts the memory image it was forked
#: from until its exec (Linux keeps the pre-exec high-water mark), so a command forked straight from this process
#: (hundreds of MB after an export) would report this process's size. The launcher is ~10 MB.
_LAUNCHER = r"""
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}, fh)
"""


def run_measured(cmd: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run ``cmd`` as a fresh process (through :data:`_LAUNCHER`); its peak RSS, own and waited-for descendants', is
    the ``ru_maxrss`` of ``os.wait4``."""
    result = log.with_suffix(".rusage.json")
    result.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(result), *cmd], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.perf_counter() - start
    try:
        got = json.loads(result.read_text())
    except (OSError, ValueError):
        got = {"rc": proc.returncode if proc.returncode else -9, "maxrss_kb": float("nan")}
    return {"rc": got["rc"], "peak_rss_mb": round(got["maxrss_kb"] / 1024, 1), "seconds": round(seconds, 1),
            "log": str(log)}


def command_line(command: str, bundle: Path, data: dict[str, Path], inbox: Path, backend: str, precision: str,
                 profile: str, threads: int | None, bench_runs: int) -> list[str]:
    common = ["--backend", backend, "--precision", precision, "--profile", profile]
    if threads:
        common += ["--threads", str(threads)]
    if command == "train":
        return [*EDGETL, "device", "train", str(bundle), "--data", str(data["train"]), "--quiet", "--json", *common]
    if command == "predict":
        paths = sorted(str(p) for p in data["test"].glob("*/*.png"))
        return [*EDGETL, "device", "predict", str(bundle), *paths, "--json", *common]
    if command == "evaluate":
        return [*EDGETL, "device", "evaluate", str(bundle), "--data", str(data["test"]), "--quiet", "--json", *common]
    if command == "bench":
        return [*EDGETL, "device", "bench", str(bundle), "--runs", str(bench_runs), "--json", *common]
    if command == "watch":
        return [*EDGETL, "device", "watch", str(bundle), str(inbox), "--once", "--settle", "0", "--no-learn", "--quiet",
                *common]
    raise ValueError(command)


def fresh_copy(bundle: Path, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    return Path(shutil.copytree(bundle, dest, ignore=shutil.ignore_patterns("state")))


def table(rows: list[dict[str, Any]], budget_mb: int) -> str:
    profiles = list(dict.fromkeys(r["profile"] for r in rows))
    head = "| command | backend | " + " | ".join(f"{p}: peak RSS MB (s)" for p in profiles) + \
        f" | under {budget_mb} MB ({profiles[0]}) |"
    lines = [head, "|" + "---|" * (3 + len(profiles))]
    for command in dict.fromkeys(r["command"] for r in rows):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            cells = {r["profile"]: r for r in rows if r["command"] == command and r["backend"] == backend}
            if not cells:
                continue
            shown = []
            for p in profiles:
                r = cells.get(p)
                shown.append("—" if r is None else
                             f"{r['peak_rss_mb']:.0f} ({r['seconds']:.0f} s)" + ("" if r["rc"] == 0 else
                                                                                 f" rc={r['rc']}"))
            zero = cells.get(profiles[0])
            verdict = "—" if zero is None else ("pass" if zero["rc"] == 0 and zero["peak_rss_mb"] <= budget_mb
                                                 else "FAIL")
            lines.append(f"| {command} | {backend} | " + " | ".join(shown) + f" | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="reuse this bundle (INT8 ONNX and LiteRT graphs) instead of exporting")
    ap.add_argument("--work", type=Path, help="working folder (default: a new temporary one); data and bundle are "
                    "reused when present")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "memory.json")
    ap.add_argument("--backends", default="onnx,tflite")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--profiles", default=f"{ZERO},{DEFAULT}", help="the first one is judged against --budget-mb")
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument("--budget-mb", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="runtime threads (default: the profile's, capped)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--test-per-class", type=int, default=20)
    ap.add_argument("--bench-runs", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per command")
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="edgetl-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work, args.train_per_class, args.test_per_class)
    bundle = args.bundle
    if bundle is None:
        bundle = work / "bundle"
        if not (bundle / "manifest.json").exists():
            t = time.perf_counter()
            export_bundle(bundle, data["calib"], args.image_size)
            print(f"exported {bundle} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    manifest = json.loads((bundle / "manifest.json").read_text())
    rows: list[dict[str, Any]] = []
    commands = args.commands.split(",")
    for backend in args.backends.split(","):
        for profile in args.profiles.split(","):
            tag = f"{backend}-{args.precision}-{profile}"
            run_bundle = fresh_copy(bundle, work / f"b-{tag}")
            for command in commands:
                inbox = work / f"inbox-{tag}"
                if command == "watch":
                    shutil.rmtree(inbox, ignore_errors=True)
                    shutil.copytree(data["inbox"], inbox)
                cmd = command_line(command, run_bundle, data, inbox, backend, args.precision, profile, args.threads,
                                   args.bench_runs)
                r = run_measured(cmd, work / f"{command}-{tag}.log", args.timeout)
                r |= {"command": command, "backend": backend, "precision": args.precision, "profile": profile}
                if command == "watch":
                    results = inbox / "_watch" / "results.jsonl"
                    r["recorded"] = len(results.read_text().splitlines()) if results.exists() else 0
                if r["rc"] != 0:
                    r["error_tail"] = Path(r["log"]).read_text(errors="replace")[-600:]
                rows.append(r)
                print(f"{command:9s} {backend:7s} {profile:22s} peak {r['peak_rss_mb']:7.1f} MB  {r['seconds']:6.1f} s"
                      f"  rc={r['rc']}", file=sys.stderr, flush=True)
    zero = args.profiles.split(",")[0]
    report = {
        "what": f"peak RSS (ru_maxrss from os.wait4: the command's process and its waited-for children) of each "
                f"`edgetl device` command, {args.precision.upper()} MobileNetV2 {manifest['preprocessing']['input_size']}"
                f" px, profile {zero} (memory_budget_mb {args.budget_mb}) vs the others",
        "command": "python tools/measure_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "budget_mb": args.budget_mb,
        "data": {"train_images": args.train_per_class * 10, "test_images": args.test_per_class * 10,
                 "watch_inbox_images": args.train_per_class * 10, "dataset": "Fashion-MNIST"},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load1_at_end": os.getloadavg()[0]},
        "bench_runs": args.bench_runs,
        "threads": args.threads,
        "all_pass": all(r["rc"] == 0 and r["peak_rss_mb"] <= args.budget_mb for r in rows if r["profile"] == zero),
        "rows": [{k: v for k, v in r.items() if k != "log"} for r in rows],
    }
    try:
        import onnxruntime

        report["machine"]["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows, args.budget_mb))
    return 0 if report["all_pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
