"""Take the learned model elsewhere: the frozen extractor and a device head composed into one standard graph.

:func:`export_model` reads a bundle's ONNX extractor and one head version (the current one by default), writes the
head's arithmetic as standard ONNX operators after the extractor (and, optionally, the normalisation before it), and
produces one graph whose outputs are the calibrated class probabilities (and optionally the novelty score), exactly
what ``edgetl device predict`` computes. Nothing here needs torch: the graph is composed with the ``onnx`` package
(``onnx.helper`` nodes, ``onnx.compose.merge_models``); OpenVINO IR is converted from that graph by OpenVINO itself.

Before anything is written the graph runs in its format's runtime on the bundle's golden inputs and on held-out
images and must reproduce the device's top-1 labels and probabilities (FP32: within 1e-4); otherwise
:class:`~edgetl.errors.ExportValidationError`.

The graph describes itself: ONNX ``metadata_props`` (and the OpenVINO IR's ``rt_info`` under ``model_info``) carry the
labels (a JSON list under ``labels``), the preprocessing, the backbone id and weights sha256, the head version and
kind, the bundle manifest's sha256 and the edgetl version (see :func:`model_metadata`).

One table per choice: :data:`HEAD_SCORES` (head kind → its scores as ONNX nodes) and :data:`FORMATS` (output format →
how it is converted, checked and written).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgetl._atomic import atomic_write
from edgetl.errors import BundleError, DataError, ExportValidationError, RuntimeMissingError, StateError

log = logging.getLogger(__name__)

#: largest probability difference to ``device predict`` (which runs the ONNX extractor in ONNX Runtime), by the
#: extractor's precision, when the composed graph runs in ONNX Runtime too (the same kernels: ~1e-6 measured)
PROBABILITY_LIMIT = {"fp32": 1e-4, "fp16": 1e-4, "int8": 1e-4}
#: the same when another runtime (OpenVINO) runs the graph: FP32 stays 1e-4; a reduced-precision graph then runs on
#: that runtime's own INT8/FP16 kernels (MobileNetV2 64 px INT8: 3.3e-2 measured, top-1 unchanged), so the limit is
#: looser and named in the result
OTHER_RUNTIME_LIMIT = {"fp32": 1e-4, "fp16": 1e-2, "int8": 5e-2}
#: relative limit of the novelty score (a squared distance per dimension, ~1 for a known image); the second for a
#: reduced-precision graph on another runtime (its unknown flags may then differ only within that band of the threshold)
NOVELTY_LIMIT = 1e-3
OTHER_RUNTIME_NOVELTY_LIMIT = 5e-2
#: held-out images checked by default (from the embedded demo test split when no ``images`` are given)
DEFAULT_CHECK_IMAGES = 40
INPUT = "images"
PIXELS = "pixels"
OUTPUTS = ("probabilities", "novelty", "unknown")


@dataclass(frozen=True)
class ExportCheck:
    """How the composed graph compared with ``device predict`` before it was written."""

    n_golden: int
    n_images: int
    top1_agreement: float
    max_probability_diff: float
    limit: float
    max_novelty_rel_diff: float | None = None
    unknown_agreement: float | None = None
    runtime: str = ""


@dataclass(frozen=True)
class ExportedModel:
    """What :func:`export_model` wrote."""

    path: Path
    files: list[Path]
    format: str
    head_version: str
    head_kind: str
    extractor: str
    precision: str
    inputs: dict[str, list[Any]]
    outputs: list[str]
    metadata: dict[str, str]
    check: ExportCheck
    seconds: float = 0.0
    #: the OpenSSF model-signing signature (``FILE.sig``) when asked for
    signature: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"], d["files"] = str(self.path), [str(f) for f in self.files]
        d["signature"] = str(self.signature) if self.signature else None
        return d


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise RuntimeMissingError("export-model composes graphs with the onnx package: pip install 'edgetl[export-model]' "
                                  "(onnx, no torch)") from exc
    return onnx


# ------------------------------------------------------------------------------------------------- graph building
@dataclass
class GraphBuilder:
    """Nodes and constants of one ONNX graph, with unique names; ``opset`` decides how reductions take their axes."""

    opset: int
    prefix: str = ""
    nodes: list[Any] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)
    _count: int = 0

    def name(self, base: str) -> str:
        self._count += 1
        return f"{self.prefix}{base}_{self._count}"

    def const(self, value: npt.ArrayLike, base: str = "c", dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, base: str | None = None, **attrs: Any) -> Any:
        from onnx import helper

        names = [self.name(base or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int = 1) -> str:
        """A Reduce* node; axes became an input in opset 18 (ReduceSum: 13)."""
        since = 13 if op_type == "ReduceSum" else 18
        if self.opset >= since:
            return self.op(op_type, x, self.const(list(axes), "axes", np.int64), keepdims=keepdims)  # type: ignore[no-any-return]
        return self.op(op_type, x, axes=list(axes), keepdims=keepdims)  # type: ignore[no-any-return]

    def l2_normalise(self, x: str) -> str:
        """``x / max(||x||, 1e-12)`` row-wise, as :func:`edgetl.heads.base.l2_normalise`."""
        norm = self.op("Sqrt", self.reduce("ReduceSum", self.op("Mul", x, x), [1]))
        return self.op("Div", x, self.op("Max", norm, self.const(np.float32(1e-12))))  # type: ignore[no-any-return]


def _softmax_scores(g: GraphBuilder, head: Any, x: str) -> str:
    """Standardise, then the linear layer (:class:`edgetl.heads.SoftmaxHead`)."""
    z = g.op("Div", g.op("Sub", x, g.const(head.mean_)), g.const(head.scale_))
    return g.op("Add", g.op("MatMul", z, g.const(np.ascontiguousarray(head.coef_.T))),  # type: ignore[no-any-return]
                g.const(head.intercept_))


def _prototype_scores(g: GraphBuilder, head: Any, x: str) -> str:
    """Cosine to the class weights of centred, normalised embeddings, times the fitted scale; classes without samples
    score -1e9 (:class:`edgetl.heads.NCMHead`, :class:`edgetl.heads.ImprintHead`)."""
    z = g.l2_normalise(g.op("Sub", x, g.const(head.centre_)))
    cos = g.op("MatMul", z, g.const(np.ascontiguousarray(head.weights().T)))
    empty = np.asarray(head.counts_) == 0
    if empty.any():  # keep * cos + (-1e9 where empty): exact for the kept classes
        cos = g.op("Add", g.op("Mul", cos, g.const((~empty).astype(np.float32)[None, :])),
                   g.const(np.where(empty, -1e9, 0.0).astype(np.float32)[None, :]))
    return g.op("Mul", cos, g.const(np.float32(head.scale_)))  # type: ignore[no-any-return]


def _knn_scores(g: GraphBuilder, head: Any, x: str) -> str:
    """Similarity-weighted votes of the k most similar stored embeddings (:class:`edgetl.heads.KNNHead`)."""
    sims = g.op("MatMul", g.l2_normalise(x), g.const(np.ascontiguousarray(head.X_.T)))
    k = min(int(head.k), len(head.y_))
    values, indices = g.op("TopK", sims, g.const([k], "k", np.int64), outputs=2, axis=1, largest=1, sorted=1)
    weights = g.op("Add", g.op("Max", values, g.const(np.float32(0.0))), g.const(np.float32(1e-6)))
    onehot = np.eye(int(head.n_classes_), dtype=np.float32)[np.asarray(head.y_)]  # (M, C)
    votes = g.op("Gather", g.const(onehot), indices, axis=0)  # (N, k, C)
    weighted = g.op("Mul", votes, g.op("Unsqueeze", weights, g.const([2], "axes", np.int64)))
    return g.reduce("ReduceSum", weighted, [1], keepdims=0)


def _depth_scores(g: GraphBuilder, head: Any, x: str) -> str:
    """Selected columns of a multi-depth embedding, normalised per group, then the inner head's scores
    (:class:`edgetl.heads.DepthHead`)."""
    cols = g.op("Gather", x, g.const(np.asarray(head.columns_), "columns", np.int64), axis=1)
    z = g.op("Div", g.op("Sub", cols, g.const(head.mean_)), g.const(head.scale_))
    inner = head.head_
    if inner.kind not in HEAD_SCORES or inner.kind == "depth":
        raise DataError(f"a depth head wrapping a {inner.kind!r} head cannot be exported; known: "
                        f"{', '.join(k for k in HEAD_SCORES if k != 'depth')}")
    return HEAD_SCORES[inner.kind](g, inner, z)


#: head kind → writer of its ``decision_function`` as ONNX nodes (embeddings ``(N, D)`` → scores ``(N, C)``)
HEAD_SCORES: dict[str, Callable[[GraphBuilder, Any, str], str]] = {
    "softmax": _softmax_scores, "ncm": _prototype_scores, "imprint": _prototype_scores, "knn": _knn_scores,
    "depth": _depth_scores,
}
#: head kinds whose ``predict_proba`` normalises the scores by their sum instead of a softmax
SUM_NORMALISED = frozenset({"knn"})


def _probabilities(g: GraphBuilder, head: Any, x: str, temperature: float | None) -> str:
    """What :func:`edgetl.novelty.calibrated_proba` computes: ``softmax(scores / T)`` with a fitted temperature, the
    head's own ``predict_proba`` otherwise."""
    if head.kind not in HEAD_SCORES:
        raise DataError(f"head kind {head.kind!r} cannot be exported; known: {', '.join(HEAD_SCORES)}")
    scores = HEAD_SCORES[head.kind](g, head, x)
    if temperature:
        return g.op("Softmax", g.op("Div", scores, g.const(np.float32(temperature))), axis=1)  # type: ignore[no-any-return]
    if head.kind in SUM_NORMALISED:
        return g.op("Div", scores, g.reduce("ReduceSum", scores, [1]))  # type: ignore[no-any-return]
    return g.op("Softmax", scores, axis=1)  # type: ignore[no-any-return]


def _novelty(g: GraphBuilder, novelty: Any, x: str) -> str:
    """:meth:`edgetl.novelty.Novelty.score` as nodes: ``(N, D)`` → ``(N,)``."""
    a = novelty.arrays
    if novelty.kind == "cosine":
        z = g.l2_normalise(g.op("Sub", x, g.const(a["centre"])))
        best = g.reduce("ReduceMax", g.op("MatMul", z, g.const(np.ascontiguousarray(a["prototypes"].T))), [1], 0)
        return g.op("Sub", g.const(np.float32(1.0)), best)  # type: ignore[no-any-return]
    means, basis = np.asarray(a["means"], np.float32), np.asarray(a["basis"], np.float32)
    z = g.l2_normalise(x)
    pz = g.op("MatMul", z, g.const(basis))  # (N, r)
    p = g.op("Sub", g.op("Unsqueeze", pz, g.const([1], "axes", np.int64)), g.const((means @ basis)[None]))  # (N,C,r)
    p2 = g.op("Mul", p, p)
    in_basis = g.reduce("ReduceSum", p2, [2], keepdims=0)  # (N, C)
    kept = g.op("MatMul", p2, g.const(np.asarray(a["inv_var"], np.float32)))  # (N, C)
    zz = g.reduce("ReduceSum", g.op("Mul", z, z), [1])  # (N, 1)
    sq = g.op("Add", g.op("Sub", zz, g.op("Mul", g.const(np.float32(2.0)),
                                          g.op("MatMul", z, g.const(np.ascontiguousarray(means.T))))),
              g.const((means * means).sum(axis=1)[None, :]))
    rest = g.op("Mul", g.op("Max", g.op("Sub", sq, in_basis), g.const(np.float32(0.0))),
                g.const(np.float32(a["inv_rest"])))
    dist = g.reduce("ReduceMin", g.op("Add", kept, rest), [1], keepdims=0)
    return g.op("Div", dist, g.const(np.float32(basis.shape[0])))  # type: ignore[no-any-return]


def _stage_model(onnx: Any, g: GraphBuilder, inputs: list[Any], outputs: list[Any], name: str, like: Any) -> Any:
    graph = onnx.helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    model = onnx.helper.make_model(graph, opset_imports=list(like.opset_import))
    model.ir_version = like.ir_version
    return model


def compose(extractor: Any, head: Any, pp: Any, temperature: float | None = None, novelty: Any = None,
            with_preprocessing: bool = False) -> Any:
    """One ONNX ``ModelProto``: [uint8 pixels → normalisation →] ``extractor`` → ``head`` → probabilities
    [, novelty, unknown]. ``extractor``: the bundle's ONNX extractor (``ModelProto``, one image input, one
    ``(N, D)`` output); ``pp``: the bundle's :class:`~edgetl.registry.Preprocessing`."""
    onnx = _onnx()
    from onnx import TensorProto, helper
    from onnx import compose as oc

    default = next((o.version for o in extractor.opset_import if o.domain in ("", "ai.onnx")), 17)
    feat_name = extractor.graph.output[0].name
    dim = extractor.graph.output[0].type.tensor_type.shape.dim
    feature_dim = dim[1].dim_value if len(dim) == 2 and dim[1].dim_value else None
    g = GraphBuilder(default, "head/")
    emb = "head/embeddings"
    outs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", None])]
    g.nodes.append(helper.make_node("Identity", [_probabilities(g, head, emb, temperature)], ["probabilities"]))
    if novelty is not None:
        g.nodes.append(helper.make_node("Identity", [_novelty(g, novelty, emb)], ["novelty"]))
        g.nodes.append(helper.make_node("Greater", ["novelty", g.const(np.float32(novelty.threshold))], ["unknown"]))
        outs += [helper.make_tensor_value_info("novelty", TensorProto.FLOAT, ["batch"]),
                 helper.make_tensor_value_info("unknown", TensorProto.BOOL, ["batch"])]
    head_model = _stage_model(onnx, g, [helper.make_tensor_value_info(emb, TensorProto.FLOAT,
                                                                       ["batch", feature_dim])],
                              outs, "head", extractor)
    extractor = onnx.ModelProto.FromString(extractor.SerializeToString())
    del extractor.metadata_props[:]
    model = oc.merge_models(extractor, head_model, io_map=[(feat_name, emb)])
    in_name = model.graph.input[0].name
    if with_preprocessing:
        size = int(pp.input_size)
        p = GraphBuilder(default, "pre/")
        x = p.op("Cast", PIXELS, to=TensorProto.FLOAT)
        if pp.channels.upper() == "BGR":
            x = p.op("Gather", x, p.const([2, 1, 0], "bgr", np.int64), axis=3)
        std = np.asarray(pp.std, dtype=np.float32)
        x = p.op("Sub", p.op("Mul", x, p.const(1.0 / (np.float32(pp.scale) * std))),
                 p.const(np.asarray(pp.mean, dtype=np.float32) / std))  # as edgetl.preprocess.preprocess_image
        p.nodes.append(helper.make_node("Transpose", [x], ["pre/normalised"], perm=[0, 3, 1, 2]))
        pre = _stage_model(onnx, p, [helper.make_tensor_value_info(PIXELS, TensorProto.UINT8,
                                                                    ["batch", size, size, 3])],
                           [helper.make_tensor_value_info("pre/normalised", TensorProto.FLOAT,
                                                          ["batch", 3, size, size])],
                           "preprocessing", extractor)
        model = oc.merge_models(pre, model, io_map=[("pre/normalised", in_name)])
    model.graph.name = "edgetl"
    model.producer_name = "edgetl"
    from edgetl import __version__

    model.producer_version = __version__
    onnx.checker.check_model(model)
    return model


# ------------------------------------------------------------------------------------------------------ metadata
def model_metadata(bundle: Any, entry: Any, head: Any, labels: Sequence[str], version: str,
                   temperature: float | None, novelty: Any, with_preprocessing: bool, input_name: str) -> dict[str, str]:
    """The string key → string value pairs every exported graph carries (ONNX ``metadata_props``, OpenVINO
    ``rt_info['model_info']``)."""
    from edgetl import __version__
    from edgetl.registry import sha256_file

    m = bundle.manifest
    pp = dict(m.preprocessing)
    size = int(pp["input_size"])
    if with_preprocessing:
        graph_input = {"name": PIXELS, "dtype": "uint8", "layout": "NHWC", "shape": ["batch", size, size, 3],
                       "channels": "RGB", "normalisation": "in the graph",
                       "caller": f"decode, convert to RGB, resize the shorter side to {pp.get('resize', size)} "
                                 f"({pp.get('interpolation', 'bilinear')}), centre-crop {size}x{size}"}
    else:
        graph_input = {"name": input_name, "dtype": "float32", "layout": pp.get("layout", "NCHW"),
                       "shape": ["batch", 3, size, size], "channels": pp.get("channels", "RGB"),
                       "normalisation": "by the caller: (pixel / scale - mean) / std per channel",
                       "caller": f"decode, convert to RGB, resize the shorter side to {pp.get('resize', size)} "
                                 f"({pp.get('interpolation', 'bilinear')}), centre-crop {size}x{size}, normalise"}
    kind = head.kind if head.kind != "depth" else f"depth/{head.head_.kind}"
    meta = {
        "labels": json.dumps(list(labels)),
        "preprocessing": json.dumps(pp),
        "input": json.dumps(graph_input),
        "input_size": str(size),
        "mean": json.dumps(pp.get("mean")),
        "std": json.dumps(pp.get("std")),
        "pixel_scale": str(pp.get("scale", 255.0)),
        "channel_order": graph_input["channels"],
        "layout": graph_input["layout"],
        "preprocessing_in_graph": json.dumps(with_preprocessing),
        "backbone_id": m.backbone.id,
        "backbone_weights_sha256": m.backbone.weights_sha256 or "",
        "head_version": version,
        "head_kind": kind,
        "temperature": json.dumps(temperature),
        "outputs": json.dumps(["probabilities"] + (["novelty", "unknown"] if novelty is not None else [])),
        "bundle_manifest_sha256": sha256_file(bundle.path / "manifest.json"),
        "extractor_file": entry.file,
        "extractor_sha256": bundle.sha256(entry.file),
        "extractor_precision": entry.precision,
        "feature_dim": str(bundle.feature_dim),
        "edgetl_version": __version__,
    }
    if novelty is not None:
        meta["novelty_threshold"] = repr(float(novelty.threshold))
    return meta


# ---------------------------------------------------------------------------------------------------- formats
@dataclass
class _Candidate:
    """A composed graph in one format, runnable before it is written."""

    run: Callable[[np.ndarray], dict[str, np.ndarray]]
    write: Callable[[Path], list[Path]]
    runtime: str


def _onnx_candidate(model: Any, meta: dict[str, str], threads: int | None) -> _Candidate:
    onnx = _onnx()
    from onnx import helper

    helper.set_model_props(model, meta)
    data = model.SerializeToString()
    if len(data) >= 2**31 - 1:
        raise DataError(f"the composed graph is {len(data) >> 20} MB, beyond ONNX's 2 GB single-file limit; use a "
                        "head with fewer stored embeddings (e.g. ncm instead of knn)")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RuntimeMissingError("checking the graph needs onnxruntime: pip install 'edgetl[onnx]'") from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feed = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {feed: batch})))

    def write(out: Path) -> list[Path]:
        atomic_write(out, lambda fh: fh.write(data))
        onnx.checker.check_model(str(out))
        return [out]

    return _Candidate(run, write, f"onnxruntime {ort.__version__}")


def _openvino_candidate(model: Any, meta: dict[str, str], threads: int | None) -> _Candidate:
    try:
        import openvino as ov
    except ImportError as exc:
        raise RuntimeMissingError("--format openvino needs openvino: pip install 'edgetl[openvino]'") from exc
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        src.write_bytes(model.SerializeToString())
        ov_model = ov.convert_model(str(src))
    for key, value in meta.items():
        ov_model.set_rt_info(value, ["model_info", key])
    from edgetl.runtime.openvino import BASE_CONFIG

    config: dict[str, Any] = dict(BASE_CONFIG)
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    names = [o.get_any_name() for o in compiled.outputs]

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        result = compiled(batch)
        return {n: np.asarray(result[o]) for n, o in zip(names, compiled.outputs)}

    def write(out: Path) -> list[Path]:
        if out.suffix != ".xml":
            raise DataError(f"an OpenVINO IR is written as NAME.xml (+ NAME.bin); --out {out} does not end in .xml")
        tmp_xml = out.with_name(f".{out.stem}.tmp.xml")
        ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=False)
        bin_tmp, bin_out = tmp_xml.with_suffix(".bin"), out.with_suffix(".bin")
        os.replace(bin_tmp, bin_out)  # an IR finds its weights by name: NAME.xml reads NAME.bin
        os.replace(tmp_xml, out)
        return [out, bin_out]

    return _Candidate(run, write, f"openvino {ov.get_version().split('-')[0]}")


#: output format → (builder of a runnable, writable candidate from the composed ONNX graph, default suffix)
FORMATS: dict[str, tuple[Callable[[Any, dict[str, str], int | None], _Candidate], str]] = {
    "onnx": (_onnx_candidate, ".onnx"),
    "openvino": (_openvino_candidate, ".xml"),
}
#: formats asked for in issue 20 that are not written, and why (the CLI names the reason)
NOT_SUPPORTED = {
    "tflite": "a TFLite file cannot be made from an ONNX graph without TensorFlow (onnx2tf) or torch (litert-torch), "
              "neither of which runs on the device; export --format onnx and run it with onnxruntime instead",
}


# ----------------------------------------------------------------------------------------------------- checking
def _check(candidate: _Candidate, batches: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], limit: float,
           n_golden: int, novelty: Any, novelty_limit: float = NOVELTY_LIMIT) -> ExportCheck:
    """Run ``candidate`` on each (graph input, reference probabilities, reference novelty) and compare."""
    diffs, agree, nov_rel, unk_agree, total = [0.0], 0, [], [], 0
    for inputs, ref, ref_nov in batches:
        got = candidate.run(inputs)
        prob = np.asarray(got["probabilities"], dtype=np.float64)
        if prob.shape != ref.shape:
            raise ExportValidationError(f"the composed graph returned probabilities of shape {prob.shape}, expected "
                                        f"{ref.shape}; this head cannot be exported as a graph yet")
        diffs.append(float(np.abs(prob - ref).max()))
        top_ref, top_got = ref.argmax(axis=1), prob.argmax(axis=1)
        order = np.sort(ref, axis=1)
        gap = order[:, -1] - order[:, -2] if ref.shape[1] > 1 else np.ones(len(ref))
        # a flip between two classes closer than the limit is a tie, not a disagreement
        agree += int(((top_ref == top_got) | (gap <= limit)).sum())
        total += len(ref)
        if novelty is not None and ref_nov is not None:
            nov = np.asarray(got["novelty"], dtype=np.float64)
            nov_rel.append(float((np.abs(nov - ref_nov) / np.maximum(np.abs(ref_nov), 1e-6)).max()))
            near = np.abs(ref_nov - novelty.threshold) <= novelty_limit * max(abs(novelty.threshold), 1e-6)
            unk_agree.append(((np.asarray(got["unknown"]) == (ref_nov > novelty.threshold)) | near).mean())
    check = ExportCheck(n_golden, total - n_golden, agree / max(total, 1), max(diffs), limit,
                        max(nov_rel) if nov_rel else None, float(np.mean(unk_agree)) if unk_agree else None,
                        candidate.runtime)
    if check.max_probability_diff > limit or check.top1_agreement < 1.0:
        raise ExportValidationError(
            f"the composed graph ({candidate.runtime}) disagrees with device predict on {total} inputs: max "
            f"probability difference {check.max_probability_diff:.2e} (limit {limit:.0e}), top-1 agreement "
            f"{check.top1_agreement:.3f}; nothing written — export --format onnx (the device's runtime) or report it")
    if check.max_novelty_rel_diff is not None and (check.max_novelty_rel_diff > novelty_limit or
                                                   (check.unknown_agreement or 0.0) < 1.0):
        raise ExportValidationError(
            f"the composed graph's novelty score differs from the device's by {check.max_novelty_rel_diff:.2e} "
            f"(relative; limit {novelty_limit:.0e}); nothing written — export without --novelty")
    return check


def _check_images(images: Sequence[str | os.PathLike[str]] | str | os.PathLike[str] | None) -> list[Path]:
    """Held-out image files for the check: a folder (any layout), a list of files, or the demo test split."""
    from edgetl.data import list_images

    if images is None:
        from edgetl.demo import demo_split

        paths = list_images(demo_split("test"))
        step = max(1, len(paths) // DEFAULT_CHECK_IMAGES)
        return paths[::step][:DEFAULT_CHECK_IMAGES]
    if isinstance(images, (str, os.PathLike)):
        paths = list_images(images)
        if not paths:
            raise DataError(f"{images} holds no images to check the exported graph on")
        return paths
    return [Path(p) for p in images]


def _check_request(out: Path, fmt: str, sign: str | os.PathLike[str] | None) -> None:
    """Everything about the output that can be refused before any work: the format, the signing key, the place."""
    if sign is not None and fmt != "onnx":
        raise DataError("--sign signs one file; an OpenVINO IR is two (.xml, .bin): sign their folder with "
                        "model_signing, or export --format onnx --sign")
    if sign is not None:
        from edgetl.openssf import is_ec_key

        if not is_ec_key(sign, private=True):
            raise DataError(f"--sign {sign} is not an ECDSA private key (OpenSSF model signing takes elliptic-curve "
                            "keys): edgetl keys generate --out KEY --type ecdsa-p256")
    if not out.parent.is_dir():
        raise DataError(f"cannot write {out}: folder {out.parent} does not exist; create it first")
    if out.is_dir():
        raise DataError(f"cannot write {out}: it is a folder; name a file, e.g. --out {out / 'model.onnx'}")


@dataclass(frozen=True)
class _HeadVersion:
    """The head version being exported, with what ``device predict`` applies after it."""

    name: str
    head: Any
    labels: list[str]
    temperature: float | None
    novelty: Any

    def reference(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """What the device computes from embeddings ``X``: calibrated probabilities and (with novelty) the score."""
        from edgetl.novelty import calibrated_proba

        return (calibrated_proba(self.head, X, self.temperature).astype(np.float64),
                self.novelty.score(X).astype(np.float64) if self.novelty is not None else None)


def _head_version(rt: Any, version: str | None, novelty: bool) -> _HeadVersion:
    """Head ``version`` (default: the current one) of the runtime's bundle, with its temperature and, when asked
    for, its novelty model; a clear error where there is no head or no novelty model."""
    from edgetl.state import BUNDLE_HEAD

    if rt.bundle.modality != "image":
        raise DataError(f"bundle {rt.bundle.path} holds a {rt.bundle.modality} encoder; export-model composes image "
                        "graphs only")
    name = version or rt.current_version()
    if name is None:
        raise StateError(f"bundle {rt.bundle.path} has no head yet; train one: edgetl device train "
                         f"{rt.bundle.path} --data DIR")
    head, labels = rt.versions.load(name)  # checks that the head belongs to this extractor
    meta = rt.state.meta(name) if name != BUNDLE_HEAD else {}
    nov = rt.novelty_model(name) if novelty else None
    if novelty and nov is None:
        raise StateError(f"head {name} has no novelty model (the bundle's initial head and heads adopted without "
                         "training data have none); export without --novelty or train a head on this device")
    return _HeadVersion(name, head, labels, meta.get("temperature"), nov)


def _check_batches(rt: Any, hv: _HeadVersion, images: Any,
                   with_preprocessing: bool) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], int]:
    """(graph input, device probabilities, device novelty) batches to check the graph on: the bundle's golden inputs
    (float graphs only: they are normalised) and the held-out ``images``; and how many golden inputs there are."""
    from edgetl.data import load_image
    from edgetl.preprocess import crop_image, preprocess_batch

    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    n_golden = 0
    golden = rt.bundle.golden(rt.entry)
    if golden is not None and not with_preprocessing:
        inputs = np.ascontiguousarray(golden[0], dtype=np.float32)
        batches.append((inputs, *hv.reference(rt.embed_arrays(inputs))))
        n_golden = len(inputs)
    pp = rt.bundle.preprocessing
    paths = _check_images(images)
    for i in range(0, len(paths), rt.batch_size):
        pictures = [load_image(p) for p in paths[i:i + rt.batch_size]]
        X = rt.embed_arrays(preprocess_batch(pictures, pp))  # what device predict computes for these files
        graph_in = np.stack([crop_image(p, pp) for p in pictures]) if with_preprocessing else \
            preprocess_batch(pictures, pp)
        batches.append((graph_in, *hv.reference(X)))
    return batches, n_golden


def _checked(candidate: _Candidate, rt: Any, hv: _HeadVersion, fmt: str, images: Any,
             with_preprocessing: bool) -> ExportCheck:
    """:func:`_check` of ``candidate`` against the device, at the limits of its format and the extractor's
    precision."""
    batches, n_golden = _check_batches(rt, hv, images, with_preprocessing)
    limits = PROBABILITY_LIMIT if fmt == "onnx" else OTHER_RUNTIME_LIMIT
    limit = limits.get(rt.precision, 1e-4)
    return _check(candidate, batches, limit, n_golden, hv.novelty,
                  NOVELTY_LIMIT if limit <= PROBABILITY_LIMIT["fp32"] else OTHER_RUNTIME_NOVELTY_LIMIT)


def _write(candidate: _Candidate, out: Path, sign: str | os.PathLike[str] | None) -> tuple[list[Path], Path | None]:
    """Write the checked graph; with ``sign``, its OpenSSF signature too. Returns the files and the signature."""
    try:
        files = candidate.write(out)
    except OSError as exc:
        raise DataError(f"cannot write {out} ({exc.strerror or exc}); choose a writable --out") from exc
    if sign is None:
        return files, None
    from edgetl.openssf import sign_path

    return files, sign_path(out, sign)


# ------------------------------------------------------------------------------------------------------ the entry
def export_model(bundle: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str = "onnx",
                 version: str | None = None, with_preprocessing: bool = False, novelty: bool = False,
                 images: Sequence[str | os.PathLike[str]] | str | os.PathLike[str] | None = None,
                 precision: str | None = None, threads: int | None = None,
                 trust: str | os.PathLike[str] | None = None, profile: str | None = None,
                 sign: str | os.PathLike[str] | None = None) -> ExportedModel:
    """Compose the bundle's ONNX extractor and head ``version`` (default: the current one) into one graph, check it
    against ``device predict`` and write it to ``out`` in format ``fmt`` (see :data:`FORMATS`).

    ``with_preprocessing``: the graph takes uint8 ``(N, S, S, 3)`` RGB pixels (resized and centre-cropped by the
    caller) and normalises them itself. ``novelty``: also output the novelty score ``(N,)`` and ``unknown`` (score
    above the threshold). ``images``: held-out images to check on (a folder or files; default: 40 of the embedded demo
    test images), besides the bundle's golden inputs. ``precision``: which ONNX extractor (default: the one the head
    was trained on). ``sign``: an ECDSA private key; the written ONNX file gets an OpenSSF model-signing signature
    ``out.sig`` (:mod:`edgetl.openssf`). Raises :class:`ExportValidationError` (nothing written) when the graph
    disagrees."""
    start = time.perf_counter()
    if fmt in NOT_SUPPORTED:
        raise DataError(f"--format {fmt} is not supported: {NOT_SUPPORTED[fmt]}")
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    onnx = _onnx()
    from edgetl.device import DeviceRuntime

    out = Path(out)
    _check_request(out, fmt, sign)
    rt = DeviceRuntime(bundle, backend="onnx", precision=precision or _head_precision(bundle, version),
                       threads=threads, trust=trust, profile=profile)
    hv = _head_version(rt, version, novelty)
    pp = rt.bundle.preprocessing
    model = compose(onnx.load(str(rt.bundle.file(rt.entry.file))), hv.head, pp, hv.temperature, hv.novelty,
                    with_preprocessing)
    in_name = model.graph.input[0].name
    metadata = model_metadata(rt.bundle, rt.entry, hv.head, hv.labels, hv.name, hv.temperature, hv.novelty,
                              with_preprocessing, in_name)
    candidate = FORMATS[fmt][0](model, metadata, rt.threads)
    check = _checked(candidate, rt, hv, fmt, images, with_preprocessing)
    files, signature = _write(candidate, out, sign)
    shape = ["batch", pp.input_size, pp.input_size, 3] if with_preprocessing else ["batch", 3, pp.input_size,
                                                                                     pp.input_size]
    return ExportedModel(out, files, fmt, hv.name, metadata["head_kind"], rt.entry.file, rt.precision,
                         {in_name: shape}, json.loads(metadata["outputs"]), metadata, check,
                         time.perf_counter() - start, signature)


def _head_precision(bundle: str | os.PathLike[str], version: str | None) -> str | None:
    """Precision of the ONNX extractor head ``version`` (default: the current one) was trained on (the bundle's own
    head: FP32); None when unknown (the runtime then picks the profile's ONNX graph and checks the head fits it)."""
    from edgetl.bundle import Bundle
    from edgetl.state import BUNDLE_HEAD, DeviceState

    try:
        b = Bundle.load(bundle, verify=False)
        state = DeviceState(b.state_dir)
        name = version or state.current() or (BUNDLE_HEAD if b.manifest.head is not None else None)
        if name == BUNDLE_HEAD:  # the host's head belongs to the FP32 graph it was checked with
            return "fp32" if any(e.format == "onnx" and e.precision == "fp32" for e in b.extractors()) else None
        owner = state.meta(name).get("extractor") if name else None
    except (StateError, BundleError):
        return None
    entry = next((e for e in b.extractors() if e.file == owner), None)
    if entry is None:
        return None
    if entry.format != "onnx":
        raise StateError(f"head {name} was trained on {entry.file} ({entry.format}/{entry.precision}); export-model "
                         f"composes the ONNX extractor with the head: train a head on an ONNX extractor first "
                         f"(edgetl device train {b.path} --data DIR --backend onnx --precision {entry.precision})")
    return entry.precision


__all__ = ["FORMATS", "HEAD_SCORES", "NOT_SUPPORTED", "ExportCheck", "ExportedModel", "compose", "export_model",
           "model_metadata"]
