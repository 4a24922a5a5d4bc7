"""``edgetl fleet``: head-only federated learning across devices that run the same bundle (Flower; ``edgetl[fleet]``).

- ``simulate``: the whole fleet on one machine in Flower's simulation engine (one SuperNode per bundle);
- ``server``: write a Flower app folder (``pyproject.toml`` naming ``edgetl.fleet.app:server_app`` / ``client_app``
  and the run config) for ``flwr run`` against a SuperLink;
- ``client``: start a Flower SuperNode for one device bundle (``flower-supernode`` with the bundle in its node config);
- ``adopt``: pass a head written by a fleet server through the device's promote gate (verifying its signature against
  the device's trusted key);
- ``certs``: a CA, the SuperLink's TLS certificate and one node-authentication key pair per device.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from click import UsageError

from edgetl.cli._choices import TableChoice, fleet_drills, fleet_heads, fleet_strategies

_bundle_arg = click.argument("bundle", type=click.Path(path_type=Path))


def _head_options(f):  # type: ignore[no-untyped-def]
    f = click.option("--head", type=TableChoice(fleet_heads), default="ncm", show_default=True,
                     help="ncm: exact aggregation of per-class sums and counts; softmax: FedAvgM of L-BFGS steps.")(f)
    f = click.option("--strategy", type=TableChoice(fleet_strategies), default="fedavg", show_default=True,
                     help="softmax: fedavg = Flower's FedAvgM over local L-BFGS steps; lbfgs = federated full-batch "
                          "L-BFGS (devices send loss and gradient each round; the head equals central training).")(f)
    f = click.option("--rounds", type=click.IntRange(min=1), default=60, show_default=True,
                     help="softmax: FedAvg rounds, or at most this many L-BFGS iterations.")(f)
    f = click.option("--momentum", type=click.FloatRange(0, 0.99), default=0.7, show_default=True,
                     help="Server momentum of FedAvgM (softmax; 0 = plain FedAvg).")(f)
    f = click.option("--local-iter", type=click.IntRange(min=1), default=1, show_default=True,
                     help="L-BFGS iterations each device runs per round (softmax); more drift apart on "
                          "non-identical class splits.")(f)
    f = click.option("--min-clients", type=click.IntRange(min=1), default=2, show_default=True,
                     help="Devices (with the fleet's extractor) needed to start.")(f)
    f = click.option("--adopt", is_flag=True, help="Send the aggregated head to every device, through its gate.")(f)
    f = click.option("--force", is_flag=True, help="With --adopt: promote past the devices' gates.")(f)
    return f


def _summary(result: dict) -> str:  # type: ignore[type-arg]
    up = [max(r.values()) for r in result["bytes_up"]] or [0]
    lines = [(f"{result['head']} head over {len(result['accepted'])} device(s), {len(result['classes'])} classes: "
              f"{', '.join(result['classes'])}"),
             (f"rounds: {result['rounds']}, largest upload per device per round: {max(up)} bytes "
              f"(join: {max(result['join_bytes_up'].values(), default=0)} bytes)")]
    for node, reason in result["rejected"].items():
        lines.append(f"rejected device {node}: {reason}")
    for node, reason in result.get("dropped", {}).items():
        lines.append(f"left out device {node}: {reason}")
    if result.get("signer"):
        lines.append(f"head signed by key {result['signer']}")
    for node, adopted in result["adopted"].items():
        if adopted.get("refused"):
            lines.append(f"device {node}: refused the head ({adopted['reason']})")
            continue
        state = "promoted" if adopted["promoted"] else "kept as candidate"
        lines.append(f"device {node}: {adopted['version']} {state} ({adopted['reason']})")
    lines.append(f"wrote {result['head_file']} (+ labels.json, fleet.json)")
    return "\n".join(lines)


@click.group()
def fleet() -> None:
    """Federated head training across devices that share one bundle (Flower): only heads and per-class counts
    travel, never images or embeddings."""


@fleet.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for head.npz, labels.json, "
              "fleet.json.")
@click.option("--server-bundle", type=click.Path(path_type=Path), default=None,
              help="Bundle whose extractor the fleet uses (default: the first BUNDLE).")
@_head_options
@click.option("--json", "as_json", is_flag=True, help="Print fleet.json.")
def simulate(bundles: tuple[Path, ...], out: Path, server_bundle: Path | None, head: str, strategy: str,
             rounds: int, momentum: float, local_iter: int, min_clients: int, adopt: bool, force: bool,
             as_json: bool) -> None:
    """Run a fleet of device BUNDLES on this machine in Flower's simulation engine."""
    from edgetl.device import DeviceRuntime
    from edgetl.fleet.app import FleetConfig, read_result
    from edgetl.fleet.app import simulate as run

    sha = DeviceRuntime(server_bundle or bundles[0]).extractor_sha256
    cfg = FleetConfig(extractor_sha256=sha, out=str(out), head=head, strategy=strategy, rounds=rounds,
                      local_iter=local_iter, momentum=momentum, min_clients=min_clients, adopt=adopt, force=force)
    run([str(b) for b in bundles], cfg)
    result = read_result(out)
    click.echo(json.dumps(result, indent=2) if as_json else _summary(result))


@fleet.command()
@click.option("--bundle", required=True, type=click.Path(path_type=Path),
              help="The fleet's bundle (its extractor sha256 decides who may join).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder the ServerApp writes head.npz, labels.json and fleet.json to (on the SuperLink host).")
@click.option("--app-dir", type=click.Path(path_type=Path), default=Path("edgetl-fleet-app"), show_default=True,
              help="Flower app folder to write.")
@_head_options
@click.option("--timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds to wait for devices (to connect, and to answer each round); a device silent longer is "
                   "left out of the run.")
@click.option("--sign-key", type=click.Path(path_type=Path), default=None,
              help="The operator's Ed25519 private key (edgetl keys generate), on the SuperLink host: signs the "
                   "fleet head (head.sig); devices with a trusted key refuse unsigned heads.")
def server(bundle: Path, out: Path, app_dir: Path, head: str, strategy: str, rounds: int, momentum: float,
           local_iter: int, min_clients: int, adopt: bool, force: bool, timeout: float, sign_key: Path | None) -> None:
    """Write the Flower app for a fleet run, then print the commands that start it (Flower's deployment engine:
    flower-superlink here, `edgetl fleet client` on each device, `flwr run APP-DIR` to submit)."""
    from edgetl.fleet_ops import write_server_app

    path, cfg = write_server_app(bundle, out, app_dir, sign_key=sign_key, head=head, strategy=strategy, rounds=rounds,
                                 local_iter=local_iter, momentum=momentum, min_clients=min_clients, adopt=adopt,
                                 force=force, timeout=timeout)
    click.echo(f"wrote {path} (extractor {cfg.extractor_sha256[:12]}…, {head} head)")
    click.echo("certificates and device keys: edgetl fleet certs CERTS --host THIS-HOST --node DEVICE ...")
    click.echo("start the SuperLink:  flower-superlink --ssl-ca-certfile CERTS/ca.crt --ssl-certfile CERTS/server.crt "
               "--ssl-keyfile CERTS/server.key --enable-supernode-auth --disable-runtime-dependency-installation "
               "--host 0.0.0.0 --port 9093")
    click.echo("register each device: flwr supernode register CERTS/nodes/DEVICE.pub CONNECTION")
    click.echo("on each device:       edgetl fleet client BUNDLE --superlink THIS-HOST:9093 --root-certificates "
               "ca.crt --auth-key DEVICE")
    click.echo(f"submit the run:       flwr run {app_dir} CONNECTION --stream   (CONNECTION: a [superlink.CONNECTION] "
               "in $FLWR_HOME/config.toml with address = \"THIS-HOST:9093\" and root-certificates = \"CERTS/ca.crt\")")


@fleet.command()
@_bundle_arg
@click.option("--superlink", required=True, help="HOST:PORT of the Flower SuperLink (its --port).")
@click.option("--insecure", is_flag=True, help="Plain HTTP (testing only); else pass --root-certificates.")
@click.option("--root-certificates", type=click.Path(path_type=Path), default=None,
              help="CA certificate (PEM) that signed the SuperLink's certificate (edgetl fleet certs: ca.crt).")
@click.option("--auth-key", type=click.Path(path_type=Path), default=None,
              help="This device's node-authentication private key (edgetl fleet certs: nodes/NAME); its public key "
                   "must be registered with the SuperLink.")
@click.option("--trust", type=click.Path(path_type=Path), default=None, envvar="EDGETL_TRUST",
              help="The operator's public key (KEY.pub): adopt only fleet heads it signed [env EDGETL_TRUST].")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Local port of the SuperNode's runtime API (default 9094; one per SuperNode on a machine).")
@click.option("--drill", type=TableChoice(fleet_drills), default=None,
              help="Rehearse a fault on a staging fleet: at its first training reply the device crashes, stalls, or "
                   "sends NaNs or a misshapen update.")
@click.option("--dry-run", is_flag=True, help="Check the bundle and print the SuperNode command without running it.")
def client(bundle: Path, superlink: str, insecure: bool, root_certificates: Path | None, auth_key: Path | None,
           trust: Path | None, port: int | None, drill: str | None, dry_run: bool) -> None:
    """Start a Flower SuperNode for the device BUNDLE (its head's training embeddings stay on the device)."""
    from edgetl.device import DeviceRuntime
    from edgetl.fleet.app import local_data
    from edgetl.fleet_ops import supernode_command, supernode_executable

    runtime = DeviceRuntime(bundle)
    data = local_data(runtime)  # fails clearly when no head was trained here
    exe = supernode_executable()
    if insecure and (root_certificates or auth_key):
        raise UsageError("--insecure turns TLS off; drop it to use --root-certificates or --auth-key")
    cmd = supernode_command(exe, bundle, superlink, insecure=insecure, root_certificates=root_certificates,
                            auth_key=auth_key, trust=trust, port=port, drill=drill)
    click.echo(f"device {bundle}: extractor {runtime.extractor_sha256[:12]}…, {len(data.y)} training embeddings, "
               f"classes {', '.join(data.classes)}")
    click.echo(" ".join(cmd), err=not dry_run)
    if not dry_run:
        sys.stdout.flush()
        os.execv(cmd[0], cmd)


@fleet.command()
@_bundle_arg
@click.option("--head", "head_dir", required=True, type=click.Path(path_type=Path),
              help="Folder written by a fleet server (head.npz, labels.json, fleet.json).")
@click.option("--tolerance", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="Promote gate: largest accuracy loss against the current head.")
@click.option("--force", is_flag=True, help="Promote even if the gate would keep it as a candidate.")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds to wait for another trainer to finish.")
@click.option("--trust", type=click.Path(path_type=Path), default=None, envvar="EDGETL_TRUST",
              help="The operator's public key (KEY.pub): refuse a head it did not sign (head.sig) [env EDGETL_TRUST].")
def adopt(bundle: Path, head_dir: Path, tolerance: float, force: bool, wait: float, trust: Path | None) -> None:
    """Adopt a fleet head on the device BUNDLE through its promote gate (with --trust: only a head signed by the
    operator's key; the audit log names the signer)."""
    from edgetl.fleet_ops import adopt_fleet_head

    report, signed = adopt_fleet_head(bundle, head_dir, tolerance=tolerance, force=force, wait=wait, trust=trust)
    state = "promoted" if report.promoted else "kept as candidate"
    acc = f", accuracy on local data {report.val_accuracy:.3f}" if report.val_accuracy is not None else ""
    click.echo(f"{report.version} {state}: {report.reason}{acc} ({signed})")


@fleet.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--host", "hosts", multiple=True, default=("localhost", "127.0.0.1"), show_default=True,
              help="Name or IP address the devices use to reach the SuperLink (repeat; the server certificate "
                   "covers each).")
@click.option("--node", "nodes", multiple=True, help="A device name: writes its node-authentication key pair "
              "nodes/NAME and nodes/NAME.pub (repeat).")
@click.option("--days", type=click.IntRange(min=1), default=365, show_default=True, help="Certificate validity.")
def certs(out: Path, hosts: tuple[str, ...], nodes: tuple[str, ...], days: int) -> None:
    """Write a fleet's certificate authority (OUT/ca.crt), the SuperLink's TLS certificate (OUT/server.crt, .key)
    and one node-authentication key pair per --node (OUT/nodes/NAME, NAME.pub). Run again with new --node names to
    add devices."""
    from edgetl.fleet.certs import make_certs

    made = make_certs(out, hosts=hosts, nodes=nodes, days=days)
    click.echo(f"CA {made.ca_cert} (give it to every device and to flwr; keep {made.ca_key.name} offline)")
    click.echo(f"SuperLink {made.server_cert}, {made.server_key} for {', '.join(hosts)}")
    for name, (private, public) in made.node_keys.items():
        click.echo(f"device {name}: private key {private} (copy to the device), public key {public} "
                   "(flwr supernode register)")
