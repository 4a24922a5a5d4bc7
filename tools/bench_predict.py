"""`edgetl device predict` on one image as a new process, against a minimal PyTorch script doing the same job
(load the model, preprocess, predict): median wall time and peak RSS of each process (os.wait4), in one run.

    python tools/bench_predict.py --model mobilenet_v2 --out docs/results/predict.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from edgetl.demo import demo_split
from edgetl.device import DeviceRuntime
from edgetl.host.export import export
from edgetl.registry import get_backbone, resolve_weights

TORCH_SCRIPT = r"""
import sys, torch, torchvision
from PIL import Image
torch.set_num_threads({threads})
net = torchvision.models.mobilenet_v2(weights=None)
net.load_state_dict(torch.load({weights!r}, map_location="cpu", weights_only=True))
net.eval()
tf = torchvision.transforms.Compose([torchvision.transforms.Grayscale(3), torchvision.transforms.Resize(256),
    torchvision.transforms.CenterCrop(224), torchvision.transforms.ToTensor(),
    torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
with torch.no_grad():
    p = net(tf(Image.open(sys.argv[1]))[None]).softmax(1)
print(int(p.argmax()), float(p.max()))
"""


# A small launcher forks and execs the command and reports its wall time and peak RSS (wait4). Forking the command
# straight from this process would count this process's own memory (torch is loaded here) in the child's ru_maxrss.
LAUNCHER = r"""
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall": time.perf_counter() - start, "rss_mb": usage.ru_maxrss / 1024,
                  "rc": os.waitstatus_to_exitcode(status)}))
"""


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one process."""
    out = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"{cmd[:4]} failed: {out.stderr[-500:]}")
    return result["wall"], result["rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results/predict.json"))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgetl-predict-"))
    bundle = export(work / "bundle", demo_split("train"), model="mobilenet_v2", formats=("onnx", "tflite", "openvino"),
                    precisions=("fp32", "int8"), keep_failed=True)
    image = str(next(demo_split("test").glob("bag/*.png")))
    edgetl = str(Path(sys.executable).with_name("edgetl"))
    rows = {}
    cases = {f"edgetl predict {b}/{p}": [edgetl, "device", "predict", str(bundle), image, "--backend", b,
                                         "--precision", p, "--threads", str(args.threads)]
             for b in ("onnx", "tflite", "openvino") for p in ("int8", "fp32")}
    weights = str(resolve_weights(get_backbone("mobilenet_v2")))
    cases["pytorch minimal script (fp32)"] = [sys.executable, "-c",
                                              TORCH_SCRIPT.format(threads=args.threads, weights=weights), image]
    for name, cmd in cases.items():
        if name.startswith("edgetl"):  # one current head per bundle, trained for the extractor in use
            backend, precision = cmd[cmd.index("--backend") + 1], cmd[cmd.index("--precision") + 1]
            DeviceRuntime(bundle, backend=backend, precision=precision).train(demo_split("train"), val_split=0.0)
        run(cmd)  # warm the page cache
        samples = [run(cmd) for _ in range(args.runs)]
        rows[name] = {"wall_s_median": round(statistics.median(s[0] for s in samples), 3),
                      "peak_rss_mb_median": round(statistics.median(s[1] for s in samples), 1)}
        print(f"{name:<34} {rows[name]['wall_s_median']:6.3f} s  {rows[name]['peak_rss_mb_median']:6.1f} MB",
              flush=True)
    torch_wall = rows["pytorch minimal script (fp32)"]["wall_s_median"]
    for name, row in rows.items():
        row["fraction_of_pytorch_wall"] = round(row["wall_s_median"] / torch_wall, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": args.runs, "threads": args.threads, "image": "one 28x28 Fashion-MNIST PNG",
                                    "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
