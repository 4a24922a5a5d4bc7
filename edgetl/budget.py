"""Memory budget → runtime settings: how big an embedding batch may be, whether ONNX Runtime keeps its CPU memory arena
and memory pattern, and how many stored embeddings one store read fetches, so that edgetl stays within the resident
memory a device profile allows (``memory_budget_mb``; e.g. 200 MB on a 512 MB Raspberry Pi Zero 2 W).

Pure arithmetic, no I/O and no imports beyond the standard library. The figures it uses:

* **Fixed cost** ``BASE_MB`` (80 MB): the Python interpreter, numpy, the inference runtime's shared libraries and
  edgetl's own modules, resident before the first image (75 MB measured for ``import edgetl.device`` with numpy and
  onnxruntime 1.32 loaded, on x86-64; rounded up).
* **The model**: ``model_mb`` (default ``DEFAULT_MODEL_MB`` = 30 MB: twice an FP32 MobileNetV2 of 3.5 M parameters,
  14 MB, as ONNX Runtime may hold the weights once as read from the file and once as optimised/pre-packed initialisers;
  an INT8 graph or one without the classifier costs less, so pass ``model_mb`` when it is known).
* **Per image** (float32, ``s`` = input size): the preprocessed input tensor ``3·s²·4`` bytes, the decoded uint8 image
  ``3·s²`` bytes, the output ``feature_dim·4`` bytes, and the graph's live activations, taken as
  ``ACTIVATION_MULTIPLE`` (16) × the input tensor: MobileNetV2 and EfficientNet-Lite0 both expand to 96 channels at
  112×112 (8× the input's 3×224×224 floats), and a layer's input and output are alive together (×2). At 224 px with
  1280 features this is ~10.4 MB per image.
* **Arena**: with ONNX Runtime's CPU memory arena (a best-fit-with-coalescing allocator that grows in doubling chunks
  and never returns memory to the system) and its memory pattern (one block planned and kept per input shape), the
  peak is taken as ``ARENA_FACTOR`` (2) × the per-image activations. When the budget cannot hold ``MIN_ARENA_BATCH``
  (8) images that way, both are switched off: allocations then come from and go back to the system allocator,
  slower by a few per cent but bounded by what is live.
* **Working memory** = budget − fixed cost − model. Half of it goes to the embedding batch; the other half is left to
  the head (its training matrix, ``n × feature_dim × 4`` bytes, which depends on the data, not on us), the store's
  SQLite page cache and Python's own churn.
* **Store reads**: each stored row costs about twice its vector (``2 · feature_dim · 4`` bytes: the SQLite blob copied
  into a Python bytes object, then into the numpy result); one read may use an eighth of the working memory, at most
  ``MAX_STORE_CHUNK`` rows (500: below SQLite's 999 bound variables per statement) and at least ``MIN_STORE_CHUNK``.

Without a budget (``None``) everything stays as it was: the caller's batch, the arena and memory pattern on, the full
store chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgetl.errors import RegistryError

BASE_MB = 80.0
DEFAULT_MODEL_MB = 30.0
ACTIVATION_MULTIPLE = 16
ARENA_FACTOR = 2.0
MIN_ARENA_BATCH = 8
MAX_STORE_CHUNK = 500
MIN_STORE_CHUNK = 16
_MB = 1024 * 1024


@dataclass(frozen=True)
class MemorySettings:
    """What a memory budget allows (see the module docstring for the arithmetic)."""

    #: the budget these settings come from, MB (None: unlimited)
    budget_mb: int | None
    #: images per embedding batch
    batch_size: int
    #: ONNX Runtime ``SessionOptions.enable_cpu_mem_arena``
    enable_cpu_mem_arena: bool
    #: ONNX Runtime ``SessionOptions.enable_mem_pattern``
    enable_mem_pattern: bool
    #: stored embeddings fetched per store read
    store_chunk: int
    #: estimated resident memory per image in a batch, MB (with the arena's overhead when it is on)
    per_image_mb: float
    #: budget left for the batch, head and store after the fixed cost and the model, MB (None: unlimited)
    working_mb: float | None

    @property
    def tight(self) -> bool:
        """True when the budget switched the arena off."""
        return not self.enable_cpu_mem_arena


def per_image_mb(input_size: int, feature_dim: int, channels: int = 3) -> float:
    """Estimated resident memory one image needs while it is embedded, MB, without allocator overhead."""
    pixels = channels * input_size * input_size
    tensor = pixels * 4
    return (tensor * (1 + ACTIVATION_MULTIPLE) + pixels + feature_dim * 4) / _MB


def memory_settings(budget_mb: int | None, input_size: int, feature_dim: int, *, max_batch: int = 32,
                    model_mb: float | None = None, channels: int = 3) -> MemorySettings:
    """The settings that keep an extractor of ``input_size`` px and ``feature_dim`` outputs within ``budget_mb``.

    ``max_batch`` (e.g. the profile's ``batch_size``) caps the batch; ``model_mb`` is the resident cost of the loaded
    graph (default :data:`DEFAULT_MODEL_MB`). Raises :class:`~edgetl.errors.RegistryError` (a ValueError) when the
    budget cannot hold even one image.
    """
    if input_size <= 0 or feature_dim <= 0 or max_batch <= 0 or channels <= 0:
        raise RegistryError(f"memory_settings needs positive sizes; found input_size={input_size}, "
                            f"feature_dim={feature_dim}, max_batch={max_batch}, channels={channels}")
    image = per_image_mb(input_size, feature_dim, channels)
    row = 2 * feature_dim * 4 / _MB
    if budget_mb is None:
        return MemorySettings(budget_mb=None, batch_size=max_batch, enable_cpu_mem_arena=True, enable_mem_pattern=True,
                              store_chunk=MAX_STORE_CHUNK, per_image_mb=image * ARENA_FACTOR, working_mb=None)
    model = DEFAULT_MODEL_MB if model_mb is None else float(model_mb)
    working = budget_mb - BASE_MB - model
    for_batch = working / 2
    if for_batch < image:
        need = BASE_MB + model + 2 * image
        raise RegistryError(f"a memory budget of {budget_mb} MB cannot embed even one {input_size}px image (needs about "
                            f"{need:.0f} MB: {BASE_MB:.0f} runtime + {model:.0f} model + working memory); raise "
                            "memory_budget_mb in the device profile or use a smaller model")
    arena = int(for_batch // (image * ARENA_FACTOR))
    if arena >= MIN_ARENA_BATCH:
        batch, on, cost = arena, True, image * ARENA_FACTOR
    else:
        batch, on, cost = int(for_batch // image), False, image
    chunk = int(min(MAX_STORE_CHUNK, max(MIN_STORE_CHUNK, (working / 8) // row)))
    return MemorySettings(budget_mb=budget_mb, batch_size=max(1, min(max_batch, batch)), enable_cpu_mem_arena=on,
                          enable_mem_pattern=on, store_chunk=chunk, per_image_mb=cost, working_mb=working)
