"""ONNX decoder graphs for Gemma 1/2/3, built from the Checkpoint (no tracing), and read back.

The graph has the inputs and outputs onnxruntime-genai and optimum use: ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value`` [batch, kv_heads, past,
head_dim] in, ``logits`` (float32) and ``present.{i}.key|value`` (past and new, concatenated) out.
Two op sets compute the same model: ``fused`` uses onnxruntime's CPU contrib ops
(GroupQueryAttention with rotary, softcap and local window; SimplifiedLayerNormalization),
``plain`` only standard ONNX ops (any runtime). Quantized records become com.microsoft
MatMulNBits (an embedding record also feeds GatherBlockQuantized, sharing the bytes).

fp16 (``dtype="f16"``, every family): weights, matrix products, attention and the KV cache in fp16;
the residual stream and the RMSNorms that read or write it (input, pre-/post-feed-forward, post-attention and
final norms, their weights too) in float32, with Casts between, as onnxruntime-genai's builder
lays out Gemma 2/3 (ref: onnxruntime_genai/models/builders/gemma.py ``Gemma2Model``,
``layernorm_attrs["cast"]["use_fp32"] = True``, root input cast, norm outputs into the residual
kept float32; base.py ``make_layernorm_casts``), since their residual stream outgrows fp16 (the
Gemma 3 270M's reaches 1e5). What stays fp16 is checked on calibration text before writing
(quantizers.fp16_range, points ``FP32_RESIDUAL``); beyond 65504 the write is refused.

Stored layout (the table ``gemport.layout`` in the model's metadata maps it back to canonical
names, so the reader needs no guessing): linear weights transposed to [in, out] for MatMul; norm
weights as the raw ``w``, the graph adding 1 as the reference does in float32 (ref: transformers
GemmaRMSNorm.forward, ``output * (1.0 + self.weight.float())``); the embedding [vocab, hidden]
as is, shared with the tied LM head through FusedMatMul(transB=1) (Gemm on the plain path).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters import rope
from gemport.checkpoint import CHUNK_VALUES, Checkpoint, LazyTensor, RowLoader, all_finite, expected_shapes, row_chunks
from gemport.errors import CheckpointError, InputError, UnsupportedError
from gemport.output import atomic_output
from gemport.progress import log_tensor, progress, stage
from gemport.spec import SLIDING, GemmaSpec
from quantizers import fp16_range

log = logging.getLogger(__name__)

MODEL, DATA, GENAI_CONFIG, MANIFEST = "model.onnx", "model.onnx.data", "genai_config.json", "gemport.json"
EXTERNAL_THRESHOLD = 256  # bytes: a larger initializer goes to DATA (onnx_ir.save's default)
SPEC_KEY, LAYOUT_KEY = "gemport.spec", "gemport.layout"
OPSET, MS_OPSET, IR_VERSION = 21, 1, 10
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two >= 16
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


@dataclass(frozen=True)
class OnnxOptions:
    """How the graph is written; saved in gemport.json beside it."""

    dtype: str = "f32"  # weights and activations: f32 or f16 (logits are always float32)
    fused: bool = True  # onnxruntime contrib ops; False: standard ONNX ops only
    accuracy_level: int = 0  # MatMulNBits: 0/1 float compute, 4 int8 activations (faster, less exact)
    context_length: int | None = None  # rotary cache rows and genai max_length; None: the spec's max_position
    head_bits: int | None = None  # a float LM head (and tied embedding) quantized to this many bits
    lookup_bits: int | None = None  # with head_bits and a tied embedding: bits of a separate lookup table

    def __post_init__(self) -> None:
        if self.dtype not in ("f32", "f16"):
            raise ValueError(f"ONNX dtype must be f32 or f16, got {self.dtype!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy level must be 0-4, got {self.accuracy_level}")
        if self.head_bits not in (None, 4, 8) or self.lookup_bits not in (None, 4, 8):
            raise ValueError(f"head and lookup bits must be 4 or 8, got {self.head_bits}, {self.lookup_bits}")
        if self.lookup_bits and not self.head_bits:
            raise ValueError("lookup bits apply to a quantized head (head bits)")
        if self.context_length is not None and self.context_length < 1:
            raise ValueError(f"context length must be >= 1, got {self.context_length}")


# --- writing ---------------------------------------------------------------------------------


def write(
    ckpt: Checkpoint,
    dst: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    fused: bool = True,
    accuracy_level: int = 0,
    context_length: int | None = None,
    head_bits: int | None = None,
    lookup_bits: int | None = None,
    allow_fp16_overflow: bool = False,
) -> Path:
    """Write ``ckpt`` as an ONNX folder (model.onnx, model.onnx.data, genai_config.json, tokenizer).

    With ``dtype="f16"`` the fp16 parts of the graph are probed on calibration text first and the
    write refused (UnsupportedError) when they overflow, unless ``allow_fp16_overflow``."""
    import onnx_ir as ir

    try:
        options = OnnxOptions(dtype or "f32", fused, accuracy_level, context_length, head_bits, lookup_bits)
    except ValueError as exc:
        raise UnsupportedError(str(exc)) from None
    ckpt.check(quantized_ok=True)
    for name in ckpt.quantized():
        if name == "lm_head.weight" or (name == "model.embed_tokens.weight" and not ckpt.spec.tie_embeddings):
            raise UnsupportedError(f"tensor {name}: a quantized {name} is not written to ONNX", ckpt.source)
    # the fp16 probe, the tokenizer files and the rotary tables (transformers) take seconds
    with stage("building the ONNX graph"):
        fp16 = _check_fp16(ckpt, allow_fp16_overflow) if options.dtype == "f16" else None
        if fp16 is not None:
            ckpt = fp16_range.guard_weights(ckpt, [n for n in ckpt.tensors if not _wide_norm(n)])
        _warn_without_tokenizer(ckpt)
        from converters.tokenizer_files import genai_tokenizer_files

        tokenizer_files = genai_tokenizer_files(ckpt.tokenizer_files, ckpt.source)  # what onnxruntime-genai reads
        builder = _Builder(ckpt, options)
        model = builder.build()
    dst = Path(dst)
    with atomic_output(dst, overwrite) as tmp:
        tmp.mkdir()
        # Counted as onnx_ir calls back: once per initializer over the threshold, which goes to the data
        # file (ref: onnx_ir external_data.py unload_from_model, ``nbytes > size_threshold_bytes``).
        # Initializers, not the summary's tensors: a MatMulNBits weight is 2-3 of them.
        written = sum(1 for v in builder.initializers if v.const_value.nbytes > EXTERNAL_THRESHOLD)
        with progress(f"writing {dst.name}", written, f"initializers into {DATA}") as advance:
            ir.save(
                model,
                tmp / MODEL,
                external_data=DATA,
                size_threshold_bytes=EXTERNAL_THRESHOLD,
                callback=lambda *_: advance(),
            )
        for value in builder.initializers:  # -v: what the graph stores, tensor by tensor
            log_tensor(log, value.name, value.shape, value.dtype.name)
        _write_json(tmp / GENAI_CONFIG, genai_config(ckpt.spec, options))
        manifest = {"onnx": asdict(options), **stored_manifest(ckpt, options, builder.layout)}
        if fp16 is not None:
            manifest["fp16_check"] = fp16
        _write_json(tmp / MANIFEST, manifest)
        for name, data in tokenizer_files.items():
            (tmp / name).write_bytes(data)
    return dst


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _wide_norm(name: str) -> bool:
    """A norm weight the f16 graph keeps in float32 (all RMSNorms but the per-head q/k norms)."""
    return name.endswith("norm.weight") and not name.endswith(("q_norm.weight", "k_norm.weight"))


def _check_fp16(ckpt: Checkpoint, allow: bool) -> dict:
    """Probe what the f16 graph computes in fp16 (UnsupportedError past 65504 unless ``allow``);
    the highest value found, for the manifest."""
    peaks = fp16_range.check_fp16(ckpt, fp16_range.FP32_RESIDUAL, "onnx", allow)
    layer, point, value = fp16_range.worst(peaks, fp16_range.FP32_RESIDUAL)
    kept = fp16_range.worst(peaks, fp16_range.ALL - fp16_range.FP32_RESIDUAL)
    return {
        "fp16_peak": {"where": fp16_range.describe(layer, point), "value": value},
        "float32_peak": None if kept is None else {"where": fp16_range.describe(*kept[:2]), "value": kept[2]},
        "limit": fp16_range.FP16_MAX,
        "probe": asdict(fp16_range.ProbeConfig()),
    }


def _warn_without_tokenizer(ckpt: Checkpoint) -> None:
    """onnxruntime-genai loads the model without tokenizer files but cannot tokenize: say so (the
    HF writer likewise writes what it has; GGUF, which embeds the vocabulary, refuses)."""
    if not any(name in ckpt.tokenizer_files for name in ("tokenizer.json", "tokenizer.model")):
        log.warning(
            "%s: the source has no tokenizer.json or tokenizer.model; the ONNX folder loads in onnxruntime-genai "
            "but og.Tokenizer cannot load it (copy the tokenizer files into it)",
            ckpt.source,
        )


def genai_config(spec: GemmaSpec, options: OnnxOptions) -> dict:
    """onnxruntime-genai's model description (ref: onnxruntime-genai src/config.h, the keys its
    model builder writes in builder.py ``make_genai_config``)."""
    context = options.context_length or spec.max_position
    eos = list(spec.eos_token_id) if isinstance(spec.eos_token_id, tuple) else spec.eos_token_id
    # intra_op_num_threads 0 is onnxruntime's own default, a thread per physical core; left out,
    # onnxruntime-genai 0.18 runs the decoder on one thread (1.5-1.8x slower decoding on two cores).
    session = {"log_id": "onnxruntime-genai", "intra_op_num_threads": 0, "provider_options": []}
    decoder = {
        "session_options": session,
        "filename": MODEL,
        "head_size": spec.head_dim,
        "hidden_size": spec.hidden_size,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
        "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
    }
    search = {
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": context,
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        # GroupQueryAttention writes new keys into the past buffer in place (the builder's CPU default);
        # the plain path concatenates, so it needs separate buffers.
        "past_present_share_buffer": options.fused,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 1,
        "top_p": 1.0,
    }
    model = {
        "bos_token_id": spec.bos_token_id,
        "context_length": context,
        "decoder": decoder,
        "eos_token_id": eos,
        "pad_token_id": spec.pad_token_id,
        "type": {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}[spec.family],
        "vocab_size": spec.vocab_size,
    }
    return {"model": model, "search": search}


# --- what the folder stores (gemport.json) and its one-line summary --------------------------

HEAD_QUANTIZER = "rtn full range, symmetric"  # _Builder._quantized_head's records
# The LM head with quantized projections, chosen on the off-grid demo model with int4 projections
# (bench/onnx.py head-layout rows; bench/RESULTS.md "The LM head's layout"): an int8 head scores as a
# float head does (KLD 0.347 vs 0.346; an int4 head 0.452 with its own int8 lookup table, 0.469 sharing
# one int4 table), in a folder 23 % smaller than an int4 head + int8 lookup, decoding at 0.76x (the
# head is 168M of its 268M weights; less on larger Gemmas), as llama-quantize's Q4_K_M keeps this
# model's tied token_embd.weight at Q8_0.
DEFAULT_HEAD_BITS = 8


def head_options(quant_bits: int | None, head_bits: int | None = None, lookup_bits: int | None = None) -> dict:
    """``write``'s head_bits and lookup_bits from the command line's: given ones as they are (head bits
    0: a float head), else an int8 head (DEFAULT_HEAD_BITS) when the projections are quantized
    (``quant_bits``), a float one when not. Without lookup bits a tied embedding's lookup reads the
    head's table (GatherBlockQuantized over the same bytes)."""
    if head_bits is None:
        head_bits = DEFAULT_HEAD_BITS if quant_bits else 0
    return {"head_bits": head_bits or None, "lookup_bits": lookup_bits}


def stored_manifest(ckpt: Checkpoint, options: OnnxOptions, layout: dict[str, dict]) -> dict:
    """gemport.json's ``stored`` (what the graph holds, by role, from the layout table the reader uses)
    and ``quantization`` (the quantizer's record, with the head and lookup tables this writer
    quantized listed as quantized instead of kept)."""
    stored = _stored(ckpt, options, layout)
    quantization = ckpt.extra.get("quantization")
    tables = {role: stored[role] for role in ("head", "lookup") if stored[role].get("by") == "writer"}
    if tables:
        quantization = dict(quantization or {"method": None, "quantized": 0})
        quantization |= {"kept": stored["kept"], **tables}
    return {"stored": stored, "quantization": quantization}


def _stored(ckpt: Checkpoint, options: OnnxOptions, layout: dict[str, dict]) -> dict:
    """Projections counted by (bits, block); head and lookup (bits and block, or the float dtype; who
    quantized them; shared or not); the canonical tensors stored as float."""
    embed, head_name = "model.embed_tokens.weight", "lm_head.weight"
    groups: dict[tuple[int, int], int] = {}
    for name, entry in layout.items():
        if name not in (embed, head_name) and entry["kind"] == "matmul_nbits":
            key = (entry["bits"], entry["block_size"])
            groups[key] = groups.get(key, 0) + 1

    def table(name: str) -> dict:
        entry = layout[name]
        if entry["kind"] == "float":
            return {"dtype": options.dtype}
        source = ckpt.tensors.get(name)
        by = "quantizer" if source is not None and source.quant is not None else "writer"
        out = {"bits": entry["bits"], "block_size": entry["block_size"], "by": by}
        return out | ({"method": HEAD_QUANTIZER} if by == "writer" else {})

    # A tied head reads the lookup's table unless the writer gave it a copy of its own (lm_head.weight).
    shared = ckpt.spec.tie_embeddings and head_name not in layout
    head = table(embed if shared else head_name)
    lookup = table(embed)
    if ckpt.spec.tie_embeddings:
        head["shared_with_lookup"] = lookup["shared_with_head"] = shared
    return {
        "projections": [{"bits": b, "block_size": s, "count": n} for (b, s), n in sorted(groups.items())],
        "head": head,
        "lookup": lookup,
        "kept": [n for n in ckpt.tensors if layout.get(n, {}).get("kind") == "float"],
    }


def summary(folder: str | Path) -> str:
    """One line on what an ONNX folder gemport wrote stores, from its gemport.json, e.g.
    ``126 projections int4 b32, head int4 b32, lookup int8 b32, 109 kept``."""
    path = Path(folder) / MANIFEST
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))["stored"]
        return summary_of(stored)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"no readable 'stored' table: {type(exc).__name__}: {exc}", path) from None


def summary_of(stored: dict) -> str:
    """The line of ``summary`` from a ``stored`` table (stored_manifest)."""

    def kind(t: dict) -> str:
        return f"int{t['bits']} b{t['block_size']}" if "bits" in t else t["dtype"]

    parts = [f"{g['count']} projections {kind(g)}" for g in stored["projections"]]
    if stored["head"].get("shared_with_lookup"):
        parts.append(f"head and lookup {kind(stored['head'])} (one table)")
    else:
        parts += [f"head {kind(stored['head'])}", f"lookup {kind(stored['lookup'])}"]
    return ", ".join([*parts, f"{len(stored['kept'])} kept"])


class _Builder:
    """Builds the graph node by node with onnx-ir; initializers load lazily when saved."""

    def __init__(self, ckpt: Checkpoint, options: OnnxOptions):
        import onnx_ir as ir

        self.ir = ir
        self.ckpt, self.spec, self.options = ckpt, ckpt.spec, options
        self.float = ir.DataType.FLOAT16 if options.dtype == "f16" else ir.DataType.FLOAT
        self.f16 = options.dtype == "f16"  # fp16 compute, float32 residual stream and norms
        self.np_float = np.float16 if options.dtype == "f16" else np.float32
        self.nodes: list = []
        self.initializers: list = []
        self.layout: dict[str, dict] = {}  # canonical name -> how it is stored
        self._consts: dict = {}
        self._nbits: dict = {}  # canonical name -> (MatMulNBits initializers, block size)
        self._cached: tuple = (None, None)  # (name, record) of the last record loaded

    # -- graph plumbing
    def op(self, op_type: str, *inputs, domain: str = "", outputs: int = 1, **attrs):
        ir = self.ir
        node = ir.node(op_type, list(inputs), attrs or None, domain=domain, num_outputs=outputs)
        node.name = f"{op_type}_{len(self.nodes)}"
        for i, out in enumerate(node.outputs):
            out.name = f"{node.name}/out{i}"
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else list(node.outputs)

    def const(self, value, dtype=None):
        """A small constant initializer (shapes, scalars)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self._initializer(f"const_{len(self._consts)}", self.ir.tensor(array))
        return self._consts[key]

    def _initializer(self, name: str, tensor):
        value = self.ir.Value(name=name, type=self.ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
        self.initializers.append(value)
        return value

    def lazy(self, name: str, shape: tuple[int, ...], dtype, load, chunks=None) -> object:
        """An initializer whose data is made by ``load()`` (a numpy array) when the model is saved, or,
        given ``chunks()`` (an iterator of numpy arrays whose bytes in turn are the tensor's), written
        to the data file a chunk at a time."""
        ir = self.ir
        kind = ir.LazyTensor if chunks is None else _streamed_tensor_class()
        tensor = kind(lambda: ir.tensor(load()), dtype=dtype, shape=ir.Shape(shape), name=name)
        if chunks is not None:
            tensor.chunks = chunks
        return self._initializer(name, tensor)

    def weight(self, canonical: str, transform: str, t: LazyTensor | None = None, wide: bool = False):
        """The float initializer of a canonical tensor (or of ``t`` stored under that name):
        'none' or 'transpose' ([in, out]); in float32 when ``wide``, else the graph's float type."""
        t = t or self.ckpt.tensors[canonical]
        shape = tuple(reversed(t.shape)) if transform == "transpose" else t.shape
        self.layout[canonical] = {"kind": "float", "transform": transform, "name": canonical}
        dtype, np_dtype = (self.ir.DataType.FLOAT, np.float32) if wide else (self.float, self.np_float)
        chunks = None
        if transform == "none":  # rows as stored: a large table (the embedding) is written a chunk at a time
            chunks = lambda: (self._float_rows(t, rows, np_dtype) for rows in row_chunks(t, CHUNK_VALUES))  # noqa: E731
        return self.lazy(canonical, shape, dtype, lambda: self._load_float(t, transform, np_dtype), chunks)

    def to32(self, x):
        """``x`` cast from the graph's fp16 to float32 (no node in a float32 graph)."""
        return self.op("Cast", x, to=self.ir.DataType.FLOAT) if self.f16 else x

    def to16(self, x):
        """``x`` cast from float32 to the graph's fp16 (no node in a float32 graph)."""
        return self.op("Cast", x, to=self.float) if self.f16 else x

    def _load_float(self, t: LazyTensor, transform: str, np_dtype=None) -> np.ndarray:
        data = t.load()
        if transform == "transpose":
            data = data.t()
        return self._float_rows(t, data, np_dtype)

    def _float_rows(self, t: LazyTensor, data, np_dtype=None) -> np.ndarray:
        """``data`` (all of ``t`` or some of its rows) in the graph's float type; NaN refused."""
        import torch

        if not all_finite(data):
            raise CheckpointError(f"tensor {t.name} has NaN or infinite values", self.ckpt.source)
        return data.to(torch.float32).contiguous().numpy().astype(np_dtype or self.np_float, copy=False)

    # -- building blocks
    def build(self):
        ir, spec = self.ir, self.spec
        kv, d = spec.num_kv_heads, spec.head_dim
        f = self.float
        self.input_ids = ir.val("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        self.attention_mask = ir.val("attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"])
        self.position_ids = ir.val("position_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        pasts, inputs = [], [self.input_ids, self.attention_mask, self.position_ids]
        for i in range(spec.num_layers):
            pair = [
                ir.val(f"past_key_values.{i}.{kind}", f, ["batch_size", kv, "past_sequence_length", d])
                for kind in ("key", "value")
            ]
            pasts.append(pair)
            inputs += pair
        self._rope_caches()
        self._masks(pasts[0][0])
        x, delta = self.embedding(), None
        outputs = []
        for i in range(spec.num_layers):
            x, delta, present = self.layer(i, x, delta, pasts[i])
            for kind, value in zip(("key", "value"), present, strict=True):
                value.name = f"present.{i}.{kind}"
                value.dtype, value.shape = f, ir.Shape(["batch_size", kv, "total_sequence_length", d])
                outputs.append(value)
        logits = self.head(self.add_norm(x, delta, "model.norm.weight")[0])
        logits.name = "logits"
        logits.dtype = ir.DataType.FLOAT
        logits.shape = ir.Shape(["batch_size", "sequence_length", spec.vocab_size])
        for node in self.nodes:  # unused optional outputs left out: onnxruntime then skips computing them
            if node.op_type == "SkipSimplifiedLayerNormalization":
                for value in node.outputs[1:]:
                    if not value.uses():
                        value.name = ""
        graph = ir.Graph(
            inputs,
            [logits, *outputs],
            nodes=self.nodes,
            initializers=self.initializers,
            opset_imports={"": OPSET, "com.microsoft": MS_OPSET},
            name=f"{spec.family}_decoder",
        )
        metadata = {SPEC_KEY: json.dumps(spec.to_json()), LAYOUT_KEY: json.dumps(self.layout)}
        return ir.Model(graph, ir_version=IR_VERSION, producer_name="gemport", metadata_props=metadata)

    def norm(self, x, canonical: str, wide: bool = False):
        """Gemma RMSNorm over the last axis with scale ``1 + w``. ``wide``: ``x`` is float32 (the
        residual side) and the scale and output are float32 too; else all in the graph's float type."""
        scale = self._norm_scale(canonical, wide)
        if self.options.fused:
            return self.op("SimplifiedLayerNormalization", x, scale, axis=-1, epsilon=self.spec.rms_eps, stash_type=1)
        narrow = self.f16 and not wide
        x32 = self.to32(x) if narrow else x
        mean = self.op("ReduceMean", self.op("Mul", x32, x32), self.const([-1], np.int64), keepdims=1)
        inv = self.op("Reciprocal", self.op("Sqrt", self.op("Add", mean, self.const(self.spec.rms_eps, np.float32))))
        y = self.op("Mul", x32, inv)
        if narrow:
            y = self.to16(y)
        return self.op("Mul", y, scale)

    def _norm_scale(self, canonical: str, wide: bool = False):
        """``1 + w``: w stored (read back exactly), onnxruntime folds the constant when the session starts."""
        one = self.const(1.0, np.float32 if wide else self.np_float)
        return self.op("Add", self.weight(canonical, "none", wide=wide), one)

    def linear(self, x, canonical: str):
        t = self.ckpt.tensors[canonical]
        if t.quant is None:
            return self.op("MatMul", x, self.weight(canonical, "transpose"))
        return self._matmul_nbits(x, canonical, t)

    def _matmul_nbits(self, x, canonical: str, t: LazyTensor):
        """MatMulNBits of the record ``t`` (its initializers made once, shared with GatherBlockQuantized)."""
        n, k = t.shape
        inputs, block = self._nbits_initializers(canonical, t)
        attrs = dict(K=k, N=n, bits=t.quant.bits, block_size=block, accuracy_level=self.options.accuracy_level)
        return self.op("MatMulNBits", x, *inputs, domain="com.microsoft", **attrs)

    def _nbits_initializers(self, canonical: str, t: LazyTensor):
        """MatMulNBits' B [n, blocks, block * bits / 8], scales [n * blocks] and, when asymmetric,
        packed zero points; the layout table says how the reader dequantizes them."""
        if canonical in self._nbits:
            return self._nbits[canonical]
        n, k = t.shape
        fmt = t.quant
        block = _block_size(fmt.group_size, k, canonical, self.ckpt.source)
        blocks = k // block

        def pack_codes(r):
            return _pack_codes(r.codes, fmt.bits, block)

        def pack_scales(r):
            return _block_values(r.scales, k, block).astype(self.np_float)

        def pack_zero_points(r):
            return _pack_zero_points(r.zero_points, fmt.bits, k, block)

        def initializer(suffix: str, shape: tuple[int, ...], dtype, pack):
            # every initializer is row-major over the n output rows: a record that loads by rows
            # (a 256000-row head) is packed and written a block of rows at a time
            chunks = (lambda: (pack(r) for r in self._record_rows(t))) if isinstance(t.load, RowLoader) else None
            return self.lazy(f"{canonical}.{suffix}", shape, dtype, lambda: pack(self._record(t)), chunks)

        packed = initializer("qweight", (n, blocks, block * fmt.bits // 8), self.ir.DataType.UINT8, pack_codes)
        inputs = [packed, initializer("scales", (n * blocks,), self.float, pack_scales)]
        if not fmt.symmetric:
            width = math.ceil(blocks * fmt.bits / 8)
            inputs.append(initializer("zero_points", (n * width,), self.ir.DataType.UINT8, pack_zero_points))
        self.layout[canonical] = {"kind": "matmul_nbits", "name": canonical, "bits": fmt.bits, "block_size": block}
        self._nbits[canonical] = (inputs, block)
        return inputs, block

    def _record(self, t: LazyTensor):
        """The record of ``t``, loaded once per tensor however many initializers read it."""
        if self._cached[0] != t.name:
            self._cached = (t.name, self._finite(t, t.load()))
        return self._cached[1]

    def _record_rows(self, t: LazyTensor):
        """The record of ``t`` (whose load is a RowLoader) as records of successive blocks of rows."""
        for record in row_chunks(t, CHUNK_VALUES):
            yield self._finite(t, record)

    def _finite(self, t: LazyTensor, record):
        if not all_finite(record.scales):
            raise CheckpointError(f"tensor {t.name} has NaN or infinite scales", self.ckpt.source)
        return record

    def _rope_caches(self) -> None:
        """cos/sin [context, head_dim / 2] per distinct rope, float32, taken from transformers' own Gemma
        rotary embedding (converters.rope.rotary_tables): linear and YaRN scaling, YaRN's attention factor
        folded into the tables (cos/sin enter the rotation linearly, as in transformers' apply_rotary_pos_emb)."""
        spec = self.spec
        rows = self.options.context_length or spec.max_position
        self.rope = {}
        for layer in range(spec.num_layers):
            key = self._rope_key(layer)
            if key in self.rope:
                continue
            cos, sin = rope.rotary_tables(spec, layer, rows)
            tag = f"rope.{len(self.rope)}"
            self.rope[key] = (
                self._initializer(f"{tag}.cos", self.ir.tensor(cos.astype(self.np_float))),
                self._initializer(f"{tag}.sin", self.ir.tensor(sin.astype(self.np_float))),
            )

    def _rope_key(self, layer: int) -> tuple:
        """(base, scaling) of a layer's rope; which layers are scaled: GemmaSpec.layer_rope_scaling
        (Gemma 3 its global layers, Gemma 1 and 2 every layer, as transformers)."""
        scaling = self.spec.layer_rope_scaling(layer)
        if scaling and scaling.rope_type not in ("linear", "yarn"):
            # transformers' dynamic rope recomputes inv_freq from the length of each sequence once it passes
            # original_max_position_embeddings (ref: modeling_rope_utils.py dynamic_rope_update); the graph's
            # precomputed cos/sin tables cannot follow it.
            raise rope.refusal(
                self.spec,
                self.ckpt.source,
                "not written to ONNX: its precomputed cos/sin tables cannot follow a rope that changes with "
                "the sequence length",
            )
        return self.spec.layer_rope_theta(layer), scaling

    def _rope_of(self, layer: int):
        return self.rope[self._rope_key(layer)]

    def _masks(self, past_key0) -> None:
        """What attention needs besides q/k/v: GroupQueryAttention's sequence lengths, or, for the
        plain path, additive masks [batch, 1, 1, seq, total] (causal, padding, sliding window) over
        cache positions (past + i for query i)."""
        ir = self.ir
        if self.options.fused:
            lengths = self.op("ReduceSum", self.attention_mask, self.const([1], np.int64), keepdims=0)
            seqlens = self.op("Sub", lengths, self.const(1, np.int64))
            self.seqlens_k = self.op("Cast", seqlens, to=ir.DataType.INT32)
            total = self.op("Gather", self.op("Shape", self.attention_mask), self.const(1, np.int64), axis=0)
            self.total_len = self.op("Cast", total, to=ir.DataType.INT32)
            return
        past = self.op("Gather", self.op("Shape", past_key0), self.const(2, np.int64), axis=0)
        total = self.op("Gather", self.op("Shape", self.attention_mask), self.const(1, np.int64), axis=0)
        kv_pos = self.op("Range", self.const(0, np.int64), total, self.const(1, np.int64))
        q_pos = self.op("Range", past, total, self.const(1, np.int64))
        diff = self.op(
            "Sub",
            self.op("Unsqueeze", q_pos, self.const([1], np.int64)),
            self.op("Unsqueeze", kv_pos, self.const([0], np.int64)),
        )  # [seq, total]: query position - key position
        causal = self.op("GreaterOrEqual", diff, self.const(0, np.int64))
        padding = self.op(
            "Cast",
            self.op("Unsqueeze", self.attention_mask, self.const([1, 2, 3], np.int64)),
            to=ir.DataType.BOOL,
        )  # [batch, 1, 1, 1, total]
        lowest = self.const(np.finfo(np.float32).min, np.float32)
        zero = self.const(0.0, np.float32)

        def bias(allowed):
            return self.op("Where", self.op("And", allowed, padding), zero, lowest)

        self.mask = {"full": bias(causal)}
        if SLIDING in self.spec.layer_types:
            window = self.op("Less", diff, self.const(self.spec.sliding_window, np.int64))
            self.mask["sliding"] = bias(self.op("And", causal, window))

    def embedding(self):
        spec = self.spec
        t = self.ckpt.tensors["model.embed_tokens.weight"]
        self.head_record = None
        if t.quant is None and self.options.head_bits and spec.tie_embeddings:
            head, lookup = self.options.head_bits, self.options.lookup_bits or self.options.head_bits
            # The lookup reads the head's record, or its own table when its bits differ (it reads one
            # row per token: more bits cost bytes, not speed); the head copy is then named lm_head.
            self.head_record = self._quantized_head(t, head)
            if lookup != head:
                self.head_record = dataclasses.replace(self.head_record, name="lm_head.weight")
            t = self._quantized_head(t, lookup) if lookup != head else self.head_record
        if t.quant is None:
            self.embed = self.weight("model.embed_tokens.weight", "none")
            x = self.op("Gather", self.embed, self.input_ids, axis=0)
        else:
            x = self._gather_block_quantized(t)
        # ref: transformers GemmaModel.forward, normalizer = tensor(hidden_size**0.5, dtype=hidden dtype);
        # the residual stream starts here, float32 in every graph.
        scale = self.const(np.sqrt(np.float64(spec.hidden_size)).astype(np.float32))
        return self.op("Mul", self.to32(x), scale)

    def _gather_block_quantized(self, t: LazyTensor):
        """Embedding rows from a record: com.microsoft GatherBlockQuantized over MatMulNBits' own
        initializers reshaped to [vocab, ...], so the tied LM head shares the bytes (as
        onnxruntime-genai's builder shares them)."""
        fmt, (v, _) = t.quant, t.shape
        (packed, scales, *zero_points), block = self._nbits_initializers(t.name, t)
        rows = self.const([v, -1], np.int64)
        inputs = [self.op("Reshape", packed, rows), self.input_ids, self.op("Reshape", scales, rows)]
        if zero_points:
            inputs.append(self.op("Reshape", zero_points[0], rows))
        else:  # MatMulNBits' default zero point 2**(bits-1) is not GatherBlockQuantized's: state it
            offset = 1 << (fmt.bits - 1)
            packed_offset = offset | (offset << 4) if fmt.bits == 4 else offset
            width = math.ceil(t.shape[1] // block * fmt.bits / 8)
            inputs.append(self.const(np.full((1, width), packed_offset, np.uint8)))
            inputs[-1] = self.op("Expand", inputs[-1], self.const([v, width], np.int64))
        return self.op(
            "GatherBlockQuantized",
            *inputs,
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            block_size=block,
            bits=fmt.bits,
        )

    def add_norm(self, x, delta, canonical: str):
        """(norm(x + delta), x + delta), or (norm(x), x) when delta is None: onnxruntime's
        SkipSimplifiedLayerNormalization does both at once. ``x``, ``delta`` and the sum are the
        float32 residual stream; the normed output, the next matrix product's input, is cast to the
        graph's float type."""
        if delta is None:
            return self.to16(self.norm(x, canonical, wide=True)), x
        if not self.options.fused:
            x = self.op("Add", x, delta)
            return self.to16(self.norm(x, canonical, wide=True)), x
        scale = self._norm_scale(canonical, wide=True)
        normed, _, _, total = self.op(
            "SkipSimplifiedLayerNormalization",
            delta,
            x,
            scale,
            domain="com.microsoft",
            outputs=4,
            epsilon=self.spec.rms_eps,
        )
        return self.to16(normed), total

    def layer(self, i: int, x, delta, past):
        """One decoder layer on the residual ``x + delta``; returns the new residual and delta."""
        spec = self.spec
        p = f"model.layers.{i}."
        normed, x = self.add_norm(x, delta, p + "input_layernorm.weight")
        out, present = self.attention(i, normed, past)
        if spec.post_norms:  # float32 in, float32 out: its output joins the residual stream
            out = self.norm(self.to32(out), p + "post_attention_layernorm.weight", wide=True)
            y, x = self.add_norm(x, out, p + "pre_feedforward_layernorm.weight")
        else:
            y, x = self.add_norm(x, self.to32(out), p + "post_attention_layernorm.weight")
        y = self.to32(self.mlp(p, y))
        if spec.post_norms:
            y = self.norm(y, p + "post_feedforward_layernorm.weight", wide=True)
        return x, y, present

    def mlp(self, p: str, x):
        approximate = "tanh" if "tanh" in self.spec.activation else "none"
        gate, up = self.linears(x, [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], p + "mlp.gate_up_proj")
        gate = self.op("Gelu", gate, approximate=approximate)
        return self.linear(self.op("Mul", gate, up), p + "mlp.down_proj.weight")

    def linears(self, x, names: list[str], fused_name: str) -> list:
        """x @ W.T for each of ``names``; with fused ops, one MatMul(NBits) over the weights stacked
        along the output axis and a Split (when all are float, or all records of one format)."""
        tensors = [self.ckpt.tensors[n] for n in names]
        if not self.options.fused or len({t.quant for t in tensors}) != 1 or len({t.dtype for t in tensors}) != 1:
            return [self.linear(x, n) for n in names]
        rows = [t.shape[0] for t in tensors]
        stacked = _stacked(tensors, f"{fused_name}.weight", self.ckpt.source)
        if stacked.quant is None:
            y = self.op("MatMul", x, self.weight(stacked.name, "transpose", stacked))
        else:
            y = self._matmul_nbits(x, stacked.name, stacked)
        start = 0
        for name, n in zip(names, rows, strict=True):
            self.layout[name] = {**self.layout[stacked.name], "rows": [start, start + n]}
            start += n
        del self.layout[stacked.name]
        return self.op("Split", y, self.const(rows, np.int64), axis=-1, outputs=len(names))

    def attention(self, i: int, x, past):
        spec = self.spec
        p = f"model.layers.{i}.self_attn."
        q, k, v = self.linears(x, [p + f"{w}_proj.weight" for w in "qkv"], p + "qkv_proj")
        heads = (spec.num_heads, spec.num_kv_heads)
        if spec.qk_norm:
            q, k = (
                self.op(
                    "Reshape",
                    self.norm(
                        self.op("Reshape", t, self.const([0, 0, n, spec.head_dim], np.int64)), p + f"{w}_norm.weight"
                    ),
                    self.const([0, 0, n * spec.head_dim], np.int64),
                )
                for t, n, w in ((q, heads[0], "q"), (k, heads[1], "k"))
            )
        if self.options.fused:
            out, present = self._gqa(i, q, k, v, past)
        else:
            out, present = self._plain_attention(i, q, k, v, past)
        return self.linear(out, p + "o_proj.weight"), present

    def _gqa(self, i: int, q, k, v, past):
        """com.microsoft GroupQueryAttention: rotary (non-interleaved), scale, softcap and the sliding
        window in one CPU kernel; present = past + new keys/values (no shared buffer)."""
        spec = self.spec
        cos, sin = self._rope_of(i)
        sliding = spec.layer_types[i] == SLIDING
        out, present_k, present_v = self.op(
            "GroupQueryAttention",
            q,
            k,
            v,
            past[0],
            past[1],
            self.seqlens_k,
            self.total_len,
            cos,
            sin,
            domain="com.microsoft",
            outputs=3,
            num_heads=spec.num_heads,
            kv_num_heads=spec.num_kv_heads,
            scale=spec.attn_scale,
            softcap=float(spec.attn_softcap or 0.0),
            local_window_size=spec.sliding_window if sliding else -1,
            do_rotary=1,
            rotary_interleaved=0,
        )
        return out, (present_k, present_v)

    def _heads(self, t, n: int):
        """[batch, seq, n * head_dim] -> [batch, n, seq, head_dim]."""
        t = self.op("Reshape", t, self.const([0, 0, n, self.spec.head_dim], np.int64))
        return self.op("Transpose", t, perm=[0, 2, 1, 3])

    def _rotate(self, t, cos, sin):
        """HF rotary: t * cos + rotate_half(t) * sin, cos/sin [batch, 1, seq, head_dim]."""
        half = self.spec.head_dim // 2
        x1, x2 = self.op("Split", t, self.const([half, half], np.int64), axis=-1, outputs=2)
        rotated = self.op("Concat", self.op("Neg", x2), x1, axis=-1)
        return self.op("Add", self.op("Mul", t, cos), self.op("Mul", rotated, sin))

    def _plain_attention(self, i: int, q, k, v, past):
        spec = self.spec
        n, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        cos_table, sin_table = self._rope_of(i)
        cos, sin = (
            self.op(
                "Unsqueeze",
                self.op("Concat", *(2 * [self.op("Gather", table, self.position_ids, axis=0)]), axis=-1),
                self.const([1], np.int64),
            )
            for table in (cos_table, sin_table)
        )
        q = self._rotate(self._heads(q, n), cos, sin)
        k = self._rotate(self._heads(k, kv), cos, sin)
        v = self._heads(v, kv)
        present_k = self.op("Concat", past[0], k, axis=2)
        present_v = self.op("Concat", past[1], v, axis=2)
        # Query heads grouped by their kv head: [batch, kv, group, seq, d] against [batch, kv, 1, total, d].
        q5 = self.op("Reshape", q, self.const([0, kv, n // kv, -1, d], np.int64))
        k5 = self.op("Unsqueeze", present_k, self.const([2], np.int64))
        v5 = self.op("Unsqueeze", present_v, self.const([2], np.int64))
        scores = self.op("MatMul", q5, self.op("Transpose", k5, perm=[0, 1, 2, 4, 3]))
        if self.float != self.ir.DataType.FLOAT:
            scores = self.op("Cast", scores, to=self.ir.DataType.FLOAT)
        scores = self.op("Mul", scores, self.const(spec.attn_scale, np.float32))
        if spec.attn_softcap:  # ref: transformers Gemma2 eager_attention_forward, tanh(w / cap) * cap
            cap = self.const(spec.attn_softcap, np.float32)
            scores = self.op("Mul", self.op("Tanh", self.op("Div", scores, cap)), cap)
        mask = self.mask["sliding" if spec.layer_types[i] == SLIDING else "full"]
        probs = self.op("Softmax", self.op("Add", scores, mask), axis=-1)
        if self.float != self.ir.DataType.FLOAT:
            probs = self.op("Cast", probs, to=self.float)
        out = self.op("MatMul", probs, v5)  # [batch, kv, group, seq, d]
        out = self.op("Transpose", self.op("Reshape", out, self.const([0, n, -1, d], np.int64)), perm=[0, 2, 1, 3])
        return self.op("Reshape", out, self.const([0, 0, n * d], np.int64)), (present_k, present_v)

    def head(self, x):
        spec = self.spec
        name = "model.embed_tokens.weight" if spec.tie_embeddings else "lm_head.weight"
        t = self.ckpt.tensors[name]
        if self.head_record is not None:  # the tied head quantized here, maybe shared with the lookup
            logits = self._matmul_nbits(x, self.head_record.name, self.head_record)
        elif t.quant is not None:  # MatMulNBits of the record the lookup also reads
            logits = self._matmul_nbits(x, name, t)
        elif self.options.head_bits:  # an untied head, quantized here
            logits = self._matmul_nbits(x, name, self._quantized_head(t, self.options.head_bits))
        else:
            w = self.embed if spec.tie_embeddings else self.weight(name, "none")
            if self.options.fused:  # x @ w.T on the [vocab, hidden] table as stored, no transposed copy
                logits = self.op("FusedMatMul", x, w, domain="com.microsoft", transB=1)
            else:
                flat = self.op("Reshape", x, self.const([-1, spec.hidden_size], np.int64))
                logits = self.op("Gemm", flat, w, transB=1)
                shape = self.op(
                    "Concat",
                    self.op("Slice", self.op("Shape", x), self.const([0], np.int64), self.const([2], np.int64)),
                    self.const([-1], np.int64),
                    axis=0,
                )
                logits = self.op("Reshape", logits, shape)
        if self.float != self.ir.DataType.FLOAT:
            logits = self.op("Cast", logits, to=self.ir.DataType.FLOAT)
        if spec.final_softcap:  # ref: transformers Gemma2ForCausalLM.forward
            cap = self.const(spec.final_softcap, np.float32)
            logits = self.op("Mul", self.op("Tanh", self.op("Div", logits, cap)), cap)
        return logits

    def _quantized_head(self, t: LazyTensor, bits: int) -> LazyTensor:
        """The LM head as a round-to-nearest record (symmetric over the full code range, --head-bits
        bits, blocks of 32); a tied embedding shares it through GatherBlockQuantized."""
        from quantizers.record import QuantFormat
        from quantizers.rtn import quantize_weight

        fmt = QuantFormat(bits, 32, True, "f32")
        if isinstance(t.load, RowLoader):  # quantized a block of rows at a time as the writer streams them
            rows = t.load
            load = RowLoader(lambda a, b: quantize_weight(rows.rows(a, b), fmt, True), rows.n)
        else:
            load = lambda: quantize_weight(t.load(), fmt, True)  # noqa: E731
        return dataclasses.replace(t, quant=fmt, load=load, raw=None)


@functools.cache
def _streamed_tensor_class() -> type:
    """onnx_ir's LazyTensor with a ``tofile`` that writes ``self.chunks()`` in turn: onnx_ir writes an
    external initializer through ``tofile`` when it has one (ref: onnx_ir external_data.py
    _write_tensor_at), so a tensor larger than memory allows is never whole; ``numpy()`` and
    ``tobytes()`` still make it whole."""
    import onnx_ir as ir

    class StreamedTensor(ir.LazyTensor):
        chunks = None

        def tofile(self, file) -> None:
            written = 0
            for part in self.chunks():
                written += file.write(np.ascontiguousarray(part).reshape(-1).view(np.uint8))
            if written != self.nbytes:
                raise CheckpointError(f"initializer {self.name}: wrote {written} bytes, expected {self.nbytes}")

    return StreamedTensor


def _stacked(tensors: list[LazyTensor], name: str, source: str) -> LazyTensor:
    """Weights [out_i, in] (all float of one dtype, or all records of one format) stacked along out;
    read by rows (RowLoader) when every part is."""
    import torch

    from quantizers.record import QuantizedTensor

    first = tensors[0]
    shape = (sum(t.shape[0] for t in tensors), first.shape[1])

    def join(pieces: list) -> object:
        if first.quant is not None:
            records = [data for _, data in pieces]
            zero_points = None if first.quant.symmetric else torch.cat([r.zero_points for r in records])
            codes, scales = torch.cat([r.codes for r in records]), torch.cat([r.scales for r in records])
            return QuantizedTensor(codes, scales, zero_points, first.quant)
        for t, data in pieces:
            if not all_finite(data):
                raise CheckpointError(f"tensor {t.name} has NaN or infinite values", source)
        return torch.cat([data for _, data in pieces])

    if all(isinstance(t.load, RowLoader) for t in tensors):
        starts = [sum(t.shape[0] for t in tensors[:i]) for i in range(len(tensors))]

        def rows(a: int, b: int):
            pieces = []
            for t, start in zip(tensors, starts, strict=True):
                lo, hi = max(a, start), min(b, start + t.shape[0])
                if lo < hi:
                    pieces.append((t, t.load.rows(lo - start, hi - start)))
            return join(pieces)

        load = RowLoader(rows, shape[0])
    else:
        load = lambda: join([(t, t.load()) for t in tensors])  # noqa: E731
    return LazyTensor(name, shape, first.dtype, load=load, quant=first.quant)


def _block_size(group_size: int | None, k: int, name: str, source: str) -> int:
    """MatMulNBits' block: the record's group, or for a per-channel record the largest block that
    divides the row (its scale repeated per block: the same weights exactly)."""
    if group_size is not None:
        if group_size not in BLOCK_SIZES:
            raise UnsupportedError(f"tensor {name}: group size {group_size} is not a MatMulNBits block size", source)
        return group_size
    for block in (128, 64, 32, 16):
        if k % block == 0:
            return block
    raise UnsupportedError(f"tensor {name}: {k} columns split into no MatMulNBits block (16-128)", source)


def _block_values(values, k: int, block: int) -> np.ndarray:
    """Per-group scales [n, groups] as one value per block, flattened [n * k / block] in float32."""
    import torch

    values = values.to(torch.float32)
    repeat = (k // block) // values.shape[1]
    return values.repeat_interleave(repeat, dim=1).reshape(-1).numpy()


def _pack_codes(codes, bits: int, block: int) -> np.ndarray:
    """Signed codes [n, k] -> MatMulNBits' B [n, k / block, block * bits / 8] uint8: code + 2**(bits-1),
    4-bit values two per byte, the even column in the low nibble (ref: onnxruntime contrib_ops
    MatMulNBits spec, 'elements packed in little-endian order')."""
    n, k = codes.shape
    u = (codes.numpy().astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return np.ascontiguousarray(u.reshape(n, k // block, -1))


def _pack_zero_points(zero_points, bits: int, k: int, block: int) -> np.ndarray:
    """Signed zero points [n, groups] -> unsigned, one per block, 4-bit packed per row with the row
    padded to whole bytes: [n * ceil(blocks * bits / 8)]."""
    import torch

    blocks = k // block
    zp = zero_points.to(torch.int16).repeat_interleave(blocks // zero_points.shape[1], dim=1)
    u = (zp.numpy() + (1 << (bits - 1))).astype(np.uint8)
    if bits == 4:
        if blocks % 2:
            u = np.concatenate([u, np.zeros((u.shape[0], 1), np.uint8)], axis=1)
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return np.ascontiguousarray(u.reshape(-1))


# --- reading ---------------------------------------------------------------------------------


def sniff(path: Path) -> bool:
    return (path.is_dir() and (path / MODEL).is_file()) or (path.is_file() and path.suffix == ".onnx")


def model_file(path: Path) -> Path:
    return path / MODEL if path.is_dir() else path


def load_proto(model_path: Path):
    """The ModelProto of ``model_path`` without its external data; InputError if it is not ONNX."""
    import onnx

    try:
        return onnx.load(str(model_path), load_external_data=False)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  (onnx raises DecodeError and others for a file that is not ONNX)
        raise InputError(f"not a readable ONNX model: {exc}", model_path) from None


def check_external_data(model_path: Path, proto=None) -> None:
    """InputError naming the first external-data reference that is malformed, points outside the
    model's folder, or names a file that is missing or too short for its tensors."""
    import onnx

    proto = proto if proto is not None else load_proto(model_path)
    needed: dict[str, tuple[int, str]] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location, end = _external_reference(tensor, model_path)
        if end > needed.get(location, (0, ""))[0]:
            needed[location] = (end, tensor.name)
    for location, (end, tensor) in needed.items():
        data = model_path.parent / location
        if not data.is_file():
            raise InputError(f"external data file {location} is missing (tensor {tensor} is stored there)", model_path)
        if data.stat().st_size < end:
            raise InputError(
                f"external data file {location} is truncated: {data.stat().st_size} bytes, tensor {tensor} "
                f"ends at byte {end}",
                model_path,
            )


def _external_reference(tensor, model_path: Path) -> tuple[str, int]:
    """(location, end byte) of an external initializer; the location a plain path inside the folder
    (ref: onnx external_data_helper.py ExternalDataInfo; onnx.checker refuses absolute and ``..`` paths)."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    try:
        offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
    except ValueError:
        offset = length = -1
    if offset < 0 or length < 0:
        raise InputError(f"tensor {tensor.name}: external data offset/length are not byte counts: {info}", model_path)
    if not isinstance(location, str):  # protobuf hands back bytes for a string field that is not UTF-8
        raise InputError(f"tensor {tensor.name}: external data location {location!r:.80} is not UTF-8 text", model_path)
    parts = Path(location).parts
    if not location or Path(location).is_absolute() or ".." in parts or location.startswith(("/", "\\")):
        raise InputError(
            f"tensor {tensor.name}: external data location {location!r} is not in the model's folder", model_path
        )
    return location, offset + length


def read(path: str | Path) -> Checkpoint:
    """An ONNX graph gemport wrote, back as a Checkpoint: initializers under canonical names,
    transposes and ``1 + w`` undone, MatMulNBits / GatherBlockQuantized weights dequantized to f32."""
    file, proto, spec, layout = open_model(path)
    values = {t.name: t for t in proto.graph.initializer}
    tensors = {
        canonical: LazyTensor(canonical, shape, "f32", load=_loader(values, layout[canonical], shape, file))
        for canonical, shape in expected_shapes(spec).items()
    }
    folder = file.parent
    tokenizer_files = {n: (folder / n).read_bytes() for n in _TOKENIZER_FILES if (folder / n).is_file()}
    return Checkpoint(spec=spec, tensors=tensors, tokenizer_files=tokenizer_files, source=str(path))


def open_model(path: str | Path) -> tuple[Path, Any, GemmaSpec, dict]:
    """(model file, graph without external data, spec, layout table) of a folder or file gemport wrote,
    every check of ``read`` made except loading tensors: external data present and long enough, gemport's
    metadata, a layout entry of the right kind and shape for every canonical tensor."""
    path = Path(path)
    file = model_file(path)
    if not file.is_file():
        raise InputError(f"no {MODEL} in the folder", path)
    proto = load_proto(file)  # parsed once; only the metadata and the initializers are read
    check_external_data(file, proto)
    props = {e.key: e.value for e in proto.metadata_props}
    if SPEC_KEY not in props or LAYOUT_KEY not in props:
        raise UnsupportedError(
            "this ONNX model was not written by gemport (no gemport.spec / gemport.layout metadata); "
            "gemport reads back only its own graphs (onnxruntime validates any decoder graph)",
            file,
        )
    spec, layout = _metadata(props, file)
    for canonical, shape in expected_shapes(spec).items():
        entry = layout.get(canonical)
        if entry is None:
            raise CheckpointError(f"tensor {canonical} is not in the model's layout table", file)
        _check_entry(canonical, entry, shape, file)
    return file, proto, spec, layout


def _metadata(props, file: Path) -> tuple[GemmaSpec, dict]:
    """The spec and layout table gemport stores in the model's metadata, each checked."""
    try:
        spec_json, layout = json.loads(props[SPEC_KEY]), json.loads(props[LAYOUT_KEY])
    except (ValueError, RecursionError) as exc:
        raise InputError(f"gemport metadata is not valid JSON: {exc}", file) from None
    try:
        spec = GemmaSpec.from_json(spec_json)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"invalid {SPEC_KEY} metadata: {type(exc).__name__}: {exc}", file) from None
    if not isinstance(layout, dict):
        raise InputError(f"{LAYOUT_KEY} metadata is not an object", file)
    return spec, layout


# What each layout kind's entry holds (the writer's _Builder.weight / _nbits_initializers / linears).
_ENTRY_KEYS = {
    "float": {"kind", "name", "transform", "rows"},
    "matmul_nbits": {"kind", "name", "bits", "block_size", "rows"},
}


def _check_entry(canonical: str, entry, shape: tuple[int, ...], file: Path) -> None:
    """UnsupportedError for a layout entry this reader does not know, rather than misreading it."""

    def refuse(why: str):
        return UnsupportedError(f"tensor {canonical}: layout entry {json.dumps(entry)[:200]} {why}", file)

    if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str) or entry["kind"] not in _ENTRY_KEYS:
        raise refuse("is not one this gemport knows")
    unknown = set(entry) - _ENTRY_KEYS[entry["kind"]]
    if unknown or not isinstance(entry.get("name"), str):
        raise refuse(f"has unknown keys {sorted(unknown)}" if unknown else "has no initializer name")
    if entry["kind"] == "float" and entry.get("transform", "none") not in ("none", "transpose"):
        raise refuse("has an unknown transform")
    if entry["kind"] == "matmul_nbits" and (
        type(entry.get("bits")) is not int
        or entry["bits"] not in (4, 8)
        or type(entry.get("block_size")) is not int
        or entry["block_size"] not in BLOCK_SIZES
    ):
        raise refuse(f"needs bits 4 or 8 and a block size in {BLOCK_SIZES}")
    if entry["kind"] == "matmul_nbits" and len(shape) != 2:
        raise refuse(f"is a MatMulNBits matrix for a {len(shape)}-D tensor")
    rows = entry.get("rows", [0, 1])
    if not (isinstance(rows, list) and len(rows) == 2 and all(type(r) is int for r in rows) and 0 <= rows[0] < rows[1]):
        raise refuse("has rows that are not [start, end)")


def _loader(values: dict, entry: dict, shape: tuple[int, ...], file: Path):
    import onnx_ir as ir
    import torch

    def array(name: str, kinds: tuple[str, ...]) -> np.ndarray:
        if name not in values:
            raise CheckpointError(f"initializer {name} is missing", file)
        # The stored type first: onnx_ir allocates a 4-bit tensor from its dims before it looks at the
        # data, so a lying 4-bit initializer would take unbounded memory (tests/fuzz finding).
        stored = _ONNX_TYPES.get(values[name].data_type)
        if stored not in kinds:
            raise CheckpointError(
                f"initializer {name} is stored as {_onnx_type_name(values[name].data_type)}, expected "
                f"{' or '.join(kinds)}",
                file,
            )
        try:
            out = ir.serde.deserialize_tensor(values[name], file.parent).numpy()
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  (onnx_ir reading a damaged or short initializer)
            raise CheckpointError(f"initializer {name} cannot be read: {type(exc).__name__}: {exc}", file) from None
        if out.dtype.name not in kinds:
            raise CheckpointError(f"initializer {name} is {out.dtype.name}, expected {' or '.join(kinds)}", file)
        return out

    def load():
        name, kind = entry["name"], entry["kind"]
        if kind == "float":
            w = torch.from_numpy(np.array(array(name, _FLOATS), dtype=np.float32))
            if entry.get("transform", "none") == "transpose":
                if w.ndim != 2:
                    raise CheckpointError(f"initializer {name} is {w.ndim}-D, a transposed weight is 2-D", file)
                w = w.t().contiguous()
        else:  # matmul_nbits
            w = _dequantize(
                array(f"{name}.qweight", ("uint8",)),
                array(f"{name}.scales", _FLOATS),
                array(f"{name}.zero_points", ("uint8",)) if f"{name}.zero_points" in values else None,
                entry["bits"],
                entry["block_size"],
                shape[1],
                name,
                file,
            )
        if "rows" in entry:  # one of the projections stacked into a fused MatMul
            w = w[entry["rows"][0] : entry["rows"][1]].contiguous()
        if tuple(w.shape) != shape:
            raise CheckpointError(f"tensor {name} is stored as {list(w.shape)}, expected {list(shape)}", file)
        return w

    return load


_FLOATS = ("float32", "float16", "bfloat16")
# TensorProto.DataType numbers of the types the reader takes, as numpy names (ref: onnx/onnx.proto3,
# TensorProto.DataType: FLOAT 1, UINT8 2, FLOAT16 10, BFLOAT16 16)
_ONNX_TYPES = {1: "float32", 2: "uint8", 10: "float16", 16: "bfloat16"}


def _onnx_type_name(data_type: int) -> str:
    import onnx

    try:
        return onnx.TensorProto.DataType.Name(data_type)
    except ValueError:
        return f"data type {data_type}"


def _dequantize(packed, scales, zero_points, bits: int, block: int, k: int, name: str = "", file: Path | None = None):
    """MatMulNBits' dequantization: (q - zero_point) * scale per block, zero point 2**(bits-1) when absent.

    Sizes (ref: onnxruntime contrib_defs MatMulNBits): B [N, k_blocks, block * bits / 8] uint8, scales
    N * k_blocks, zero_points N * ceil(k_blocks * bits / 8) uint8; checked before use."""
    import torch

    n = packed.shape[0] if packed.ndim else 0
    blocks = k // block
    zp_bytes = n * -(-blocks * bits // 8)
    if (
        k % block
        or packed.size != n * blocks * block * bits // 8
        or scales.size != n * blocks
        or (zero_points is not None and zero_points.size != zp_bytes)
    ):
        raise CheckpointError(
            f"MatMulNBits initializers of {name} do not fit {k} input columns in blocks of {block} at {bits} bits: "
            f"B {list(packed.shape)}, scales {list(scales.shape)}"
            + (f", zero points {list(zero_points.shape)}" if zero_points is not None else ""),
            file,
        )
    u = packed.reshape(n, -1)
    if bits == 4:
        u = np.stack([u & 0x0F, u >> 4], axis=-1).reshape(n, -1)
    q = u[:, :k].astype(np.float32).reshape(n, blocks, block)
    if zero_points is None:
        zp = np.full((n, blocks), 1 << (bits - 1), np.float32)
    else:
        z = zero_points.reshape(n, -1)
        if bits == 4:
            z = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1)
        zp = z[:, :blocks].astype(np.float32)
    w = (q - zp[..., None]) * scales.astype(np.float32).reshape(n, blocks)[..., None]
    return torch.from_numpy(w.reshape(n, k))
