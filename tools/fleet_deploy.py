"""A scripted fleet deployment on one machine over loopback (Flower's deployment engine, edgetl.fleet.deploy): a
SuperLink with TLS and node authentication, one `edgetl fleet client` SuperNode per device (each its own process and
bundle), an unregistered intruder, optionally a device that rehearses a fault, and `flwr run` of the edgetl app with a
signed head that every device verifies and adopts through its promote gate. Writes the measured round times and bytes
per device.

Devices are copies of the committed MobileNetV2 bundle (tests/data/device-bundle/mnv2-64, 1280-d embeddings), each
trained (`device train`) on its own class split of the demo Fashion-MNIST images.

    .venv/bin/python tools/fleet_deploy.py                          # NCM, 4 devices + intruder + a crashing device
    .venv/bin/python tools/fleet_deploy.py --head softmax --strategy fedavg --rounds 10 --drill nan
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetl.datasets.fashion_mnist import CLASSES

#: which classes each device knows (every class is known by at least two devices, no device knows all)
KNOWS = [CLASSES[0:6], CLASSES[3:9], CLASSES[0:3] + CLASSES[7:10], CLASSES[4:10], CLASSES[0:5], CLASSES[5:10]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4, choices=range(2, len(KNOWS) + 1))
    parser.add_argument("--images", type=int, default=30, help="demo images per class on each device")
    parser.add_argument("--head", choices=["ncm", "softmax"], default="ncm")
    parser.add_argument("--strategy", choices=["fedavg", "lbfgs"], default="fedavg")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--drill", choices=["", "crash", "nan", "shape", "slow"], default="crash",
                        help="fault rehearsed by one extra device ('' for none)")
    parser.add_argument("--timeout", type=float, default=60.0, help="round timeout (seconds)")
    parser.add_argument("--work", type=Path, default=None, help="keep the processes' logs and bundles here")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "fleet_deploy.json")
    args = parser.parse_args()

    from edgetl.demo import demo_split
    from edgetl.device import DeviceRuntime
    from edgetl.fleet.certs import make_certs
    from edgetl.fleet.deploy import LoopbackDevice, run_loopback
    from edgetl.signing import generate_keys
    from tests.conftest import DEVICE_BUNDLE, make_folder

    train = demo_split("train")
    work = args.work or Path(tempfile.mkdtemp(prefix="edgetl-fleet-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    names = [f"dev{k}" for k in range(args.devices)] + (["drill"] if args.drill else []) + ["intruder"]
    certs = make_certs(work / "certs", nodes=names)
    key, pub = generate_keys(work / "operator.key")
    devices = []
    for k, name in enumerate(names[:-1]):
        classes = KNOWS[k % args.devices]
        bundle = Path(shutil.copytree(DEVICE_BUNDLE, work / name))
        folder = make_folder(work / f"data-{name}", {c: args.images for c in classes}, train)
        DeviceRuntime(bundle).train(folder, head="ncm")
        devices.append(LoopbackDevice(name, bundle, trust=pub, drill=args.drill if name == "drill" else ""))
    devices.append(LoopbackDevice("intruder", devices[0].bundle, register=False))
    setup = time.perf_counter() - t0
    server_args = ["--head", args.head, "--strategy", args.strategy, "--rounds", str(args.rounds), "--min-clients",
                   str(args.devices), "--adopt", "--timeout", str(args.timeout), "--sign-key", str(key)]
    run = run_loopback(work / "run", certs, devices, devices[0].bundle, work / "fleet-head", server_args,
                       run_timeout=1800)
    fleet = run.fleet
    node_names = {str(v): k for k, v in run.node_ids.items()}

    def per_device(rounds: list[dict[str, int]]) -> list[int]:
        return [max(r.values()) if r else 0 for r in rounds]

    record = {
        "command": "python tools/fleet_deploy.py " + " ".join(sys.argv[1:]),
        "setup": {"devices": args.devices, "drill": args.drill or None, "intruder": True, "tls": True,
                  "node_auth": True, "signed_head": True, "bundle": "tests/data/device-bundle/mnv2-64 (1280-d)",
                  "images_per_device": [sum(1 for _ in (work / f"data-{n}").rglob("*.png")) for n in names[:-1]],
                  "machine": "one machine, 2 shared CPU cores, loopback",
                  "prepare_seconds": round(setup, 1)},
        "status": run.status, "seconds": run.seconds, "flower_traffic": run.traffic,
        "head": fleet.get("head"), "strategy": args.strategy if args.head == "softmax" else None,
        "rounds": fleet.get("rounds"), "round_seconds": fleet.get("round_seconds"),
        "bytes_up_per_device_per_round": per_device(fleet.get("bytes_up", [])),
        "bytes_down_per_device_per_round": per_device(fleet.get("bytes_down", [])),
        "join_bytes_up_per_device": max(fleet.get("join_bytes_up", {}).values(), default=0),
        "accepted": [node_names.get(str(n), n) for n in fleet.get("accepted", [])],
        "refused_by_superlink": run.refused,
        "dropped": {node_names.get(n, n): r for n, r in fleet.get("dropped", {}).items()},
        "adopted": {node_names.get(n, n): {k: v for k, v in a.items() if k != "signer"}
                    for n, a in fleet.get("adopted", {}).items()},
        "signer": fleet.get("signer"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
