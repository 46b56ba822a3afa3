"""Checkpoint: a GemmaSpec, tokenizer files and lazy tensors in canonical (HF) names/layouts.

Canonical layout: Hugging Face names, linear weights [out, in], norm weights stored as
the raw ``w`` of ``(1 + w)``. Tensors are lazy (name, shape, dtype, loader) so that a
conversion streams tensor by tensor and peak memory stays near the largest tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from gemport.errors import CheckpointError, UnsupportedError
from gemport.spec import GemmaSpec

if TYPE_CHECKING:
    import numpy as np
    import torch

    from quantizers.record import QuantFormat

DTYPES = ("f32", "f16", "bf16")


# Integer dtypes are for the tensors a quantized format stores (packed codes, zero points, shapes);
# DTYPES are the floating-point types a checkpoint's weights are cast to.
_TORCH_NAMES = {
    "f32": "float32",
    "f16": "float16",
    "bf16": "bfloat16",
    "i8": "int8",
    "i32": "int32",
    "i64": "int64",
}


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, _TORCH_NAMES[name])


def dtype_name(dtype: torch.dtype) -> str:
    import torch

    names = {getattr(torch, t): n for n, t in _TORCH_NAMES.items()}
    if dtype not in names:
        raise CheckpointError(f"unsupported tensor dtype {dtype}")
    return names[dtype]


DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "i8": 1, "i32": 4, "i64": 8}


@dataclass(frozen=True)
class LazyTensor:
    """A tensor not yet read: ``load()`` returns a torch tensor of ``shape`` and ``dtype``.

    When ``quant`` is set, ``load()`` returns a ``quantizers.record.QuantizedTensor`` of ``shape``
    in that format instead, and ``dtype`` is the dtype of the weight it was quantized from.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    load: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    # The bytes as a GGUF stored them, (ggml type name, loader of a uint8 array), so that a writer
    # keeping that type copies them instead of re-quantizing. Any change to the tensor drops it.
    raw: tuple[str, Callable[[], np.ndarray]] | None = field(default=None, repr=False, compare=False)
    quant: QuantFormat | None = None

    @property
    def nbytes(self) -> int:
        """Bytes stored: the codes at ``bits`` each plus scales and zero points for a quantized tensor."""
        n = 1
        for d in self.shape:
            n *= d
        if self.quant is None:
            return n * DTYPE_BYTES[self.dtype]
        groups = self.shape[0] * self.quant.groups(self.shape[1])
        zero_points = 0 if self.quant.symmetric else groups
        return n * self.quant.bits // 8 + groups * DTYPE_BYTES[self.quant.scale_dtype] + zero_points

    def dequantized(self, dtype: str) -> LazyTensor:
        """A quantized tensor as the float weight its record stands for, ``(codes - zero) * scale``
        computed in ``dtype``; any other tensor unchanged."""
        if self.quant is None:
            return self
        return LazyTensor(self.name, self.shape, dtype, load=lambda: self.load().dequantize(dtype))

    def cast(self, dtype: str) -> LazyTensor:
        """The same tensor, converted to ``dtype`` when loaded; a quantized tensor keeps its record."""
        if dtype == self.dtype or self.quant is not None:
            return self
        load = self.load
        if isinstance(load, RowLoader):
            cast = RowLoader(lambda a, b: load.rows(a, b).to(torch_dtype(dtype)), load.n)
            return replace(self, dtype=dtype, load=cast, raw=None)
        return replace(self, dtype=dtype, load=lambda: load().to(torch_dtype(dtype)), raw=None)


# Values of a large tensor that a streaming writer holds at a time (16M: 64 MB in float32).
CHUNK_VALUES = 1 << 24


class RowLoader:
    """A ``LazyTensor.load`` that can also read rows ``[a, b)`` of the first axis alone, so a writer
    streams a large tensor a chunk at a time (a 256000 x 3072 embedding is 1.5 GB in bf16, 3.1 GB
    in float32). Called, it loads the whole tensor. Any wrapper of ``load`` that is not a RowLoader
    (a transform) hides the row reads, so a stale row reader can never bypass it."""

    def __init__(self, rows: Callable[[int, int], torch.Tensor], n: int):
        self.rows, self.n = rows, n

    def __call__(self) -> torch.Tensor:
        return self.rows(0, self.n)


def row_chunks(t: LazyTensor, max_values: int) -> Iterator[torch.Tensor]:
    """A float tensor as successive 2-D chunks ``[rows, shape[-1]]`` of at most ``max_values`` values
    (at least one row); a 1-D tensor is one row. Read chunk by chunk where ``t.load`` is a
    RowLoader of a 2-D tensor, else loaded once and sliced."""
    width = t.shape[-1] if t.shape else 1
    step = max(1, max_values // max(width, 1))
    if isinstance(t.load, RowLoader) and len(t.shape) == 2:
        for a in range(0, t.shape[0], step):
            yield t.load.rows(a, min(a + step, t.shape[0]))
        return
    data = t.load()
    if tuple(data.shape) != tuple(t.shape):
        raise CheckpointError(f"tensor {t.name} loaded as {list(data.shape)}, expected {list(t.shape)}")
    rows = data.reshape(-1, width) if data.ndim > 1 else data.reshape(1, -1)
    for a in range(0, rows.shape[0], step):
        yield rows[a : a + step]


@dataclass
class Checkpoint:
    """spec + tokenizer files (name -> bytes) + lazy tensors keyed by canonical name."""

    spec: GemmaSpec
    tensors: dict[str, LazyTensor]
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    generation_config: dict | None = None
    source: str = ""
    # Facts of the source format that its own writer can carry over (e.g. "gguf.file_type").
    extra: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator[LazyTensor]:
        return iter(self.tensors.values())

    def cast(self, dtype: str) -> Checkpoint:
        return replace(self, tensors={k: t.cast(dtype) for k, t in self.tensors.items()})

    def check(self, quantized_ok: bool = False) -> None:
        """Raise CheckpointError unless names and shapes are exactly what the spec implies, and
        UnsupportedError if a tensor is a quantized record and the caller (a writer) does not take them."""
        if not quantized_ok:
            self.refuse_quantized()
        self.check_sizes()
        expected = expected_shapes(self.spec)
        missing = [n for n in expected if n not in self.tensors]
        if missing:
            raise CheckpointError(
                f"missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                self.source,
            )
        unexpected = [n for n in self.tensors if n not in expected]
        if unexpected:
            raise CheckpointError(f"unexpected tensor {unexpected[0]}", self.source)
        for name, shape in expected.items():
            got = tuple(self.tensors[name].shape)
            if got != shape:
                raise CheckpointError(f"tensor {name} has shape {list(got)}, expected {list(shape)}", self.source)

    def check_sizes(self) -> None:
        """The spec's layer count and embedding size against the tensors present, before anything is
        built per layer from the spec: a config that lies about its sizes is named here, not by a
        list of a million missing tensors."""
        layers = layer_count(self.tensors)
        if layers != self.spec.num_layers:
            raise CheckpointError(
                f"the config says {self.spec.num_layers} layers, the tensors hold {layers}", self.source
            )
        embed = self.tensors.get("model.embed_tokens.weight")
        want = (self.spec.vocab_size, self.spec.hidden_size)
        if embed is not None and tuple(embed.shape) != want:
            raise CheckpointError(
                f"tensor model.embed_tokens.weight has shape {list(embed.shape)}, the config says "
                f"vocab_size x hidden_size = {list(want)}",
                self.source,
            )

    def quantized(self) -> dict[str, LazyTensor]:
        """The tensors that load as quantized records, by name."""
        return {n: t for n, t in self.tensors.items() if t.quant is not None}

    def refuse_quantized(self) -> None:
        """UnsupportedError naming the first quantized record: for writers that do not map records yet."""
        quantized = self.quantized()
        if quantized:
            name, t = next(iter(quantized.items()))
            raise UnsupportedError(
                f"quantized records not supported by this writer yet: tensor {name} is {t.quant.describe()} "
                f"({len(quantized)} quantized tensors; the hf writer takes them)",
                self.source,
            )


_LAYER_NAME = re.compile(r"model\.layers\.(\d{1,9})\.")


def layer_count(names: Iterable[str]) -> int:
    """1 + the highest layer index among canonical tensor names (0 when none is per layer)."""
    top = -1
    for name in names:
        m = _LAYER_NAME.match(name)
        if m:
            top = max(top, int(m.group(1)))
    return top + 1


def expected_shapes(spec: GemmaSpec) -> dict[str, tuple[int, ...]]:
    """Canonical tensor names and shapes for ``spec``, in the order HF stores them."""
    h, q, kv, f = (
        spec.hidden_size,
        spec.num_heads * spec.head_dim,
        spec.num_kv_heads * spec.head_dim,
        spec.intermediate_size,
    )
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (q, h)
        out[p + "self_attn.k_proj.weight"] = (kv, h)
        out[p + "self_attn.v_proj.weight"] = (kv, h)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        if spec.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (spec.head_dim,)
            out[p + "self_attn.k_norm.weight"] = (spec.head_dim,)
        out[p + "mlp.gate_proj.weight"] = (f, h)
        out[p + "mlp.up_proj.weight"] = (f, h)
        out[p + "mlp.down_proj.weight"] = (h, f)
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        if spec.post_norms:
            out[p + "pre_feedforward_layernorm.weight"] = (h,)
            out[p + "post_feedforward_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    if not spec.tie_embeddings:
        out["lm_head.weight"] = (spec.vocab_size, h)
    return out


def all_finite(data: torch.Tensor) -> bool:
    """No NaN or infinity in ``data``: its minimum and maximum are finite (torch.aminmax propagates
    NaN). One pass and no mask, 20x faster than ``isfinite(data).all()`` on bf16."""
    import torch

    if data.numel() == 0 or not data.is_floating_point():
        return True
    low, high = torch.aminmax(data)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def is_norm(shape: tuple[int, ...]) -> bool:
    """Every 1-D Gemma tensor is an RMSNorm weight: ``w`` of ``(1 + w)`` canonically."""
    return len(shape) == 1
