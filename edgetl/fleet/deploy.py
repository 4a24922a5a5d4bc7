"""A whole fleet on Flower's deployment engine on one machine, over loopback, with TLS and node authentication: the
scripted rehearsal of a real deployment (``tools/fleet_deploy.py``, the deploy test) and the reference for the steps
in docs/fleet.md.

Every part is its own process, started the way an operator starts it on real machines:

1. ``flower-superlink`` with the TLS certificate of :func:`edgetl.fleet.certs.make_certs` and
   ``--enable-supernode-auth`` (only registered device keys may connect);
2. ``flwr supernode register KEY.pub`` for each device the operator admits;
3. ``edgetl fleet client BUNDLE --root-certificates ca.crt --auth-key KEY`` per device (a ``flower-supernode``);
4. ``edgetl fleet server`` writes the Flower app, ``flwr run APP CONNECTION --stream`` submits it.

:class:`LoopbackFleet` binds only 127.0.0.1, runs every process in its own session, and stops each one it started
(and their children: Flower's SuperExec, ServerApp and ClientApp processes) when closed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from edgetl.errors import EdgeTLError
from edgetl.fleet.certs import FleetCerts

log = logging.getLogger(__name__)

CONNECTION = "fleet"  #: the name of the SuperLink connection in FLWR_HOME/config.toml


@dataclass(frozen=True)
class LoopbackDevice:
    """One device of a loopback fleet: its bundle, its node key name (in ``certs.node_keys``), whether the operator
    registers its key, an optional fault drill and the operator key it trusts for fleet heads."""

    name: str
    bundle: Path
    register: bool = True
    drill: str = ""
    trust: Path | None = None


@dataclass
class LoopbackRun:
    """What a loopback run did."""

    run_id: str
    status: str  #: Flower's run status, e.g. "finished:completed"
    fleet: dict[str, Any]  #: the ServerApp's fleet.json
    node_ids: dict[str, int] = field(default_factory=dict)  #: device name → SuperLink node id (registered ones)
    refused: dict[str, str] = field(default_factory=dict)  #: device name → why its SuperNode did not connect
    seconds: dict[str, float] = field(default_factory=dict)  #: "start" (SuperLink and SuperNodes up), "run"
    traffic: dict[str, Any] = field(default_factory=dict)  #: Flower's network-traffic and compute-time of the run


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class LoopbackFleet:
    """SuperLink, SuperNodes and the ``flwr`` CLI as processes on 127.0.0.1 (use as a context manager)."""

    def __init__(self, work: str | os.PathLike[str], certs: FleetCerts, python: str = sys.executable) -> None:
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.certs = certs
        self.python = python
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.node_ids: dict[str, int] = {}
        self.home = self.work / "flwr-home"
        self.home.mkdir(exist_ok=True)
        bindir = str(Path(python).parent)
        self.env = dict(os.environ, FLWR_HOME=str(self.home), PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
                        PYTHONUNBUFFERED="1")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = {json.dumps(str(certs.ca_cert))}\n',
            encoding="utf-8")

    # ------------------------------------------------------------------------------------------------ processes
    def _start(self, name: str, cmd: Sequence[str]) -> subprocess.Popen[bytes]:
        log_file = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - the process owns it until close()
        proc = subprocess.Popen(list(cmd), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env, cwd=self.work, start_new_session=True)
        log_file.close()
        self.procs[name] = proc
        return proc

    def _flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        exe = str(Path(self.python).parent / "flwr")
        return subprocess.run([exe, *args], check=False, capture_output=True, text=True, env=self.env,
                              cwd=self.work, timeout=timeout, stdin=subprocess.DEVNULL)

    def log_text(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_superlink(self, timeout: float = 120.0) -> None:
        """Start the SuperLink (TLS, node authentication) and wait until it accepts connections."""
        c = self.certs
        self._start("superlink", [str(Path(self.python).parent / "flower-superlink"),
                                  "--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.server_cert),
                                  "--ssl-keyfile", str(c.server_key), "--enable-supernode-auth",
                                  "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--database", str(self.work / "superlink.db")])
        deadline = time.monotonic() + timeout
        while "Application startup complete" not in self.log_text("superlink"):
            if self.procs["superlink"].poll() is not None or time.monotonic() > deadline:
                raise EdgeTLError(f"the SuperLink did not start within {timeout:.0f} s; see "
                                  f"{self.work / 'superlink.log'}")
            time.sleep(0.5)

    def register(self, device: LoopbackDevice) -> int:
        """``flwr supernode register`` the device's public key; returns its node id."""
        public = self.certs.node_keys[device.name].public
        done = self._flwr("supernode", "register", str(public), CONNECTION, "--name", device.name, "--format",
                          "json")
        try:
            node_id = int(json.loads(done.stdout[done.stdout.index("{"):])["node-id"])
        except (ValueError, KeyError) as exc:
            raise EdgeTLError(f"flwr supernode register failed for {device.name}: {done.stdout} {done.stderr}") \
                from exc
        self.node_ids[device.name] = node_id
        return node_id

    def start_device(self, device: LoopbackDevice) -> None:
        """Start the device's SuperNode with ``edgetl fleet client`` (TLS, its node key, its own runtime port)."""
        cmd = [self.python, "-m", "edgetl.cli", "fleet", "client", str(device.bundle), "--superlink",
               f"127.0.0.1:{self.port}", "--root-certificates", str(self.certs.ca_cert), "--auth-key",
               str(self.certs.node_keys[device.name].private), "--port", str(free_port())]
        cmd += ["--trust", str(device.trust)] if device.trust else []
        cmd += ["--drill", device.drill] if device.drill else []
        self._start(f"device-{device.name}", cmd)

    def online(self) -> set[int]:
        """Node ids the SuperLink lists as online."""
        done = self._flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            nodes = json.loads(done.stdout[done.stdout.index("{"):]).get("nodes", [])
        except ValueError:
            return set()
        return {int(n["node-id"]) for n in nodes if n.get("status") == "online"}

    def wait_online(self, names: Sequence[str], timeout: float = 180.0) -> None:
        want = {self.node_ids[n] for n in names}
        deadline = time.monotonic() + timeout
        while not want <= self.online():
            if time.monotonic() > deadline:
                raise EdgeTLError(f"devices {', '.join(names)} were not all online within {timeout:.0f} s; see the "
                                  f"device-*.log files in {self.work}")
            time.sleep(2.0)

    def wait_refused(self, name: str, timeout: float = 180.0) -> str:
        """Wait until the device's SuperNode gives up; return the reason from its log ("" if it still runs)."""
        proc, deadline = self.procs[f"device-{name}"], time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1.0)
        if proc.poll() is None:
            return ""
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log_text(f"device-{name}"))  # Flower colours its log
        lines = [ln.strip() for ln in text.splitlines() if "Failed" in ln or "code:" in ln or "Exit Code" in ln]
        return " ".join(lines) or f"exited with code {proc.returncode}"

    def run(self, app_dir: Path, timeout: float = 600.0) -> tuple[str, str, dict[str, Any]]:
        """``flwr run APP CONNECTION --stream``; returns (run id, Flower's run status, its traffic record)."""
        try:
            done = self._flwr("run", str(app_dir), CONNECTION, "--stream", timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise EdgeTLError(f"flwr run did not finish within {timeout:.0f} s; see {self.work}") from exc
        (self.work / "run.log").write_text(done.stdout + done.stderr, encoding="utf-8")
        text = done.stdout + done.stderr
        marker = "Successfully started run "
        if marker not in text:
            raise EdgeTLError(f"flwr run did not start a run: {text[-2000:]}")
        run_id = text.split(marker, 1)[1].split()[0]
        status, record = "", {}
        deadline = time.monotonic() + 120.0
        while not status.startswith("finished") and time.monotonic() < deadline:
            listed = self._flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json")
            try:
                runs = json.loads(listed.stdout[listed.stdout.index("{"):]).get("runs", [])
            except ValueError:
                runs = []
            record = runs[0] if runs else {}
            status = str(record.get("status", ""))
            if not status.startswith("finished"):
                time.sleep(2.0)
        return run_id, status, {k: record.get(k) for k in ("network-traffic", "compute-time", "elapsed")}

    # ------------------------------------------------------------------------------------------------- stopping
    def close(self, grace: float = 10.0) -> None:
        """Stop every process started here and their children (SIGTERM, then SIGKILL after ``grace`` seconds)."""
        pids: list[int] = []
        for proc in self.procs.values():
            if proc.poll() is None:
                pids += [proc.pid, *_descendants(proc.pid)]
        for pid in reversed(pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                log.warning("process %s did not stop", proc.pid)
        self.procs.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_loopback(work: str | os.PathLike[str], certs: FleetCerts, devices: Sequence[LoopbackDevice],
                 server_bundle: Path, out: Path, server_args: Sequence[str] = (), run_timeout: float = 600.0,
                 python: str = sys.executable) -> LoopbackRun:
    """Start a loopback fleet, run one ``flwr run`` of the edgetl app (``edgetl fleet server`` with
    ``server_args``), stop everything; returns the run's record. Devices with ``register=False`` are expected to be
    refused by the SuperLink."""
    work = Path(work)
    t0 = time.perf_counter()
    with LoopbackFleet(work, certs, python) as fleet:
        fleet.start_superlink()
        for device in devices:
            if device.register:
                fleet.register(device)
        for device in devices:
            fleet.start_device(device)
        admitted = [d.name for d in devices if d.register]
        fleet.wait_online(admitted)
        refused = {d.name: fleet.wait_refused(d.name) for d in devices if not d.register}
        app = work / "app"
        made = subprocess.run([python, "-m", "edgetl.cli", "fleet", "server", "--bundle", str(server_bundle),
                               "--out", str(out), "--app-dir", str(app), *server_args], check=False,
                              capture_output=True, text=True, env=fleet.env, timeout=120, stdin=subprocess.DEVNULL)
        if made.returncode != 0:
            raise EdgeTLError(f"edgetl fleet server failed: {made.stdout} {made.stderr}")
        started = time.perf_counter()
        run_id, status, traffic = fleet.run(app, timeout=run_timeout)
        seconds = {"start": round(started - t0, 1), "run": round(time.perf_counter() - started, 1)}
        node_ids = dict(fleet.node_ids)
    result = json.loads((out / "fleet.json").read_text()) if (out / "fleet.json").exists() else {}
    return LoopbackRun(run_id, status, result, node_ids, refused, seconds, traffic)
