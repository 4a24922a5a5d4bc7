"""Flower apps for head-only federated learning across a fleet of devices that run the same bundle.

Flower (``flwr``, Message API) carries every message; edgetl adds only what a device computes and how the server
combines it (:mod:`edgetl.fleet.core`). One run:

1. ``query.join`` — the server sends its extractor sha256; each device answers with its own, and, only when they
   match, its class names, per-class counts and feature sums. A device with another extractor is rejected (its
   embeddings live in another space) and takes no further part.
2. NCM head: ``train.ncm`` (per-class sums and counts around the global centre, summed exactly) then
   ``query.ncm_scale`` (a few Newton steps of the softmax-scale fit on derivatives summed over the devices).
   Softmax head, ``strategy="fedavg"``: Flower's FedAvgM strategy (FedAvg with server momentum) for ``rounds``
   rounds, each device running ``local_iter`` L-BFGS iterations from the global head, weighted by its share of the
   global class-balanced objective. ``strategy="lbfgs"``: federated full-batch L-BFGS — each round every device
   returns its term of the global objective and its gradient at the server's head (``train.gradient``); the server
   runs :class:`~edgetl.heads.SoftmaxHead`'s own L-BFGS on the sums (at most ``rounds`` iterations), so the head is
   the central one.
3. The server writes ``head.npz``, ``labels.json`` and ``fleet.json`` to its output folder; with ``adopt`` it also
   sends the head to every device (``query.adopt``), which passes it through its own promote gate
   (:meth:`edgetl.DeviceRuntime.adopt_head`).

Deployment follows Flower's conventions: the ``ServerApp`` is :data:`server_app` and the ``ClientApp`` is
:data:`client_app` (``edgetl.fleet.app:server_app`` / ``edgetl.fleet.app:client_app``); each SuperNode names its bundle
in its node config (``--node-config "bundle='/data/bundle'"``), the run config carries the server settings
(:class:`FleetConfig`). ``edgetl fleet simulate`` runs the same apps in Flower's simulation engine on one machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from edgetl._atomic import atomic_write, atomic_write_json
from edgetl.errors import DataError, EdgeTLError
from edgetl.fleet import core
from edgetl.heads import NCMHead, SoftmaxHead
from edgetl.heads.prototype import ScaleSearch
from edgetl.heads.softmax import LinearWeights, add_l2
from edgetl.optim import lbfgs

log = logging.getLogger(__name__)

HEAD_KINDS = ("ncm", "softmax")
SOFTMAX_STRATEGIES = ("fedavg", "lbfgs")


def _flwr():  # type: ignore[no-untyped-def]
    try:
        import flwr  # noqa: F401
    except ImportError as exc:
        from edgetl.errors import RuntimeMissingError

        raise RuntimeMissingError("federated learning needs Flower; install it with: pip install 'edgetl[fleet]'") \
            from exc
    from flwr import app as flwr_app

    return flwr_app


@dataclass(frozen=True)
class FleetConfig:
    """Server settings (also read from a Flower run config: keys with ``-`` instead of ``_``)."""

    extractor_sha256: str
    out: str
    head: str = "ncm"
    strategy: str = "fedavg"  #: softmax: "fedavg" (Flower's FedAvgM) or "lbfgs" (federated full-batch L-BFGS)
    rounds: int = 60
    local_iter: int = 1
    momentum: float = 0.7
    l2: float = 0.05
    min_clients: int = 2
    adopt: bool = False
    force: bool = False
    timeout: float = 600.0
    sign_key: str = ""  #: the operator's Ed25519 private key (PEM, on the SuperLink host): signs the fleet head

    def __post_init__(self) -> None:
        if self.head not in HEAD_KINDS:
            raise DataError(f"fleet head must be one of {', '.join(HEAD_KINDS)}, found {self.head!r}")
        if self.strategy not in SOFTMAX_STRATEGIES:
            raise DataError(f"softmax strategy must be one of {', '.join(SOFTMAX_STRATEGIES)}, found "
                            f"{self.strategy!r}")
        if self.rounds < 1 or self.local_iter < 1 or self.min_clients < 1:
            raise DataError("rounds, local_iter and min_clients must be at least 1")

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> FleetConfig:
        known = {f.name for f in fields(cls)}
        values = {k.replace("-", "_"): v for k, v in run_config.items() if k.replace("-", "_") in known}
        if "extractor_sha256" not in values and "bundle" in run_config:
            values["extractor_sha256"] = _bundle_sha256(str(run_config["bundle"]))
        missing = {"extractor_sha256", "out"} - set(values)
        if missing:
            raise DataError(f"fleet run config lacks {', '.join(sorted(missing))}; pass --run-config "
                            "\"bundle='BUNDLE' out='DIR'\"")
        return cls(**values)


@dataclass
class FleetResult:
    """What a run did: accepted and rejected devices, rounds, bytes each device sent per round, the head written."""

    head: str
    classes: list[str]
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)  #: accepted, then left out: crashed, silent or bad update
    rounds: int = 0
    bytes_up: list[dict[str, int]] = field(default_factory=list)  #: per round: node id → bytes it sent
    bytes_down: list[dict[str, int]] = field(default_factory=list)  #: per round: node id → bytes it received
    round_seconds: list[float] = field(default_factory=list)  #: per round: send to last reply, seconds
    join_bytes_up: dict[str, int] = field(default_factory=dict)  #: node id → bytes of its join reply (stats)
    adopted: dict[int, dict[str, Any]] = field(default_factory=dict)
    head_file: str = ""
    head_sha256: str = ""
    signer: str = ""  #: fingerprint of the key that signed the head ("" when unsigned)
    extractor_sha256: str = ""
    seconds: float = 0.0


def _bundle_sha256(bundle: str) -> str:
    from edgetl.device import DeviceRuntime

    return DeviceRuntime(bundle).extractor_sha256


# ------------------------------------------------------------------------------------------------------ the device
_LOCAL: dict[tuple[str, str | None], core.LocalData] = {}


_RUNTIMES: dict[str, Any] = {}


def _runtime(bundle: str):  # type: ignore[no-untyped-def]
    """The device's runtime, opened (and its bundle verified) once per process, not on every Flower message; it
    reads the head state afresh on each call."""
    if bundle not in _RUNTIMES:
        from edgetl.device import DeviceRuntime

        _RUNTIMES[bundle] = DeviceRuntime(bundle)
    return _RUNTIMES[bundle]


def local_data(runtime: Any) -> core.LocalData:
    """The current head's training embeddings from the device's store (cached per bundle and head version)."""
    key = (str(runtime.bundle.path), runtime.current_version())
    if key not in _LOCAL:
        X, _, y, classes = runtime.training_set()
        _LOCAL[key] = core.LocalData(X.astype(np.float32), y.astype(np.int64), list(classes))
    return _LOCAL[key]


def _bundle_for(context: Any, bundles: Sequence[str] | None) -> str:
    node = dict(context.node_config)
    if "bundle" in node:
        return str(node["bundle"])
    if bundles is not None and "partition-id" in node:
        return str(bundles[int(node["partition-id"]) % len(bundles)])
    raise DataError("this Flower SuperNode names no bundle; start it with --node-config \"bundle='/path/to/bundle'\"")


DRILLS = ("crash", "nan", "shape", "slow")


def _drill(context: Any, stage: str) -> str:
    """A fault this SuperNode was told to rehearse (node config ``drill``; ``edgetl fleet client --drill``), applied at
    the device's first training reply: ``crash`` ends the ClientApp process mid-round, ``slow`` sleeps past any round
    timeout, ``nan`` / ``shape`` send a poisoned or misshapen update. Returns the drill to apply to the reply ("" for
    none)."""
    drill = str(dict(context.node_config).get("drill", ""))
    if not drill:
        return ""
    if drill not in DRILLS:
        raise DataError(f"unknown fleet drill {drill!r}; use one of {', '.join(DRILLS)}")
    log.warning("fleet drill %r at %s", drill, stage)
    if drill == "crash":
        os._exit(70)  # the process dies without a reply, as on a power cut
    if drill == "slow":
        time.sleep(float(dict(context.node_config).get("drill-seconds", 3600.0)))
    return drill


def _poison(drill: str, array: np.ndarray) -> np.ndarray:
    if drill == "nan":
        array = np.array(array, copy=True)
        array.reshape(-1)[0] = np.nan
    elif drill == "shape":
        array = np.asarray(array)[..., :-1]
    return array


def make_client_app(bundles: Sequence[str | os.PathLike[str]] | None = None):  # type: ignore[no-untyped-def]
    """The Flower ``ClientApp`` of a device. Its bundle comes from the node config (``bundle``) or, in a simulation,
    from ``bundles[partition-id]``."""
    fa = _flwr()
    from flwr.clientapp import ClientApp

    device = _Device(fa, [str(b) for b in bundles] if bundles is not None else None)
    app = ClientApp()
    app.query("join")(device.join)
    app.train("ncm")(device.ncm_sums)
    app.query("ncm_scale")(device.ncm_scale)
    app.train()(device.softmax_round)
    app.train("gradient")(device.gradient)
    app.query("adopt")(device.adopt)
    return app


@dataclass(frozen=True)
class _Device:
    """A device's answers to the server's messages (one method per message type of :func:`make_client_app`)."""

    fa: Any  #: ``flwr.app``
    paths: list[str] | None  #: bundles of a simulation, by partition id (None: the node config names the bundle)

    def _checked(self, msg: Any, context: Any) -> tuple[Any, core.LocalData]:
        """This device's runtime and training data, after checking it runs the fleet's extractor."""
        runtime = _runtime(_bundle_for(context, self.paths))
        expected = str(msg.content["config"]["extractor_sha256"])
        if expected != runtime.extractor_sha256:
            raise DataError(f"this device's extractor {runtime.extractor_sha256[:12]}… is not the fleet's "
                            f"{expected[:12]}…; it takes no part in the round")
        return runtime, local_data(runtime)

    def _reply(self, msg: Any, **records: Any) -> Any:
        return self.fa.Message(self.fa.RecordDict(records), reply_to=msg)

    def _arrays(self, **arrays: np.ndarray) -> Any:
        return self.fa.ArrayRecord({name: self.fa.Array(value) for name, value in arrays.items()})

    def join(self, msg: Any, context: Any) -> Any:
        """``query.join``: this device's extractor sha256 and, when it is the fleet's, its :class:`DeviceStats`."""
        fa = self.fa
        runtime = _runtime(_bundle_for(context, self.paths))
        expected = str(msg.content["config"]["extractor_sha256"])
        if expected != runtime.extractor_sha256:
            log.warning("fleet: rejected, extractor %s differs from the server's %s", runtime.extractor_sha256[:12],
                        expected[:12])
            return self._reply(msg, config=fa.ConfigRecord({"extractor_sha256": runtime.extractor_sha256,
                                                             "accepted": False}))
        data = local_data(runtime)
        stats = core.local_stats(data)
        config = fa.ConfigRecord({"extractor_sha256": runtime.extractor_sha256, "accepted": True,
                                  "classes": list(data.classes)})
        return self._reply(msg, config=config, arrays=self._arrays(**stats.arrays()))

    def ncm_sums(self, msg: Any, context: Any) -> Any:
        """``train.ncm``: per-class sums and counts around the fleet's centre."""
        _, data = self._checked(msg, context)
        union = list(msg.content["config"]["classes"])
        sums, counts = core.local_ncm_sums(data, union, msg.content["arrays"]["centre"].numpy())
        sums = _poison(_drill(context, "train.ncm"), sums)
        return self._reply(msg, arrays=self._arrays(sums=sums, counts=counts))

    def ncm_scale(self, msg: Any, context: Any) -> Any:
        """``query.ncm_scale``: the moments of the scale fit at the server's scale."""
        _, data = self._checked(msg, context)
        cfg = msg.content["config"]
        arrays = msg.content["arrays"]
        head = NCMHead.from_sums(arrays["centre"].numpy(), arrays["sums"].numpy(), arrays["counts"].numpy(), 1.0)
        moments = core.local_scale_moments(data, list(cfg["classes"]), head, float(cfg["scale"]))
        return self._reply(msg, arrays=self._arrays(moments=moments))

    def softmax_round(self, msg: Any, context: Any) -> Any:
        """``train`` (FedAvgM): a few local L-BFGS iterations from the global head, and this device's share."""
        _, data = self._checked(msg, context)
        cfg = msg.content["config"]
        arrays = msg.content["arrays"]
        coef, intercept, share = core.local_softmax_round(
            data, list(cfg["classes"]), arrays["coef"].numpy(), arrays["intercept"].numpy(),
            np.asarray(cfg["mean"], np.float32), np.asarray(cfg["std"], np.float32),
            np.asarray(cfg["class_weights"], np.float64), float(cfg["l2"]), int(cfg["local_iter"]))
        coef = _poison(_drill(context, "train"), coef)
        return self._reply(msg, arrays=self._arrays(coef=coef, intercept=intercept),
                           metrics=self.fa.MetricRecord({"share": share, "num-examples": len(data.y)}))

    def gradient(self, msg: Any, context: Any) -> Any:
        """``train.gradient`` (federated L-BFGS): this device's term of the objective and its gradient."""
        _, data = self._checked(msg, context)
        cfg = msg.content["config"]
        loss, grad = core.local_softmax_gradient(
            data, list(cfg["classes"]), msg.content["arrays"]["theta"].numpy(), np.asarray(cfg["mean"], np.float32),
            np.asarray(cfg["std"], np.float32), np.asarray(cfg["class_weights"], np.float64))
        grad = _poison(_drill(context, "train.gradient"), grad)
        return self._reply(msg, arrays=self._arrays(grad=grad.astype(np.float32)),
                           metrics=self.fa.MetricRecord({"loss": loss}))

    def adopt(self, msg: Any, context: Any) -> Any:
        """``query.adopt``: the fleet head, checked against this device's trusted key, through its promote gate."""
        runtime, _ = self._checked(msg, context)
        cfg = msg.content["config"]
        head, labels = bytes(cfg["head"]), [str(c) for c in cfg["classes"]]
        signature = bytes(cfg["signature"]) if "signature" in cfg else b""
        trust = str(dict(context.node_config).get("trust", ""))
        try:
            signed = verify_fleet_head(head, labels, str(cfg["extractor_sha256"]), signature, trust or None,
                                       "from the fleet server")
        except EdgeTLError as exc:
            log.warning("fleet: head refused: %s", exc)
            runtime.versions.log("fleet_head_refused", reason=str(exc), source=str(cfg["source"]))
            return self._reply(msg, config=self.fa.ConfigRecord({"version": "", "promoted": False, "refused": True,
                                                                 "reason": str(exc), "local_accuracy": -1.0}))
        with tempfile.TemporaryDirectory(prefix="edgetl-fleet-") as tmp:
            path = Path(tmp) / "head.npz"
            path.write_bytes(head)
            report = runtime.adopt_head(path, labels, source=f"{cfg['source']}; {signed}",
                                        extractor_sha256=str(cfg["extractor_sha256"]), force=bool(cfg["force"]),
                                        wait=30.0)
        reply = self.fa.ConfigRecord({"version": report.version, "promoted": report.promoted, "reason": report.reason,
                                      "refused": False, "signer": signed,
                                      "local_accuracy": -1.0 if report.val_accuracy is None else report.val_accuracy})
        return self._reply(msg, config=reply)


def verify_fleet_head(head: bytes, labels: Sequence[str], extractor_sha256: str, signature: bytes,
                      trust: str | os.PathLike[str] | None, where: str) -> str:
    """The device's check of a fleet head before its promote gate. With a trusted key (``trust``) the head must
    carry that key's signature (else :class:`~edgetl.errors.BundleError`); returns the audit text naming the signer
    ("signed by KEY-FINGERPRINT (trusted key PATH)" or, without a trusted key, that no signature was checked)."""
    if trust is None:
        if signature:
            return "signature not checked (this device has no trusted key)"
        return "unsigned; not checked (this device has no trusted key)"
    from edgetl.fleet.trust import verify_head

    signer = verify_head(head, labels, extractor_sha256, signature, trust, where)
    return f"signed by {signer} (trusted key {trust})"


# ------------------------------------------------------------------------------------------------------ the server
def _content_digest(reply: Any) -> str:
    """sha256 over a reply's arrays (name and bytes, in name order): a key that orders replies by what they say."""
    digest = hashlib.sha256()
    arrays = reply.content["arrays"]
    for name in sorted(arrays.keys()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name].numpy()).tobytes())
    return digest.hexdigest()


def _content_digest_of(content: Any) -> str:
    """:func:`_content_digest` of a reply's content."""
    return _content_digest(SimpleNamespace(content=content))


def _bytes(content: Any) -> int:
    """Payload bytes of a message's records (arrays, metrics, configs) as Flower counts them."""
    total = 0
    for records in (content.array_records, content.metric_records, content.config_records):
        total += sum(r.count_bytes() for r in records.values())
    return total


def check_arrays(content: Any, shapes: dict[str, tuple[int, ...]]) -> str:
    """Why a device's reply cannot be aggregated ("" when it can): each named array present, of the expected shape,
    and finite (a NaN or an infinity in one update would poison the fleet's head)."""
    try:
        arrays = content["arrays"]
    except KeyError:
        return "its reply carries no arrays"
    for name, shape in shapes.items():
        if name not in arrays:
            return f"its update lacks {name!r}"
        value = arrays[name].numpy()
        if tuple(value.shape) != tuple(shape):
            return f"its {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            return f"its {name!r} holds {int((~np.isfinite(value)).sum())} NaN or infinite value(s)"
        if value.dtype.kind in "iu" and (value < 0).any():
            return f"its {name!r} holds negative counts"
    return ""


def _drop(result: FleetResult, node: int, reason: str) -> None:
    result.dropped[int(node)] = reason
    log.warning("fleet: device %s left out: %s", node, reason)


def _exchange(grid: Any, nodes: Iterable[int], message_type: str, content_for: Any, timeout: float,
              result: FleetResult, count: bool = True, shapes: dict[str, tuple[int, ...]] | None = None
              ) -> dict[int, Any]:
    """Send one message to each node and collect the replies. A device that fails (its ClientApp crashed or raised),
    does not answer within ``timeout`` or sends an update that :func:`check_arrays` refuses (``shapes``) is left out
    of the run, with the reason in ``result.dropped``. Returns node → reply content of the others."""
    fa = _flwr()
    nodes = [int(n) for n in nodes]
    messages, down = [], {}
    for node in nodes:
        content = content_for(node)
        down[str(node)] = _bytes(content)
        messages.append(fa.Message(content=content, dst_node_id=node, message_type=message_type))
    replies, answered = {}, set()
    start = time.perf_counter()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = int(reply.metadata.src_node_id)
        answered.add(node)
        if reply.has_error():
            _drop(result, node, f"failed in {message_type}: {reply.error.reason}")
            continue
        reason = check_arrays(reply.content, shapes) if shapes else ""
        if reason:
            _drop(result, node, f"update rejected in {message_type}: {reason}")
            continue
        replies[node] = reply.content
    for node in sorted(set(nodes) - answered):
        _drop(result, node, f"no answer to {message_type} within {timeout:.0f} s (crashed, offline or too slow)")
    if count:
        result.bytes_down.append(down)
        result.bytes_up.append({str(n): _bytes(c) for n, c in replies.items()})
        result.round_seconds.append(round(time.perf_counter() - start, 3))
        result.rounds += 1
    return replies


def _alive(result: FleetResult, cfg: FleetConfig) -> list[int]:
    """The accepted devices not left out so far; at least ``min_clients`` of them, else the run stops."""
    alive = [n for n in result.accepted if n not in result.dropped]
    if len(alive) < cfg.min_clients:
        reasons = "; ".join(f"{n}: {r}" for n, r in result.dropped.items())
        raise EdgeTLError(f"only {len(alive)} device(s) left, fewer than --min-clients {cfg.min_clients} "
                          f"(left out: {reasons})")
    return alive


def _wait_for_nodes(grid: Any, min_clients: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= min_clients:
            return nodes
        if time.monotonic() > deadline:
            raise EdgeTLError(f"only {len(nodes)} of {min_clients} devices connected within {timeout:.0f} s; start "
                              "more clients or lower --min-clients")
        time.sleep(1.0)


def run_server(grid: Any, cfg: FleetConfig) -> FleetResult:
    """The server side of one fleet run on a Flower ``Grid``; writes the head to ``cfg.out`` and returns the record."""
    start = time.perf_counter()
    result = FleetResult(head=cfg.head, classes=[], extractor_sha256=cfg.extractor_sha256)
    stats = core.merge_stats(_join(grid, cfg, result))
    result.classes = stats.classes
    head = _ncm(grid, cfg, stats, result) if cfg.head == "ncm" else _SOFTMAX[cfg.strategy](grid, cfg, stats, result)
    written = _write_head(Path(cfg.out), head, stats.classes, cfg, result)
    if cfg.adopt:
        _adopt(grid, cfg, stats.classes, written, result)
    result.seconds = round(time.perf_counter() - start, 2)
    atomic_write_json(Path(cfg.out) / "fleet.json", asdict(result) | {
        "config": asdict(cfg), "n_samples": stats.n, "class_counts": stats.counts.tolist()})
    return result


def _config(cfg: FleetConfig, **values: Any) -> Any:
    """A message's config record: the fleet's extractor sha256 and ``values``."""
    return _flwr().ConfigRecord({"extractor_sha256": cfg.extractor_sha256} | values)


def _join(grid: Any, cfg: FleetConfig, result: FleetResult) -> list[core.DeviceStats]:
    """``query.join`` to every connected device: the statistics of those that run the fleet's extractor and send
    well-formed ones (``result.accepted``); the others are rejected (``result.rejected``)."""
    fa = _flwr()
    nodes = _wait_for_nodes(grid, cfg.min_clients, cfg.timeout)
    joined = _exchange(grid, nodes, "query.join", lambda n: fa.RecordDict({"config": _config(cfg)}), cfg.timeout,
                       result, count=False)
    for node in list(result.dropped):  # failed or silent at join: never accepted
        result.rejected[node] = result.dropped.pop(node)
    result.join_bytes_up = {str(n): _bytes(c) for n, c in joined.items()}
    reports = []
    for node, content in sorted(joined.items()):
        reason = _join_refusal(content, cfg)
        if reason:
            result.rejected[node] = reason
            log.warning("fleet: device %s rejected: %s", node, reason)
            continue
        result.accepted.append(node)
        arrays = content["arrays"]
        reports.append(core.DeviceStats.from_arrays(content["config"]["classes"], {k: arrays[k].numpy()
                                                                                   for k in arrays}))
    if len(result.accepted) < cfg.min_clients:
        raise EdgeTLError(f"only {len(result.accepted)} device(s) run the fleet's extractor; at least "
                          f"{cfg.min_clients} are needed ({len(result.rejected)} rejected)")
    return reports


def _join_refusal(content: Any, cfg: FleetConfig) -> str:
    """Why a join reply is refused ("" when it is accepted): another extractor, or malformed statistics."""
    theirs = str(content["config"]["extractor_sha256"])
    if theirs != cfg.extractor_sha256 or not content["config"]["accepted"]:
        return (f"extractor sha256 {theirs[:12]}… differs from the fleet's {cfg.extractor_sha256[:12]}…; install "
                "the fleet's bundle on this device")
    names = list(content["config"]["classes"])
    reason = check_arrays(content, {"class_counts": (len(names),)}) or check_arrays(
        content, {k: tuple(content["arrays"][k].numpy().shape) for k in ("feature_sum", "feature_sumsq")})
    return f"join statistics rejected: {reason}" if reason else ""


def _ncm(grid: Any, cfg: FleetConfig, stats: core.FleetStats, result: FleetResult) -> NCMHead:
    """The NCM head: per-class sums and counts summed exactly (``train.ncm``), then the softmax scale fitted on
    moments summed over the devices (``query.ncm_scale``, a few Newton steps)."""
    fa = _flwr()
    n_classes, dim = len(stats.classes), len(stats.mean)
    centre = fa.ArrayRecord({"centre": fa.Array(stats.mean)})
    sums_replies = _exchange(grid, _alive(result, cfg), "train.ncm", lambda n: fa.RecordDict(
        {"config": _config(cfg, classes=stats.classes), "arrays": centre}), cfg.timeout, result,
        shapes={"sums": (n_classes, dim), "counts": (n_classes,)})
    sums_replies = {n: c for n, c in sums_replies.items() if n in _alive(result, cfg)}
    # content order, not arrival order: the same fleet gives the same head bit for bit
    ordered = sorted(sums_replies.values(), key=_content_digest_of)
    sums = np.asarray(np.sum([c["arrays"]["sums"].numpy() for c in ordered], axis=0))
    counts = np.asarray(np.sum([c["arrays"]["counts"].numpy() for c in ordered], axis=0))
    empty = [stats.classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise EdgeTLError(f"class(es) {', '.join(empty)} lost every device that held them ({len(result.dropped)} "
                          "left out); rerun when those devices are back")
    head_arrays = fa.ArrayRecord({"centre": fa.Array(stats.mean), "sums": fa.Array(sums),
                                  "counts": fa.Array(counts)})
    search = ScaleSearch()
    while not search.done:
        replies = _exchange(grid, _alive(result, cfg), "query.ncm_scale", lambda n: fa.RecordDict(
            {"config": _config(cfg, classes=stats.classes, scale=search.scale), "arrays": head_arrays}),
            cfg.timeout, result, shapes={"moments": (3,)})
        search.update(sum(c["arrays"]["moments"].numpy() for c in replies.values()))
    return NCMHead.from_sums(stats.mean, sums, counts, search.scale)


@dataclass(frozen=True)
class _HeadFile:
    """The head file's bytes as written (and sent to the devices), and its signature (empty when unsigned)."""

    payload: bytes
    signature: bytes


def _write_head(out: Path, head: Any, classes: list[str], cfg: FleetConfig, result: FleetResult) -> _HeadFile:
    """``head.npz`` and ``labels.json`` in ``out``, and ``head.sig`` when ``cfg.sign_key`` is set (a stale one is
    removed otherwise); records the file, its sha256 and the signer in ``result``."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    head.save(buf)
    payload = buf.getvalue()
    atomic_write(out / "head.npz", lambda fh: fh.write(payload))
    atomic_write_json(out / "labels.json", classes)
    result.head_file = str(out / "head.npz")
    result.head_sha256 = hashlib.sha256(payload).hexdigest()
    signature = b""
    if cfg.sign_key:
        from edgetl.fleet.trust import SIGNATURE_FILE, sign_head

        signed = sign_head(payload, classes, cfg.extractor_sha256, cfg.sign_key)
        signature, result.signer = signed.signature, signed.signer
        atomic_write(out / SIGNATURE_FILE, lambda fh: fh.write(signature))
    elif (out / "head.sig").exists():
        (out / "head.sig").unlink()  # a stale signature of an earlier head must not sit beside this one
    return _HeadFile(payload, signature)


def _adopt(grid: Any, cfg: FleetConfig, classes: list[str], written: _HeadFile, result: FleetResult) -> None:
    """``query.adopt``: send the head (and its signature) to every device left; record each device's answer."""
    fa = _flwr()
    alive = _alive(result, cfg)
    adopt_cfg = _config(cfg, classes=classes, head=written.payload,
                        source=f"fleet {cfg.head} head ({len(alive)} devices)", force=cfg.force,
                        **({"signature": written.signature} if written.signature else {}))
    replies = _exchange(grid, alive, "query.adopt", lambda n: fa.RecordDict({"config": adopt_cfg}), cfg.timeout,
                        result, count=False)
    result.adopted = {n: dict(c["config"]) for n, c in replies.items()}


def _fedavg(grid: Any, cfg: FleetConfig, stats: core.FleetStats, result: FleetResult) -> Any:
    """Flower's FedAvgM over the accepted devices: FedAvg weighted by each device's share of the global objective,
    with server momentum (devices holding different classes pull the head apart; momentum damps that)."""
    fa = _flwr()
    from flwr.serverapp.strategy import FedAvgM

    class _Accepted(FedAvgM):
        """FedAvg (with server momentum) that trains only the devices admitted at join, and records bytes per device
        per round."""

        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
            if self.current_arrays is None:
                self.current_arrays = arrays
            config["server-round"] = server_round
            record = fa.RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            alive = _alive(result, cfg)
            self.sent, self.started = alive, time.perf_counter()
            result.bytes_down.append({str(n): _bytes(record) for n in alive})
            return self._construct_messages(record, alive, fa.MessageType.TRAIN)

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies, good = list(replies), []
            for reply in replies:
                node = int(reply.metadata.src_node_id)
                if reply.has_error():
                    _drop(result, node, f"failed in round {server_round}: {reply.error.reason}")
                    continue
                reason = check_arrays(reply.content, shapes)
                share = reply.content["metrics"]["share"] if "metrics" in reply.content else float("nan")
                if not reason and not (np.isfinite(share) and share > 0):
                    reason = f"its weight (share) is {share}"
                if reason:
                    _drop(result, node, f"update rejected in round {server_round}: {reason}")
                    continue
                good.append(reply)
            for node in sorted(set(self.sent) - {int(r.metadata.src_node_id) for r in replies}):
                _drop(result, node, f"no answer in round {server_round} within {cfg.timeout:.0f} s")
            _alive(result, cfg)
            replies = good
            result.bytes_up.append({str(r.metadata.src_node_id): _bytes(r.content) for r in replies})
            result.round_seconds.append(round(time.perf_counter() - self.started, 3))
            result.rounds += 1
            # aggregate in an order fixed by the replies' content, not by their arrival: the same fleet then gives
            # the same head (float sums depend on their order, and 60 rounds of line searches amplify that)
            return super().aggregate_train(server_round, sorted(replies, key=_content_digest))

    n_classes, dim = len(stats.classes), len(stats.mean)
    shapes = {"coef": (n_classes, dim), "intercept": (n_classes,)}
    initial = fa.ArrayRecord({"coef": fa.Array(np.zeros((n_classes, dim), np.float32)),
                              "intercept": fa.Array(np.zeros(n_classes, np.float32))})
    train_config = fa.ConfigRecord({"extractor_sha256": cfg.extractor_sha256, "classes": stats.classes,
                                    "mean": stats.mean.astype(float).tolist(), "std": stats.std.astype(float).tolist(),
                                    "class_weights": core.class_weights(stats.counts).tolist(), "l2": cfg.l2,
                                    "local_iter": cfg.local_iter})
    _alive(result, cfg)
    strategy = _Accepted(fraction_evaluate=0.0, min_train_nodes=cfg.min_clients, min_available_nodes=cfg.min_clients,
                         weighted_by_key="share", server_learning_rate=1.0, server_momentum=cfg.momentum)
    out = strategy.start(grid, initial, num_rounds=cfg.rounds, timeout=cfg.timeout, train_config=train_config)
    return SoftmaxHead.from_linear(out.arrays["coef"].numpy(), out.arrays["intercept"].numpy(), stats.mean,
                                   stats.std, l2=cfg.l2)


def _federated_lbfgs(grid: Any, cfg: FleetConfig, stats: core.FleetStats, result: FleetResult) -> Any:
    """The L-BFGS of :class:`~edgetl.heads.SoftmaxHead` (same start, tolerance, memory) on the global objective,
    each evaluation one Flower round in which every device returns its term's loss and gradient (exact sums)."""
    fa = _flwr()
    n_classes, dim = len(stats.classes), len(stats.mean)
    settings = fa.ConfigRecord({"extractor_sha256": cfg.extractor_sha256, "classes": stats.classes,
                                "mean": stats.mean.astype(float).tolist(), "std": stats.std.astype(float).tolist(),
                                "class_weights": core.class_weights(stats.counts).tolist()})

    def summed(theta: np.ndarray) -> tuple[float, np.ndarray]:
        record = fa.RecordDict({"config": settings, "arrays": fa.ArrayRecord({"theta": fa.Array(theta)})})
        accepted = _alive(result, cfg)
        replies = _exchange(grid, accepted, "train.gradient", lambda n: record, cfg.timeout, result,
                            shapes={"grad": (dim * n_classes + n_classes,)})
        if len(replies) < len(accepted):  # the objective is a sum over every device: without one it is another
            raise EdgeTLError(f"federated L-BFGS needs every device in every round; "
                              f"{'; '.join(f'{n}: {r}' for n, r in result.dropped.items())}. Use --strategy fedavg "
                              "on a fleet whose devices drop out")
        loss = sum(float(c["metrics"]["loss"]) for c in replies.values())
        return loss, np.sum([c["arrays"]["grad"].numpy() for c in replies.values()], axis=0)

    solver = SoftmaxHead()  # the central head's own tolerance and memory
    theta = lbfgs(add_l2(summed, cfg.l2, dim * n_classes), np.zeros(dim * n_classes + n_classes, dtype=np.float32),
                  cfg.rounds, solver.tol, solver.memory).x
    weights = LinearWeights.from_theta(theta, n_classes)
    return SoftmaxHead.from_linear(weights.coef, weights.intercept, stats.mean, stats.std, l2=cfg.l2)


_SOFTMAX = {"fedavg": _fedavg, "lbfgs": _federated_lbfgs}


def make_server_app(cfg: FleetConfig | None = None, results: list[FleetResult] | None = None):  # type: ignore[no-untyped-def]
    """The Flower ``ServerApp``; settings from ``cfg`` or, when None, from the run config. Each run's
    :class:`FleetResult` is appended to ``results`` when given."""
    _flwr()
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        settings = cfg if cfg is not None else FleetConfig.from_run_config(dict(context.run_config))
        result = run_server(grid, settings)
        if results is not None:
            results.append(result)

    return app


def simulate(bundles: Sequence[str | os.PathLike[str]], cfg: FleetConfig, cpus: int | None = None) -> FleetResult:
    """Run a fleet on one machine in Flower's simulation engine (Ray): one SuperNode per bundle."""
    _flwr()
    try:
        from flwr.simulation import run_simulation
    except ImportError as exc:
        from edgetl.errors import RuntimeMissingError

        raise RuntimeMissingError("Flower's simulation engine needs Ray; install: pip install 'edgetl[fleet]'") from exc
    results: list[FleetResult] = []
    cpus = cpus or min(len(bundles), os.cpu_count() or 1)
    environ = dict(os.environ)
    try:
        run_simulation(server_app=make_server_app(cfg, results), client_app=make_client_app(bundles),
                       num_supernodes=len(bundles),
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                                                     "log_to_driver": False}})
    finally:
        # Ray leaves PYTHONPATH (this process's sys.path), PYTHONBREAKPOINT and more in os.environ: every later
        # subprocess of the caller would inherit them (a fresh venv then imported this one's torch)
        os.environ.clear()
        os.environ.update(environ)
    if not results:
        raise EdgeTLError("the Flower simulation ended without a result; run with -v to see Flower's log")
    return results[0]


def read_result(out: str | os.PathLike[str]) -> dict[str, Any]:
    """``fleet.json`` written by a server run."""
    path = Path(out) / "fleet.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is missing or unreadable ({exc}); run `edgetl fleet server` first") from exc


client_app: Any = None
server_app: Any = None
try:  # the module imports without Flower (the CLI explains what to install); the apps need it
    import flwr as _flwr_probe  # noqa: F401

    client_app = make_client_app()
    server_app = make_server_app()
except ImportError:
    pass
