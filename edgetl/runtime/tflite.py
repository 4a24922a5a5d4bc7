"""LiteRT (TFLite) backend. One interpreter per extractor object, created once and reused for every batch.

The graphs edgetl exports have batch 1 (litert-torch cannot export a dynamic batch), so :meth:`TfliteExtractor.embed`
resizes the input tensor to the batch it is given, re-allocating only when the batch size changes; a graph that
refuses the resize is run one image at a time. Integer (int8/uint8) inputs are quantized and integer outputs
dequantized with the scale and zero point stored in the graph, so callers always pass and receive float32.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgetl.budget import MemorySettings
from edgetl.errors import BundleError, RuntimeMissingError, one_line
from edgetl.runtime.base import FeatureExtractor, check_batch

log = logging.getLogger(__name__)


def _interpreter_class() -> Any:
    """ai_edge_litert's Interpreter, else tflite_runtime's (older devices), else :class:`RuntimeMissingError`."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
    except ImportError as exc:
        raise RuntimeMissingError("no LiteRT interpreter is installed (ai-edge-litert or tflite-runtime); install the "
                                  "device extra: pip install 'edgetl[tflite]'") from exc
    log.warning("ai-edge-litert is not installed; using tflite-runtime, which is much slower for INT8 graphs "
                "(pip install 'edgetl[tflite]' to get ai-edge-litert)")
    return Interpreter


class TfliteExtractor(FeatureExtractor):
    """A ``.tflite`` extractor: ``(N, 3, S, S)`` float32 NCHW → ``(N, D)`` float32, for any N.

    ``entry`` is the graph's manifest record; its ``"layout"`` (``"NCHW"`` or ``"NHWC"``) overrides the layout guessed
    from the input shape. ``threads`` is the interpreter's thread count (``None``: the runtime's default).
    """

    backend = "tflite"

    def __init__(self, path: Path, entry: dict[str, Any] | None = None, threads: int | None = None,
                 memory: MemorySettings | None = None):
        #: a memory budget's settings (edgetl.budget): batches larger than its batch_size run in slices
        self.memory = memory
        interpreter_cls = _interpreter_class()
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"TFLite graph {path} is missing; re-export the bundle or choose another backend")
        try:
            self.interpreter = interpreter_cls(model_path=str(path), num_threads=int(threads) if threads else None)
            self.interpreter.allocate_tensors()
            inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        except Exception as exc:  # noqa: BLE001 - the interpreter raises ValueError/RuntimeError of its own
            raise BundleError(f"LiteRT cannot load {path} ({one_line(exc)}); the graph is damaged or needs a newer "
                              "ai-edge-litert") from exc
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(f"{path.name} has {len(inputs)} inputs and {len(outputs)} outputs; an extractor graph "
                              "has exactly one of each")
        self.threads = threads
        inp, out = inputs[0], outputs[0]
        self.input_index, self.output_index = int(inp["index"]), int(out["index"])
        self.input_dtype, self.output_dtype = np.dtype(inp["dtype"]), np.dtype(out["dtype"])
        self.input_quant = tuple(inp["quantization"]) if self.input_dtype.kind in "iu" else None
        self.output_quant = tuple(out["quantization"]) if self.output_dtype.kind in "iu" else None
        shape = [int(d) for d in inp["shape"]]
        self.feature_dim = int(np.prod(out["shape"][1:]))
        if len(shape) != 4:
            raise BundleError(f"{path.name} takes a {len(shape)}-d input {shape}; an image extractor takes 4-d input")
        layout = str((entry or {}).get("layout") or "").upper()
        if layout not in ("NCHW", "NHWC"):
            layout = "NHWC" if shape[3] == 3 and shape[1] != 3 else "NCHW"
        self.layout = layout
        self._image_shape = shape[1:]  # per-image shape in the graph's own layout
        self.size = shape[2] if layout == "NCHW" else shape[1]
        self._batch = shape[0]  # batch the input tensor is currently allocated for
        self._resizable = True

    # --------------------------------------------------------------------------------------------------- helpers
    def _to_input(self, batch: np.ndarray) -> np.ndarray:
        """``(N, 3, S, S)`` float32 → the graph's layout and dtype (quantized for integer inputs)."""
        if self.layout == "NHWC":
            batch = batch.transpose(0, 2, 3, 1)
        if self.input_quant is not None:
            scale, zero_point = self.input_quant
            info = np.iinfo(self.input_dtype)
            q = np.round(batch / np.float32(scale)) + np.float32(zero_point)
            return np.ascontiguousarray(np.clip(q, info.min, info.max).astype(self.input_dtype))
        return np.ascontiguousarray(batch, dtype=self.input_dtype)

    def _from_output(self, out: np.ndarray, n: int) -> np.ndarray:
        """The raw output tensor → ``(N, D)`` float32 (dequantized for integer outputs)."""
        if self.output_quant is not None:
            scale, zero_point = self.output_quant
            out = (out.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)
        return out.reshape(n, -1).astype(np.float32, copy=False)

    def _set_batch(self, n: int) -> None:
        """Resize the input tensor to batch ``n`` and re-allocate (only when the batch size changes)."""
        if n != self._batch:
            self.interpreter.resize_tensor_input(self.input_index, [n, *self._image_shape], strict=False)
            self.interpreter.allocate_tensors()
            self._batch = n

    def _restore(self) -> None:
        """After a failed resize: note the batch the input tensor really has now and make sure it is allocated."""
        self._batch = int(self.interpreter.get_input_details()[0]["shape"][0])
        try:
            self.interpreter.allocate_tensors()
        except (RuntimeError, ValueError):
            self._batch = -1  # unusable as it is: the next _set_batch(1) resizes and allocates again

    def _run(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input_index, x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output_index)

    def _run_batched(self, x: np.ndarray) -> np.ndarray | None:
        """The whole batch in one call, or ``None`` when this graph cannot be resized to it."""
        try:
            self._set_batch(len(x))
            out = self._run(x)
        except (RuntimeError, ValueError) as exc:
            log.warning("TFLite graph cannot run a batch of %d (%s); running one image at a time", len(x),
                        one_line(exc))
            self._resizable = False
            self._restore()
            return None
        if out.shape[0] != len(x):
            log.warning("TFLite graph returned %d rows for a batch of %d; running one image at a time", out.shape[0],
                        len(x))
            self._resizable = False
            return None
        return out

    # ------------------------------------------------------------------------------------------------------ API
    def embed(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Preprocessed images ``(N, 3, S, S)`` float32 NCHW → embeddings ``(N, D)`` float32."""
        batch = check_batch(batch, self.size)
        n = len(batch)
        step = self.memory.batch_size if self.memory is not None and self.memory.budget_mb is not None else n
        if n > step:  # under a memory budget: the interpreter's tensors are allocated for at most `step` images
            return np.concatenate([self.embed(batch[i:i + step]) for i in range(0, n, step)])
        x = self._to_input(batch)
        if n > 1 and self._resizable:
            out = self._run_batched(x)
            if out is not None:
                return self._from_output(out, n)
        if n == 0:
            return np.empty((0, self.feature_dim), dtype=np.float32)
        self._set_batch(1)
        return np.concatenate([self._from_output(self._run(x[i:i + 1]), 1) for i in range(n)])
