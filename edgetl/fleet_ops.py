"""What the ``edgetl fleet`` commands do, as functions (the CLI parses options and prints; Flower itself is in
:mod:`edgetl.fleet.app`).

- :func:`write_server_app`: the Flower app folder for a fleet run (``pyproject.toml`` naming edgetl's ServerApp and
  ClientApp, with the run config), written as TOML by :mod:`edgetl._toml`;
- :func:`supernode_command`: the ``flower-supernode`` command line that serves one device bundle;
- :func:`adopt_fleet_head`: a head written by a fleet server, checked (sha256, signature) and passed through the
  device's promote gate.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgetl import _toml

#: the first lines of the app's pyproject.toml
APP_HEADER = "A Flower app (flwr run) for an edgetl fleet; written by `edgetl fleet server`."


def app_pyproject(run_config: dict[str, Any]) -> dict[str, Any]:
    """The Flower app's ``pyproject.toml`` as a document: the package, the ServerApp/ClientApp components
    (``edgetl.fleet.app:server_app`` / ``client_app``) and ``run_config`` under ``[tool.flwr.app.config]``."""
    return {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "edgetl-fleet", "version": "1.0.0", "description": "edgetl head-only federated learning",
                    "license": "Apache-2.0", "dependencies": ["edgetl[fleet]"]},
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
            "flwr": {"app": {"publisher": "edgetl",
                             "components": {"serverapp": "edgetl.fleet.app:server_app",
                                            "clientapp": "edgetl.fleet.app:client_app"},
                             "config": run_config}},
        },
    }


def write_server_app(bundle: str | os.PathLike[str], out: str | os.PathLike[str], app_dir: str | os.PathLike[str],
                     *, sign_key: str | os.PathLike[str] | None = None, **settings: Any) -> tuple[Path, Any]:
    """Write ``app_dir/pyproject.toml`` for a fleet of devices running ``bundle`` (its extractor sha256 decides who
    may join); the ServerApp writes its results to ``out``. ``settings``: the other fields of
    :class:`~edgetl.fleet.app.FleetConfig` (head, strategy, rounds …). A bad ``sign_key`` fails here, not at the end
    of the run. Returns the file written and the config."""
    from edgetl.device import DeviceRuntime
    from edgetl.fleet.app import FleetConfig

    if sign_key is not None:
        from edgetl.fleet.trust import sign_head

        sign_head(b"", [], "", sign_key)
    cfg = FleetConfig(extractor_sha256=DeviceRuntime(bundle).extractor_sha256, out=str(Path(out).resolve()),
                      sign_key=str(Path(sign_key).resolve()) if sign_key else "", **settings)
    run_config = {k.replace("_", "-"): v for k, v in asdict(cfg).items()}
    text = _toml.dumps(app_pyproject(run_config), header=APP_HEADER)
    path = Path(app_dir) / "pyproject.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path, cfg


def supernode_executable() -> str:
    """The ``flower-supernode`` program (on PATH, else beside this Python); :class:`RuntimeMissingError` without it."""
    from edgetl.errors import RuntimeMissingError

    exe = shutil.which("flower-supernode") or str(Path(sys.executable).parent / "flower-supernode")
    if not Path(exe).exists():
        raise RuntimeMissingError("flower-supernode is not installed; install it with: pip install 'edgetl[fleet]'")
    return exe


def supernode_command(exe: str, bundle: str | os.PathLike[str], superlink: str, *, insecure: bool = False,
                      root_certificates: str | os.PathLike[str] | None = None,
                      auth_key: str | os.PathLike[str] | None = None, trust: str | os.PathLike[str] | None = None,
                      port: int | None = None, drill: str | None = None) -> list[str]:
    """The command line of a SuperNode for the device ``bundle`` (its node config names the bundle, the trusted key
    and a fault drill as TOML values). A bad ``trust`` key fails here, not at the end of the run."""
    node_config = f"bundle={_toml.string(str(Path(bundle).resolve()))}"
    if trust is not None:
        from edgetl.signing import load_public_key

        load_public_key(trust)
        node_config += f" trust={_toml.string(str(Path(trust).resolve()))}"
    node_config += f" drill={_toml.string(drill)}" if drill else ""
    cmd = [exe, "--superlink", superlink, "--node-config", node_config]
    cmd += ["--insecure"] if insecure else []
    cmd += ["--root-certificates", str(Path(root_certificates).resolve())] if root_certificates else []
    cmd += ["--auth-supernode-private-key", str(Path(auth_key).resolve())] if auth_key else []
    cmd += ["--port", str(port)] if port else []
    return cmd


def adopt_fleet_head(bundle: str | os.PathLike[str], head_dir: str | os.PathLike[str], *, tolerance: float = 0.02,
                     force: bool = False, wait: float = 0.0,
                     trust: str | os.PathLike[str] | None = None) -> tuple[Any, str]:
    """Adopt the fleet head in ``head_dir`` (``head.npz``, ``labels.json``, ``fleet.json``, maybe ``head.sig``) on
    the device ``bundle`` through its promote gate: the head must match the sha256 in ``fleet.json`` and, with
    ``trust``, carry that key's signature. Returns the device's adoption report and the audit text naming the
    signer."""
    from edgetl.device import DeviceRuntime
    from edgetl.errors import DataError
    from edgetl.fleet.app import read_result, verify_fleet_head
    from edgetl.fleet.trust import SIGNATURE_FILE
    from edgetl.keyfiles import read_small_file
    from edgetl.registry import sha256_file
    from edgetl.signing import MAX_SIGNATURE_BYTES

    head_dir = Path(head_dir)
    meta = read_result(head_dir)
    if sha256_file(head_dir / "head.npz") != meta.get("head_sha256"):
        raise DataError(f"{head_dir / 'head.npz'} does not match the sha256 in fleet.json (damaged or replaced); "
                        "fetch the fleet head again")
    try:
        labels = json.loads((head_dir / "labels.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{head_dir / 'labels.json'} is missing or unreadable ({exc})") from exc
    sig_path = head_dir / SIGNATURE_FILE
    signature = read_small_file(sig_path, MAX_SIGNATURE_BYTES, "head signature") if sig_path.is_file() else b""
    runtime = DeviceRuntime(bundle)
    signed = verify_fleet_head((head_dir / "head.npz").read_bytes(), labels, str(meta["extractor_sha256"]), signature,
                               trust, str(head_dir))
    report = runtime.adopt_head(head_dir / "head.npz", labels, source=f"fleet {head_dir}; {signed}",
                                extractor_sha256=meta["extractor_sha256"], tolerance=tolerance, force=force,
                                wait=wait)
    return report, signed


__all__ = ["adopt_fleet_head", "app_pyproject", "supernode_command", "supernode_executable", "write_server_app"]
