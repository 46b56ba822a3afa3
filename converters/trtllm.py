"""TensorRT-LLM checkpoints of Gemma 1, 2 and 3: write (and read back) the folder ``trtllm-build`` takes.

A checkpoint is ``config.json`` (TensorRT-LLM's ``PretrainedConfig`` fields) and one
``rank{N}.safetensors`` per rank, rank = pp_rank * tp_size + tp_rank (ref: TensorRT-LLM
tensorrt_llm/mapping.py ``Mapping``: tp_rank = rank % tp_size, pp_rank = rank // tp_size).
Nothing here imports TensorRT-LLM: the layout is written from gemport's canonical checkpoint.

Names and transforms (ref: TensorRT-LLM tensorrt_llm/models/gemma/convert.py and model.py
``GemmaDecoderLayer``; modelopt/torch/export/layer_utils.py and model_config_export.py):

- ``transformer.vocab_embedding.weight``, ``transformer.ln_f.weight``, ``lm_head.weight`` (a tied LM
  head is left out when the embedding is on the same rank, ``share_embedding_table``, as ModelOpt does);
- per layer ``transformer.layers.{i}.``: ``input_layernorm``, ``attention.qkv`` ([q; k; v] rows
  of this rank's heads), ``attention.dense`` (o_proj), ``attention.q_layernorm`` /
  ``k_layernorm`` (Gemma 3), ``post_layernorm`` (HF's post_attention_layernorm),
  ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` (Gemma 2 and 3), ``mlp.fc``
  (gate_proj, the GELU branch), ``mlp.gate`` (up_proj), ``mlp.proj`` (down_proj);
- RMSNorm weights are stored as ``1 + w`` (TensorRT-LLM's RmsNorm multiplies by the weight);
- tensor parallel: q/k/v split by heads, a KV head copied to ``tp / kv`` ranks when there are
  fewer KV heads than ranks; fc and gate split on the output rows; dense and proj on the input
  columns; the LM head on the vocabulary rows (padded to a multiple of tp_size); norms and the
  embedding whole on every rank;
- pipeline parallel: rank files of stage p hold the layers of ``Mapping.pp_layers`` with their
  global indices, the embedding on the first stage, ``ln_f`` and the LM head on the last.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from gemport.checkpoint import DTYPES, Checkpoint, LazyTensor, torch_dtype
from gemport.errors import CheckpointError, InputError, UnsupportedError
from gemport.output import atomic_output
from gemport.progress import progress, stage
from gemport.spec import FULL, SLIDING, GemmaSpec, RopeScaling
from quantizers import fp16_range
from quantizers.record import QuantFormat, QuantizedTensor

log = logging.getLogger(__name__)

CONFIG = "config.json"
MANIFEST = "gemport.json"
BUILD_SCRIPT = "build-engine.sh"
ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
FAMILIES = {a: f for f, a in ARCHITECTURES.items()}
# ref: tensorrt_llm/_utils.py str_dtype_to_torch: the names config.json's "dtype" takes.
DTYPE_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


@dataclass(frozen=True)
class Mapping:
    """tp_size x pp_size ranks; ``layers(pp_rank)`` the decoder layers of one pipeline stage."""

    tp_size: int = 1
    pp_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def layers(self, pp_rank: int, num_layers: int) -> range:
        """ref: tensorrt_llm/mapping.py ``Mapping.pp_layers``: torch.tensor_split of the layer range, so
        the first ``num_layers % pp_size`` stages hold one layer more."""
        base, extra = divmod(num_layers, self.pp_size)
        start = pp_rank * base + min(pp_rank, extra)
        return range(start, start + base + (pp_rank < extra))


def check_mapping(spec: GemmaSpec, mapping: Mapping, source: str | Path | None = None) -> None:
    """UnsupportedError for a tp/pp size TensorRT-LLM cannot shard this model by (ref:
    tensorrt_llm/models/convert_utils.py ``split_qkv_tp`` / ``dup_kv_weight``: heads split evenly,
    KV heads either split evenly or each copied to tp / kv ranks)."""
    tp, kv = mapping.tp_size, spec.num_kv_heads
    for name, size in (("tp_size", tp), ("pp_size", mapping.pp_size)):
        if type(size) is not int or size < 1:
            raise UnsupportedError(f"{name} must be an integer >= 1, got {size!r}", source)
    if spec.num_heads % tp:
        raise UnsupportedError(
            f"tp_size {tp} does not divide the {spec.num_heads} attention heads (TensorRT-LLM splits q by heads)",
            source,
        )
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise UnsupportedError(
            f"tp_size {tp} and {kv} KV heads: TensorRT-LLM splits KV heads evenly or copies each to tp / kv "
            "ranks, so one must divide the other",
            source,
        )
    if mapping.pp_size > spec.num_layers:
        raise UnsupportedError(f"pp_size {mapping.pp_size} is more than the {spec.num_layers} layers", source)
    if spec.intermediate_size % tp:
        raise UnsupportedError(f"tp_size {tp} does not divide intermediate_size {spec.intermediate_size}", source)


# ---------------------------------------------------------------------------------------------
# config.json


def trtllm_config(spec: GemmaSpec, dtype: str, mapping: Mapping, quantization: dict | None = None) -> dict:
    """config.json of a checkpoint: every field TensorRT-LLM's Gemma model reads, from ``spec``
    (ref: tensorrt_llm/models/gemma/config.py ``GemmaConfig``, GEMMA2_ADDED_FIELDS / GEMMA3_ADDED_FIELDS;
    tensorrt_llm/models/modeling_utils.py ``PretrainedConfig.to_dict``)."""
    cfg: dict = {
        "architecture": ARCHITECTURES[spec.family],
        "dtype": DTYPE_NAMES[dtype],
        "logits_dtype": "float32",
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_size": spec.head_dim,
        "intermediate_size": spec.intermediate_size,
        "hidden_act": spec.activation,
        "norm_epsilon": spec.rms_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": spec.rope_theta,
        "rotary_scaling": _rotary_scaling(spec.rope_scaling),
        "share_embedding_table": shares_embedding(spec, mapping),
        # GemmaConfig sets it to tp_size > 1 whatever is written (ref: gemma/config.py); ModelOpt writes true
        "use_parallel_embedding": True,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": mapping.world_size, "tp_size": mapping.tp_size, "pp_size": mapping.pp_size},
        "quantization": quantization or {"quant_algo": None, "kv_cache_quant_algo": None},
        "bias": False,
        "mlp_bias": False,
        "attn_bias": False,
    }
    if spec.family in ("gemma2", "gemma3"):
        scalar = spec.query_pre_attn_scalar or spec.head_dim
        cfg["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar  # Gemma2ConfigGroup: int
        cfg["final_logit_softcapping"] = spec.final_softcap
        cfg["inter_layernorms"] = True
    if spec.family == "gemma2":
        cfg["attn_logit_softcapping"] = spec.attn_softcap
        cfg["sliding_window"] = spec.sliding_window  # TensorRT-LLM takes it at run time (build_command)
    if spec.family == "gemma3":
        cfg["sliding_window"] = spec.sliding_window
        cfg["rope_local_base_freq"] = spec.rope_local_theta or spec.rope_theta
        cfg["_sliding_window_pattern"] = sliding_pattern(spec)
    return cfg


def sliding_pattern(spec: GemmaSpec) -> int:
    """``_sliding_window_pattern`` n: layer i is global when (i + 1) % n == 0 (ref:
    tensorrt_llm/models/gemma/model.py ``GemmaDecoderLayer``); UnsupportedError for layer types no n gives."""
    for n in range(1, spec.num_layers + 2):
        if tuple(FULL if (i + 1) % n == 0 else SLIDING for i in range(spec.num_layers)) == spec.layer_types:
            return n
    raise UnsupportedError("the layer types follow no sliding-window pattern TensorRT-LLM can state")


def _rotary_scaling(scaling: RopeScaling | None) -> dict | None:
    """ref: tensorrt_llm/layers/attention.py ``RopeEmbeddingUtils`` / functional.py RotaryScalingType:
    {"type": "linear" | "dynamic" | "yarn", "factor": f, ...}."""
    if scaling is None:
        return None
    if scaling.rope_type != "linear":
        raise UnsupportedError(f"rope scaling {scaling.rope_type!r}: the TensorRT-LLM writer takes linear rope scaling")
    return {"type": "linear", "factor": scaling.factor}


# ---------------------------------------------------------------------------------------------
# tensors: canonical (HF) -> TensorRT-LLM, per rank

# Per-layer table: TensorRT-LLM name -> (canonical names, how it is split across tp ranks).
ROWS, COLS, WHOLE, QKV = "rows", "cols", "whole", "qkv"


def layer_table(spec: GemmaSpec) -> dict[str, tuple[tuple[str, ...], str]]:
    table = {
        "input_layernorm.weight": (("input_layernorm.weight",), WHOLE),
        "attention.qkv.weight": (
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            QKV,
        ),
        "attention.dense.weight": (("self_attn.o_proj.weight",), COLS),
    }
    if spec.qk_norm:
        table["attention.q_layernorm.weight"] = (("self_attn.q_norm.weight",), WHOLE)
        table["attention.k_layernorm.weight"] = (("self_attn.k_norm.weight",), WHOLE)
    table["post_layernorm.weight"] = (("post_attention_layernorm.weight",), WHOLE)
    if spec.post_norms:
        table["pre_feedforward_layernorm.weight"] = (("pre_feedforward_layernorm.weight",), WHOLE)
        table["post_feedforward_layernorm.weight"] = (("post_feedforward_layernorm.weight",), WHOLE)
    table["mlp.fc.weight"] = (("mlp.gate_proj.weight",), ROWS)
    table["mlp.gate.weight"] = (("mlp.up_proj.weight",), ROWS)
    table["mlp.proj.weight"] = (("mlp.down_proj.weight",), COLS)
    return table


def padded_vocab(vocab: int, tp: int) -> int:
    """ref: tensorrt_llm/_utils.py ``pad_vocab_size``: vocabulary rows rounded up to a multiple of tp."""
    return -(-vocab // tp) * tp


def kv_heads_of(rank: int, spec: GemmaSpec, tp: int) -> range:
    """The KV heads tp rank ``rank`` holds: its share, or the one head it shares with tp / kv - 1 others
    (ref: tensorrt_llm/models/convert_utils.py ``dup_kv_weight``: each head repeated tp / kv times in a row)."""
    kv = spec.num_kv_heads
    if kv >= tp:
        n = kv // tp
        return range(rank * n, (rank + 1) * n)
    head = rank // (tp // kv)
    return range(head, head + 1)


def shares_embedding(spec: GemmaSpec, mapping: Mapping) -> bool:
    """A tied LM head is left out and shared with the embedding when both sit on one rank, as ModelOpt
    exports it (ref: modelopt/torch/export/tensorrt_llm_utils.py ``convert_to_tensorrt_llm_config``:
    share_embedding_table when the LM head is tied and pp_size is 1)."""
    return spec.tie_embeddings and mapping.pp_size == 1


def cutter(split: str, spec: GemmaSpec, tp: int, tp_rank: int) -> Callable:
    """``cut(matrices)``: this rank's part of a projection's matrices stacked by output rows ([out, in] weights,
    codes, or [out, groups] scales): rows of its heads for qkv (q, then k, then v), rows for fc/gate, columns
    for dense/proj (by the tp-th part of whatever width the matrix has)."""
    import torch

    d, q_heads = spec.head_dim, spec.num_heads // tp
    kv = kv_heads_of(tp_rank, spec, tp)

    def cut(ms):
        if split == ROWS:
            n = ms[0].shape[0] // tp
            return ms[0][tp_rank * n : (tp_rank + 1) * n]
        if split == COLS:
            n = ms[0].shape[1] // tp
            return ms[0][:, tp_rank * n : (tp_rank + 1) * n]
        q, k, v = ms
        parts = [q[tp_rank * q_heads * d : (tp_rank + 1) * q_heads * d]]
        return torch.cat(parts + [k[kv.start * d : kv.stop * d], v[kv.start * d : kv.stop * d]])

    return cut


def part_shape(split: str, spec: GemmaSpec, tp: int, tp_rank: int, shape: tuple[int, int]) -> tuple[int, int]:
    """The shape of this rank's part of a projection whose whole (q for qkv) is ``shape``."""
    rows, cols = shape
    if split == ROWS:
        return rows // tp, cols
    if split == COLS:
        return rows, cols // tp
    return (spec.num_heads // tp + 2 * len(kv_heads_of(tp_rank, spec, tp))) * spec.head_dim, cols


def rank_tensors(
    ckpt: Checkpoint, dtype: str, mapping: Mapping, rank: int, awq: bool = False, scales_as_stored: bool = False
) -> list[LazyTensor]:
    """The tensors of rank ``rank`` in TensorRT-LLM's names, shapes and order, floats cast to ``dtype``;
    with ``awq`` every projection is a record written in the W4A16_AWQ layout (three tensors), its scales
    in ``dtype`` or, ``scales_as_stored``, in the records' scale dtype (what the reader expects to find)."""
    spec, tp = ckpt.spec, mapping.tp_size
    tp_rank, pp_rank = rank % tp, rank // tp
    out: list[LazyTensor] = []
    src = ckpt.tensors
    vocab = functools.partial(_vocab_rows, vocab=spec.vocab_size, dtype=dtype, tp=tp, tp_rank=tp_rank)
    if pp_rank == 0:
        out.append(vocab("transformer.vocab_embedding.weight", src["model.embed_tokens.weight"]))
    table = layer_table(spec)
    layers = mapping.layers(pp_rank, spec.num_layers)
    for i in layers:
        local = f"transformer.layers.{i - layers.start}."  # ref: model.py GemmaDecoderLayer.local_layer_idx
        for name, (canon, split) in table.items():
            tensors = [src[f"model.layers.{i}.{c}"] for c in canon]
            if split == WHOLE:
                out.append(LazyTensor(local + name, tensors[0].shape, dtype, load=_norm_loader(tensors[0], dtype)))
                continue
            cut = cutter(split, spec, tp, tp_rank)
            shape = part_shape(split, spec, tp, tp_rank, tensors[0].shape)
            if awq:
                scale_dtype = tensors[0].quant.scale_dtype if scales_as_stored else dtype
                out.extend(awq_tensors(local + name.removesuffix(".weight"), tensors, cut, shape, dtype, scale_dtype))
            else:
                load = functools.partial(_cut_float, tensors, cut, dtype)
                out.append(LazyTensor(local + name, shape, dtype, load=load))
    if pp_rank == mapping.pp_size - 1:
        norm = src["model.norm.weight"]
        out.append(LazyTensor("transformer.ln_f.weight", norm.shape, dtype, load=_norm_loader(norm, dtype)))
        if not shares_embedding(spec, mapping):
            out.append(vocab("lm_head.weight", src.get("lm_head.weight", src["model.embed_tokens.weight"])))
    return out


def norm_weight(w, dtype: str):
    """The stored ``1 + w`` of a canonical RMSNorm weight: ``w`` in ``dtype`` (the model as loaded for export),
    plus one in float32, rounded to ``dtype`` (ref: modelopt/torch/export/layer_utils.py
    ``build_layernorm_config``, ``weight.float() + 1.0`` of the model's weight; TensorRT-LLM's own
    converter adds one to the source's float32 weight, which differs from this for a float32 source only)."""
    return (w.to(torch_dtype(dtype)).float() + 1.0).to(torch_dtype(dtype))


def _norm_loader(t: LazyTensor, dtype: str) -> Callable:
    return lambda: norm_weight(t.load(), dtype)


def _cut_float(tensors: list[LazyTensor], cut: Callable, dtype: str):
    return cut([t.load().to(torch_dtype(dtype)) for t in tensors]).contiguous()


def _vocab_rows(name: str, t: LazyTensor, vocab: int, dtype: str, tp: int, tp_rank: int) -> LazyTensor:
    """This rank's rows of the embedding or LM head, the table padded with zero rows to a multiple of tp
    (ref: model.py ``GemmaForCausalLM``: lm_head of pad_vocab_size rows; layers/embedding.py: a parallel
    embedding of ceil(vocab / tp) rows per rank, use_parallel_embedding being tp_size > 1 for Gemma)."""
    import torch

    n = padded_vocab(vocab, tp) // tp

    def load():
        w = t.load().to(torch_dtype(dtype))[tp_rank * n : (tp_rank + 1) * n]
        if w.shape[0] < n:  # the last rank's padding rows
            w = torch.cat([w, w.new_zeros(n - w.shape[0], w.shape[1])])
        return w.contiguous()

    return LazyTensor(name, (n, t.shape[1]), dtype, load=load)


# ---------------------------------------------------------------------------------------------
# weight-only quantization
#
# W4A16_AWQ, as ModelOpt exports it and TensorRT-LLM re-lays it for the build GPU when it loads the
# checkpoint (ref: modelopt/torch/export/quant_utils.py ``to_quantized_weight``; tensorrt_llm/models/
# modeling_utils.py ``preprocess_perlayer_weights``: preprocess_weights_for_mixed_gemm of weight.T,
# weights_scaling_factor transposed, prequant_scaling_factor as [1, in]), per linear module P:
#   P.weight                   int8 [out / 2, in]: signed int4 codes, rows 2j and 2j + 1 in the low and
#                              high nibble of byte [j, i]
#   P.weights_scaling_factor   [out, in / group] in the checkpoint dtype
#   P.prequant_scaling_factor  [in] in the checkpoint dtype, multiplied into the input (1 for gemport's
#                              records: AWQ's scales are folded into the preceding norm or projection)
# and W = code * scale[row, col // group]: y = (x * prequant) @ W.T.
#
# W4A16_GPTQ is not written: TensorRT-LLM's loader leaves such weights as stored, so they must be laid out
# for one GPU architecture already (preprocess_perlayer_weights has no GPTQ case), and its Gemma model does
# not list the algorithm (model.py ``assert_valid_quant_algo``). GPTQ records are symmetric int4 groups
# with the same arithmetic: they are written in the W4A16_AWQ layout with unit pre-quant scales.
#
# W8A16 / W4A16 (per channel): TensorRT-LLM's own converter writes int8 weights pre-laid for the GPU of
# the machine that converted (convert.py ``quantize`` via symmetric_quantize_last_axis_of_batched_matrix);
# a checkpoint with float weights and quant_algo W8A16/W4A16 is quantized by trtllm-build itself, on the
# build GPU (modeling_utils.py preprocess_perlayer_weights -> convert_utils.py weight_only_quantize_dict).
# gemport writes that form; ``weight_only_record`` is its arithmetic.

W8A16, W4A16, W4A16_AWQ, W4A16_GPTQ = "W8A16", "W4A16", "W4A16_AWQ", "W4A16_GPTQ"
QUANT_ALGOS = (None, W8A16, W4A16, W4A16_AWQ)
AWQ_PARTS = ("weight", "weights_scaling_factor", "prequant_scaling_factor")


def pack_int4_rows(codes):
    """int8 [rows / 2, cols] from int4 codes [rows, cols] in [-8, 7]: rows 2j and 2j + 1 in the low and
    high nibble (ref: modelopt/torch/export/quant_utils.py ``to_quantized_weight``, INT4_AWQ)."""
    import torch

    c = codes.to(torch.int16)
    return ((c[0::2] & 0x0F) | ((c[1::2] & 0x0F) << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4_rows(packed):
    """The inverse of ``pack_int4_rows``: signed int4 codes as int8 [2 * rows, cols]."""
    import torch

    low = (packed.to(torch.int16) << 12 >> 12).to(torch.int8)  # sign-extend the low nibble
    high = (packed.to(torch.int16) >> 4).to(torch.int8)  # arithmetic shift keeps the sign
    return torch.stack([low, high], 1).reshape(-1, packed.shape[1])


def check_awq_records(ckpt: Checkpoint, mapping: Mapping, dtype: str) -> QuantFormat:
    """The one record format of every projection, if TensorRT-LLM's W4A16_AWQ layout can hold it at this tp;
    UnsupportedError naming what it cannot (int8 or per-channel records, zero points, a quantized embedding)."""
    from quantizers.rtn import projection_names

    quantized = ckpt.quantized()
    projections = set(projection_names(ckpt.spec.num_layers))
    other = [n for n in quantized if n not in projections]
    if other:
        raise UnsupportedError(f"a TensorRT-LLM checkpoint takes quantized decoder projections only, not {other[0]}")
    missing = [n for n in projection_names(ckpt.spec.num_layers) if n not in quantized]
    if missing:
        raise UnsupportedError(f"{missing[0]} is not quantized: W4A16_AWQ quantizes every projection")
    formats = {t.quant for t in quantized.values()}
    if len(formats) > 1:
        raise UnsupportedError(f"records of several formats: {', '.join(sorted(f.describe() for f in formats))}")
    fmt = formats.pop()
    check_awq_format(ckpt.spec, mapping, fmt)
    if fmt.scale_dtype != dtype:
        log.warning("scales of %s rounded to the checkpoint's %s", fmt.scale_dtype, dtype)
    return fmt


def check_awq_format(spec: GemmaSpec, mapping: Mapping, fmt: QuantFormat) -> None:
    """UnsupportedError unless records of ``fmt`` fit the W4A16_AWQ layout at this tp: symmetric int4 groups,
    whole groups in every rank's columns of dense and proj (split by input columns)."""
    if fmt.bits != 4 or fmt.group_size is None or not fmt.symmetric:
        raise UnsupportedError(
            f"{fmt.describe()} records: TensorRT-LLM's group-wise layout (W4A16_AWQ) takes symmetric int4 groups; "
            "its W8A16/W4A16 checkpoints hold float weights that trtllm-build quantizes itself "
            "(convert --to trtllm --quant w8a16|w4a16)"
        )
    for what, cols in (
        ("dense (o_proj)", spec.num_heads * spec.head_dim),
        ("proj (down_proj)", spec.intermediate_size),
    ):
        per_rank = cols // mapping.tp_size
        if per_rank % fmt.group_size:
            fits = [g for g in (32, 64, 128) if per_rank % g == 0]
            where = f"{per_rank} per rank at tp {mapping.tp_size}" if mapping.tp_size > 1 else f"{cols}"
            hint = f"--group-size {' or '.join(map(str, fits))}" if fits else "a smaller --tp-size"
            raise UnsupportedError(
                f"{what}: {where} input columns are not whole groups of {fmt.group_size}; use {hint}"
            )


def awq_tensors(
    prefix: str, tensors: list[LazyTensor], cut: Callable, shape: tuple[int, int], dtype: str, scale_dtype: str
):
    """The three W4A16_AWQ tensors of one rank's part of a projection, sharing one load of its records
    (scales in ``scale_dtype``: gemport writes the checkpoint dtype, ModelOpt float32)."""
    rows, cols = shape
    group = tensors[0].quant.group_size
    part = _OnePart(tensors, cut, dtype, scale_dtype)
    return [
        LazyTensor(f"{prefix}.weight", (rows // 2, cols), "i8", load=lambda: pack_int4_rows(part.get()[0])),
        LazyTensor(f"{prefix}.weights_scaling_factor", (rows, cols // group), scale_dtype, load=lambda: part.get()[1]),
        LazyTensor(f"{prefix}.prequant_scaling_factor", (cols,), dtype, load=lambda: part.get()[2]),
    ]


class _OnePart:
    """One rank's (codes, scales, unit pre-quant scales) of a projection, loaded once for its three tensors."""

    def __init__(self, tensors: list[LazyTensor], cut: Callable, dtype: str, scale_dtype: str):
        self.tensors, self.cut, self.dtype, self.scale_dtype = tensors, cut, dtype, scale_dtype
        self.value, self.uses = None, 0

    def get(self):
        import torch

        if self.value is None:
            records = [t.load() for t in self.tensors]
            codes = self.cut([r.codes for r in records]).contiguous()
            scales = self.cut([r.scales for r in records]).to(torch_dtype(self.scale_dtype)).contiguous()
            self.value = (codes, scales, torch.ones(codes.shape[1], dtype=torch_dtype(self.dtype)))
        value = self.value
        self.uses += 1
        if self.uses == len(AWQ_PARTS):
            self.value, self.uses = None, 0
        return value


def weight_only_record(w, bits: int, dtype: str) -> QuantizedTensor:
    """What trtllm-build makes of a float weight [out, in] under W8A16 / W4A16: per output channel,
    ``scale = amax / 128`` (int8) or ``amax / 8`` (int4) in float32, codes rounded half away from zero and
    clamped to the signed range, the scale stored in the checkpoint dtype (ref: TensorRT-LLM
    cpp/tensorrt_llm/kernels/cutlass_kernels/cutlass_preprocessors.cpp ``symmetric_quantize``)."""
    import torch

    lo, hi = (-128, 127) if bits == 8 else (-8, 7)
    x = w.float()
    amax = x.abs().amax(1, keepdim=True)
    scale = amax * (1.0 / -lo)
    q = x / torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = (torch.sign(q) * torch.floor(q.abs() + 0.5)).clamp(lo, hi).to(torch.int8)
    return QuantizedTensor(codes, scale.to(torch_dtype(dtype)), None, QuantFormat(bits, None, True, dtype))


def quantization_config(algo: str | None, fmt: QuantFormat | None = None) -> dict:
    """config.json's ``quantization`` (ref: tensorrt_llm/models/modeling_utils.py ``QuantConfig``; for
    W4A16_AWQ the fields ModelOpt writes, modelopt/torch/export/tensorrt_llm_utils.py). ``exclude_modules``
    null (W8A16 / W4A16) keeps TensorRT-LLM's default: the LM head and the embedding stay unquantized."""
    config: dict = {"quant_algo": algo, "kv_cache_quant_algo": None}
    if algo == W4A16_AWQ:  # as ModelOpt writes it: the LM head, a Linear, named; the embedding is no Linear
        config |= {"group_size": fmt.group_size, "has_zero_point": False, "pre_quant_scale": True}
        config["exclude_modules"] = ["lm_head"]
    elif algo is not None:
        config["exclude_modules"] = None
    return config


# ---------------------------------------------------------------------------------------------
# writing


def write(
    ckpt: Checkpoint,
    dst: str | Path,
    dtype: str | None = None,
    tp_size: int = 1,
    pp_size: int = 1,
    quant: str | None = None,
    rope_scaling: str | None = None,
    overwrite: bool = False,
    allow_fp16_overflow: bool = False,
) -> Path:
    """Write ``ckpt`` as a TensorRT-LLM checkpoint folder at ``dst`` (atomically): config.json, one
    rank{N}.safetensors per rank, the tokenizer files, gemport.json and build-engine.sh.

    ``dtype``: bf16, f16 or f32 (default: the embedding's dtype; bf16 for a quantized checkpoint of a
    float32 source, weight-only kernels taking 16-bit activations). ``quant``: None, "W8A16" or "W4A16"
    (float weights that trtllm-build quantizes); a checkpoint of int4 group records is written as
    W4A16_AWQ whatever made them. ``rope_scaling``: for a Gemma 3 with rope scaling, which TensorRT-LLM
    applies to every layer (HF: the global ones only), "all" writes it anyway and "none" leaves it out;
    without it such a model is refused. Errors: UnsupportedError for what TensorRT-LLM cannot hold
    (a tp size that does not divide the heads, records of another scheme); CheckpointError for missing
    tensors or NaN weights; OutputError when ``dst`` exists (unless ``overwrite``) or cannot be written.
    An f16 checkpoint is probed first: the model run in float32 on calibration text, and the write
    refused when an activation outgrows fp16 (quantizers.fp16_range), unless ``allow_fp16_overflow``."""
    from converters.hf import _write_safetensors

    ckpt.check(quantized_ok=True)
    records = bool(ckpt.quantized())
    if quant is None and not records:  # a W8A16 / W4A16 source stays so unless re-typed
        quant = ckpt.extra.get("trtllm.quant_algo")
    source_dtype = ckpt.tensors["model.embed_tokens.weight"].dtype
    quantized = records or quant is not None
    dtype = dtype or ("bf16" if quantized and source_dtype == "f32" else source_dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if quantized and dtype == "f32":
        raise UnsupportedError("weight-only quantized TensorRT-LLM checkpoints compute in 16 bits: --dtype bf16 or f16")
    if quant not in (None, W8A16, W4A16):
        raise UnsupportedError(f"quant {quant!r}: the writer takes W8A16, W4A16, or int4 records for W4A16_AWQ")
    if records and quant:
        raise UnsupportedError(f"{quant} quantizes float weights at build; this checkpoint holds records")
    mapping = Mapping(tp_size, pp_size)
    check_mapping(ckpt.spec, mapping, ckpt.source)
    if dtype == "f16":  # a float16 engine computes everything in fp16, the residual stream included
        with stage("probing fp16 activations on calibration text"):
            fp16_range.check_fp16(ckpt, fp16_range.ALL, "trtllm", allow_fp16_overflow)
        ckpt = fp16_range.guard_weights(ckpt)
    fmt = check_awq_records(ckpt, mapping, dtype) if records else None
    algo = W4A16_AWQ if records else quant
    spec = _rope_for_trtllm(ckpt.spec, rope_scaling, ckpt.source)
    config = trtllm_config(spec, dtype, mapping, quantization_config(algo, fmt))
    ranks = [rank_tensors(ckpt, dtype, mapping, r, awq=records) for r in range(mapping.world_size)]
    vocab_file = "tokenizer.model" in ckpt.tokenizer_files
    manifest = {
        "source": ckpt.source,
        "dtype": dtype,
        "mapping": config["mapping"],
        "quant_algo": algo,
        "quantization": ckpt.extra.get("quantization"),
        "build_command": build_command(str(Path(dst).resolve())),
        "run_command": run_command(spec, mapping, str(Path(dst).resolve()), vocab_file),
        "tie_embeddings": ckpt.spec.tie_embeddings,  # pp > 1 stores a tied LM head: read back tied
        "departures": departures(spec.family, config["rotary_scaling"]),
    }
    with atomic_output(dst, overwrite) as tmp:
        tmp.mkdir()
        total = sum(len(r) for r in ranks)
        with progress(f"writing {Path(dst).name}", total=total, unit="tensors") as advance:
            for rank, tensors in enumerate(ranks):
                _write_safetensors(tmp / rank_file(rank), tensors, lambda: advance(1), ckpt.source)
        _write_json(tmp / CONFIG, config)
        _write_json(tmp / MANIFEST, manifest)
        (tmp / BUILD_SCRIPT).write_text(build_script(spec, mapping, vocab_file), encoding="utf-8")
        (tmp / BUILD_SCRIPT).chmod(0o755)
        for name, data in ckpt.tokenizer_files.items():
            (tmp / name).write_bytes(data)
    return Path(dst)


def _rope_for_trtllm(spec: GemmaSpec, choice: str | None, source: str) -> GemmaSpec:
    """The spec whose rope TensorRT-LLM is told: a Gemma 3 with rope scaling needs ``choice``, TensorRT-LLM
    building the sliding layers' rotary table with the global one's scaling (ref: tensorrt_llm/layers/
    attention.py ``create_attention_const_params``, register_rope_params for ``rope_local_base_freq``)."""
    if choice not in (None, "all", "none"):
        raise ValueError(f"rope_scaling must be 'all' or 'none', got {choice!r}")
    if spec.rope_scaling is not None and spec.rope_scaling.rope_type != "linear":
        raise UnsupportedError(
            f"rope scaling {spec.rope_scaling.rope_type!r}: the TensorRT-LLM writer takes linear rope scaling", source
        )
    if spec.family != "gemma3" or spec.rope_scaling is None:
        if choice is not None:
            log.warning("--trtllm-rope-scaling %s: this model has no Gemma 3 rope scaling, nothing to choose", choice)
        return spec
    if choice is None:
        raise UnsupportedError(
            f"Gemma 3 with rope scaling ({spec.rope_scaling.rope_type} {spec.rope_scaling.factor:g} on the global "
            "layers): TensorRT-LLM applies rotary_scaling to the sliding layers too, so no TensorRT-LLM checkpoint "
            "computes this model exactly; pass --trtllm-rope-scaling all (scale every layer) or none (scale none) "
            "and measure the difference with gemport validate",
            source,
        )
    if choice == "all":
        log.warning(
            "rope scaling of the global layers written for every layer (TensorRT-LLM scales the sliding ones too)"
        )
    else:
        log.warning("rope scaling of the global layers left out (TensorRT-LLM would scale the sliding layers too)")
    return replace(spec, rope_scaling=spec.rope_scaling if choice == "all" else None)


def departures(family: str, rotary_scaling: dict | None) -> list[str]:
    """What TensorRT-LLM's Gemma model computes differently from transformers for this model, in words
    (recorded in gemport.json, and said by validate, whose layout runtime computes it TensorRT-LLM's way)."""
    out = []
    if family == "gemma3":
        out.append(
            "TensorRT-LLM's Gemma 3 q/k norms use eps 1e-5 (transformers: rms_norm_eps) (ref: model.py passes "
            "Attention no eps)"
        )
        if rotary_scaling:
            out.append(
                "TensorRT-LLM applies rotary_scaling to the sliding layers too (transformers: the global layers only)"
            )
    return out


def build_command(folder: str) -> str:
    """The trtllm-build command line of the checkpoint at ``folder`` (ref: TensorRT-LLM
    examples/models/core/gemma/README.md)."""
    return f"trtllm-build --checkpoint_dir {folder} --output_dir {folder}-engine"


def run_command(spec: GemmaSpec, mapping: Mapping, folder: str, vocab_file: bool) -> str:
    """A run of the engine with TensorRT-LLM's examples/run.py: under ``mpirun -n world_size`` for more than
    one rank; the SentencePiece model as ``--vocab_file`` (TensorRT-LLM's Gemma README does so, and its
    transformers 4.x does not read a transformers 5 tokenizer_config.json); for Gemma 2 and 3 the per-layer
    attention windows of the sliding layers, which TensorRT-LLM takes at run time, not from the checkpoint
    (ref: examples/utils.py ``--max_attention_window_size``, a list cycled over the layers)."""
    tokenizer = f"--vocab_file {folder}/tokenizer.model" if vocab_file else f"--tokenizer_dir {folder}"
    run = f"python3 examples/run.py --engine_dir {folder}-engine {tokenizer} --max_output_len 64"
    if mapping.world_size > 1:
        run = f"mpirun -n {mapping.world_size} --allow-run-as-root {run}"
    if SLIDING not in spec.layer_types:
        return run
    windows = " ".join(str(spec.sliding_window if t == SLIDING else spec.max_position) for t in spec.layer_types)
    return f"{run} --max_attention_window_size {windows}"


def build_script(spec: GemmaSpec, mapping: Mapping, vocab_file: bool) -> str:
    """build-engine.sh: builds beside the checkpoint folder wherever it is run from."""
    here = '"$DIR"'
    why = " (the sliding layers' attention windows are run-time settings)" if SLIDING in spec.layer_types else ""
    return (
        "#!/bin/sh\n# Build a TensorRT-LLM engine of this checkpoint (TensorRT-LLM 1.2, on the GPU it will run on).\n"
        'DIR=$(cd "$(dirname "$0")" && pwd)\n'
        f"{build_command(here)}\n"
        f"# Then run it{why}, from the root of a TensorRT-LLM checkout:\n"
        f"# {run_command(spec, mapping, here, vocab_file)}\n"
    )


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# reading


def sniff(path: Path) -> bool:
    return path.is_dir() and (path / rank_file(0)).is_file() and (path / CONFIG).is_file()


def _shown(value) -> str:
    return json.dumps(value)[:40]


def _field(cfg: dict, key: str, kind: str, file: Path, default=None):
    """A config.json value of ``kind`` ("int" >= 1, "number" > 0, "str", "bool"), or ``default`` when absent
    or null; InputError naming the file and the key otherwise."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise InputError(f"config.json has no {key}", file)
        return default
    ok = {
        "int": type(value) is int and value >= 1,
        "number": type(value) in (int, float) and math.isfinite(value) and value > 0,
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
    }[kind]
    if not ok:
        want = {"int": "an integer >= 1", "number": "a number > 0", "str": "a string", "bool": "true or false"}[kind]
        raise InputError(f"{key} is {_shown(value)}, not {want}", file)
    return value


def read_config(path: Path) -> tuple[dict, GemmaSpec, Mapping]:
    """config.json of a checkpoint folder: the raw dict, the model as a GemmaSpec, and the mapping.
    Errors name config.json: InputError for a missing or ill-typed field, UnsupportedError for an
    architecture or value this reader does not take."""
    from converters.hf import read_json

    file = path / CONFIG
    cfg = read_json(file)
    arch = cfg.get("architecture")
    if arch not in FAMILIES:
        raise UnsupportedError(f"architecture {_shown(arch)} is not a Gemma ({', '.join(FAMILIES)})", file)
    family = FAMILIES[arch]
    mapping_cfg = cfg.get("mapping") or {}
    if not isinstance(mapping_cfg, dict):
        raise InputError(f"mapping is {_shown(mapping_cfg)}, not an object", file)
    mapping = Mapping(_field(mapping_cfg, "tp_size", "int", file, 1), _field(mapping_cfg, "pp_size", "int", file, 1))
    world = _field(mapping_cfg, "world_size", "int", file, mapping.world_size)
    if world != mapping.world_size:
        raise InputError(f"mapping world_size {world} is not tp_size x pp_size = {mapping.world_size}", file)
    dtype = _field(cfg, "dtype", "str", file)
    if dtype not in DTYPE_NAMES.values():
        raise UnsupportedError(f"dtype {_shown(dtype)} is not one of {', '.join(DTYPE_NAMES.values())}", file)
    hf = {
        "model_type": {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}[family],
        "vocab_size": _field(cfg, "vocab_size", "int", file),
        "hidden_size": _field(cfg, "hidden_size", "int", file),
        "intermediate_size": _field(cfg, "intermediate_size", "int", file),
        "num_hidden_layers": _field(cfg, "num_hidden_layers", "int", file),
        "num_attention_heads": _field(cfg, "num_attention_heads", "int", file),
        "max_position_embeddings": _field(cfg, "max_position_embeddings", "int", file, 8192),
        "rms_norm_eps": _field(cfg, "norm_epsilon", "number", file, 1e-6),
        "tie_word_embeddings": _field(cfg, "share_embedding_table", "bool", file, False),
        "rope_theta": _field(cfg, "rotary_base", "number", file, 10000.0),
        "rope_scaling": _read_scaling(cfg.get("rotary_scaling"), file),
    }
    hf["num_key_value_heads"] = _field(cfg, "num_key_value_heads", "int", file, hf["num_attention_heads"])
    hf["head_dim"] = _field(cfg, "head_size", "int", file, hf["hidden_size"] // hf["num_attention_heads"])
    act = _field(cfg, "hidden_act", "str", file, "gelu_pytorch_tanh")
    hf["hidden_act" if family == "gemma" else "hidden_activation"] = act
    if family != "gemma":
        hf["query_pre_attn_scalar"] = _field(cfg, "query_pre_attn_scalar", "number", file, hf["head_dim"])
        hf["final_logit_softcapping"] = cfg.get("final_logit_softcapping")
        # TensorRT-LLM's own Gemma 2 checkpoints state no window (a run-time setting): transformers' default
        hf["sliding_window"] = _field(cfg, "sliding_window", "int", file, 4096 if family == "gemma2" else None)
    if family == "gemma2":
        hf["attn_logit_softcapping"] = cfg.get("attn_logit_softcapping")
    if family == "gemma3":
        hf["rope_local_base_freq"] = _field(cfg, "rope_local_base_freq", "number", file, 10000.0)
        hf["sliding_window_pattern"] = _field(cfg, "_sliding_window_pattern", "int", file, 6)
    spec = GemmaSpec.from_hf_config(hf, file)
    check_mapping(spec, mapping, file)
    read_quantization(cfg.get("quantization"), file)
    return cfg, spec, mapping


def _read_scaling(value, file: Path) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type", value.get("rope_type")) != "linear":
        raise UnsupportedError(f"rotary_scaling {_shown(value)}: only linear scaling is read", file)
    return {"rope_type": "linear", "factor": value.get("factor")}


def _skeleton(spec: GemmaSpec, dtype: str, fmt: QuantFormat | None) -> Checkpoint:
    """A checkpoint of ``spec`` whose tensors have shapes only (projections as records of ``fmt``): what
    rank_tensors needs to name a rank's tensors."""
    from gemport.checkpoint import expected_shapes
    from quantizers.rtn import projection_names

    def never():
        raise AssertionError("a skeleton tensor is never loaded")

    shapes = expected_shapes(spec)
    projections = set(projection_names(spec.num_layers)) if fmt else set()
    return Checkpoint(
        spec,
        {n: LazyTensor(n, s, dtype, load=never, quant=fmt if n in projections else None) for n, s in shapes.items()},
    )


def rank_headers(
    path: Path, spec: GemmaSpec, mapping: Mapping, dtype: str, group_size: int | None
) -> tuple[list[dict[str, LazyTensor]], QuantFormat | None]:
    """Each rank file's tensors, checked against the names, shapes and dtypes the layout gives that rank
    (W4A16_AWQ projections when ``group_size`` is given), and the records' format: CheckpointError naming
    the rank file at the first difference, InputError when a rank file is missing."""
    from converters.hf import _read_header

    missing = [rank_file(r) for r in range(mapping.world_size) if not (path / rank_file(r)).is_file()]
    if missing:
        raise InputError(
            f"{missing[0]} is missing: config.json maps {mapping.world_size} ranks "
            f"(tp_size {mapping.tp_size} x pp_size {mapping.pp_size})",
            path,
        )
    headers = [{t.name: t for t in _read_header(path / rank_file(r), integers=True)} for r in range(mapping.world_size)]
    fmt = QuantFormat(4, group_size, True, _scale_dtype(headers[0], dtype)) if group_size else None
    skeleton = _skeleton(spec, dtype, fmt)
    for rank, found in enumerate(headers):
        file = path / rank_file(rank)
        want = {t.name: t for t in rank_tensors(skeleton, dtype, mapping, rank, fmt is not None, scales_as_stored=True)}
        for name, t in want.items():
            got = found.get(name)
            if got is None:
                raise CheckpointError(f"tensor {name} is missing", file)
            if (got.shape, got.dtype) != (t.shape, t.dtype):
                raise CheckpointError(
                    f"tensor {name} is {got.dtype} {list(got.shape)}, expected {t.dtype} {list(t.shape)}", file
                )
        extra = [n for n in found if n not in want]
        if extra:
            raise CheckpointError(f"unexpected tensor {extra[0]}", file)
    extra = sorted(p.name for p in path.glob("rank*.safetensors") if p.name not in map(rank_file, range(len(headers))))
    if extra:
        log.warning("%s: %s not in the mapping of config.json (ignored)", path, ", ".join(extra))
    return headers, fmt


def joined_tensors(
    path: Path, spec: GemmaSpec, mapping: Mapping, cfg: dict, as_built: bool = True
) -> dict[str, LazyTensor]:
    """The model's tensors in TensorRT-LLM's names with global layer indices and the ranks joined (the
    inverse of the splits above): the whole qkv of every head, dense and proj of every column, the
    vocabulary tables cut to vocab_size, the LM head the embedding when shared. A W4A16_AWQ projection
    ``P.weight`` is a lazy record, with its joined ``P.prequant_scaling_factor`` beside it; a W8A16 /
    W4A16 one, ``as_built``, the record trtllm-build makes of the stored float weight
    (``weight_only_record``), else that float weight."""
    dtype = {v: k for k, v in DTYPE_NAMES.items()}[cfg["dtype"]]
    quantization = read_quantization(cfg.get("quantization"), path / CONFIG)
    algo = quantization.get("quant_algo")
    ranks, fmt = rank_headers(path, spec, mapping, dtype, quantization["group_size"] if algo == W4A16_AWQ else None)
    tp = mapping.tp_size
    last = mapping.world_size - tp  # the first rank of the last stage
    embed = _join_vocab([ranks[r]["transformer.vocab_embedding.weight"] for r in range(tp)], spec.vocab_size)
    out = {"transformer.vocab_embedding.weight": embed}
    table = layer_table(spec)
    for pp in range(mapping.pp_size):
        layers = mapping.layers(pp, spec.num_layers)
        for i in layers:
            for name, (_, split) in table.items():
                stored = f"transformer.layers.{i - layers.start}.{name}"
                full = f"transformer.layers.{i}.{name}"
                parts = [ranks[pp * tp + r] for r in range(tp)]
                if split == WHOLE:
                    out[full] = _renamed(parts[0][stored], full)
                elif fmt is not None:
                    out.update(_join_awq(full, stored.removesuffix(".weight"), parts, split, spec, fmt))
                else:
                    joined = _join(full, [p[stored] for p in parts], split, spec, tp)
                    out[full] = _weight_only(joined, algo, dtype) if algo and as_built else joined
    out["transformer.ln_f.weight"] = ranks[last]["transformer.ln_f.weight"]
    if shares_embedding(spec, mapping):
        out["lm_head.weight"] = _renamed(embed, "lm_head.weight")
    else:
        out["lm_head.weight"] = _join_vocab([ranks[last + r]["lm_head.weight"] for r in range(tp)], spec.vocab_size)
    return out


def _scale_dtype(header: dict[str, LazyTensor], dtype: str) -> str:
    """The dtype of a W4A16_AWQ checkpoint's scales: the checkpoint's (gemport) or float32 (ModelOpt), as the
    first layer's qkv states it in rank 0's header; TensorRT-LLM casts them to the checkpoint dtype at load."""
    found = header.get("transformer.layers.0.attention.qkv.weights_scaling_factor")
    return found.dtype if found is not None and found.dtype in ("f32", dtype) else dtype


def join_parts(ms: list, split: str, spec: GemmaSpec, tp: int):
    """The whole of a projection's matrix (weights, codes or scales, by output rows) from its tp parts."""
    import torch

    if tp == 1:
        return ms[0]
    if split in (ROWS, COLS):
        return torch.cat(ms, 0 if split == ROWS else 1)
    q_rows = spec.num_heads // tp * spec.head_dim
    holders = sorted({kv_heads_of(r, spec, tp).start: r for r in reversed(range(tp))}.values())
    kv_rows = (ms[0].shape[0] - q_rows) // 2
    q = [m[:q_rows] for m in ms]
    k = [ms[r][q_rows : q_rows + kv_rows] for r in holders]  # each KV head once, from the first rank holding it
    v = [ms[r][q_rows + kv_rows :] for r in holders]
    return torch.cat(q + k + v)


def joined_shape(split: str, spec: GemmaSpec, tp: int, part: tuple[int, int]) -> tuple[int, int]:
    """The whole [out, in] of a projection whose rank parts are ``part``."""
    rows, cols = part
    if split == COLS:
        return rows, cols * tp
    if split == QKV:
        return (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim, cols
    return rows * tp, cols


def _join(name: str, parts: list[LazyTensor], split: str, spec: GemmaSpec, tp: int) -> LazyTensor:
    load = lambda: join_parts([p.load() for p in parts], split, spec, tp)  # noqa: E731
    return LazyTensor(name, joined_shape(split, spec, tp, parts[0].shape), parts[0].dtype, load=load)


def _join_vocab(parts: list[LazyTensor], vocab: int) -> LazyTensor:
    import torch

    first = parts[0]
    if len(parts) == 1 and first.shape[0] == vocab:
        return first
    return LazyTensor(
        first.name, (vocab, first.shape[1]), first.dtype, load=lambda: torch.cat([p.load() for p in parts])[:vocab]
    )


def _weight_only(t: LazyTensor, algo: str, dtype: str) -> LazyTensor:
    bits = 8 if algo == W8A16 else 4
    fmt = QuantFormat(bits, None, True, dtype)
    return LazyTensor(t.name, t.shape, dtype, load=lambda: weight_only_record(t.load(), bits, dtype), quant=fmt)


def _join_awq(full: str, stored: str, ranks: list[dict], split: str, spec: GemmaSpec, fmt: QuantFormat) -> dict:
    """A W4A16_AWQ projection joined: the record at ``full`` and its pre-quant scale beside it."""
    import torch

    tp = len(ranks)
    weights = [r[f"{stored}.weight"] for r in ranks]
    scales = [r[f"{stored}.weights_scaling_factor"] for r in ranks]
    prequant = [r[f"{stored}.prequant_scaling_factor"] for r in ranks]
    shape = joined_shape(split, spec, tp, (weights[0].shape[0] * 2, weights[0].shape[1]))

    def record() -> QuantizedTensor:
        codes = join_parts([unpack_int4_rows(w.load()) for w in weights], split, spec, tp)
        return QuantizedTensor(
            codes.contiguous(), join_parts([s.load() for s in scales], split, spec, tp).contiguous(), None, fmt
        )

    def pre():
        return torch.cat([p.load() for p in prequant]) if split == COLS and tp > 1 else prequant[0].load()

    base = full.removesuffix(".weight")
    return {
        full: LazyTensor(full, shape, fmt.scale_dtype, load=record, quant=fmt),
        f"{base}.prequant_scaling_factor": LazyTensor(
            f"{base}.prequant_scaling_factor", (shape[1],), fmt.scale_dtype, load=pre
        ),
    }


def read(path: str | Path) -> Checkpoint:
    """Open a TensorRT-LLM checkpoint folder lazily as a canonical checkpoint (only headers are read here):
    qkv split into q/k/v, norms as ``w`` (float32, so that ``1 + w`` rounds back to the stored value),
    W4A16_AWQ projections as records when their pre-quant scales are 1 (as gemport writes them) and as
    float weights with the pre-quant scale multiplied in otherwise (as ModelOpt exports them), W8A16 /
    W4A16 ones as the float weights stored (the algorithm in ``extra["trtllm.quant_algo"]``: trtllm-build
    quantizes them, the layout runtime as it would)."""
    from converters.hf import TOKENIZER_FILES

    path = Path(path)
    if not sniff(path):
        raise InputError(f"not a TensorRT-LLM checkpoint folder (no {CONFIG} and {rank_file(0)})", path)
    cfg, spec, mapping = read_config(path)
    trt = joined_tensors(path, spec, mapping, cfg, as_built=False)
    algo = (cfg.get("quantization") or {}).get("quant_algo")
    tensors = {
        "model.embed_tokens.weight": _renamed(trt["transformer.vocab_embedding.weight"], "model.embed_tokens.weight")
    }
    for i in range(spec.num_layers):
        for name, (canon, split) in layer_table(spec).items():
            full = f"transformer.layers.{i}.{name}"
            t = trt[full]
            names = [f"model.layers.{i}.{c}" for c in canon]
            prequant = trt.get(full.removesuffix(".weight") + ".prequant_scaling_factor")
            if prequant is not None:
                t = _with_prequant(t, prequant)
            if split == QKV:
                tensors.update(_unfused(t, names, spec))
            elif split == WHOLE:
                tensors[names[0]] = _norm_of(t, names[0])
            else:
                tensors[names[0]] = _renamed(t, names[0])
    tensors["model.norm.weight"] = _norm_of(trt["transformer.ln_f.weight"], "model.norm.weight")
    if _tied_by_writer(path) and not spec.tie_embeddings:  # pp > 1: the tied head stored on the last stage
        spec = replace(spec, tie_embeddings=True)
    if not spec.tie_embeddings:
        tensors["lm_head.weight"] = trt["lm_head.weight"]
    ckpt = Checkpoint(
        spec=spec,
        tensors=tensors,
        tokenizer_files={n: (path / n).read_bytes() for n in TOKENIZER_FILES if (path / n).is_file()},
        source=str(path),
        extra={"trtllm.quant_algo": algo} if algo in (W8A16, W4A16) else {},
    )
    ckpt.check(quantized_ok=True)
    return ckpt


def _tied_by_writer(path: Path) -> bool:
    """gemport.json says the model was tied (config.json cannot, when pp > 1 put the head on another stage)."""
    from converters.hf import read_json

    return (path / MANIFEST).is_file() and read_json(path / MANIFEST).get("tie_embeddings") is True


def _with_prequant(t: LazyTensor, prequant: LazyTensor) -> LazyTensor:
    """The record as it is when every pre-quant scale is 1; otherwise ``W * prequant`` per input column in
    float32 (the input scaling folded into the weight, exactly what the kernel computes)."""
    scale = prequant.load()
    if bool((scale == 1).all()):
        return t
    log.info("%s: pre-quant scales folded into the weight (float32)", t.name)
    return LazyTensor(t.name, t.shape, "f32", load=lambda: t.load().dequantize("f32") * scale.float())


def _renamed(t: LazyTensor, name: str) -> LazyTensor:
    return LazyTensor(name, t.shape, t.dtype, load=t.load, quant=t.quant)


def _norm_of(t: LazyTensor, name: str) -> LazyTensor:
    return LazyTensor(name, t.shape, "f32", load=lambda: t.load().float() - 1.0)


def _unfused(t: LazyTensor, names: list[str], spec: GemmaSpec) -> dict[str, LazyTensor]:
    """q, k and v of a joined qkv (a float weight or a record, split by rows alike)."""
    d = spec.head_dim
    sizes = (spec.num_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d)
    starts = (0, sizes[0], sizes[0] + sizes[1])

    def rows(s: int, size: int):
        value = t.load()
        if t.quant is None:
            return value[s : s + size].contiguous()
        return QuantizedTensor(
            value.codes[s : s + size].contiguous(), value.scales[s : s + size].contiguous(), None, value.format
        )

    return {
        n: LazyTensor(n, (size, t.shape[1]), t.dtype, load=functools.partial(rows, s, size), quant=t.quant)
        for n, s, size in zip(names, starts, sizes, strict=True)
    }


def read_quantization(value, file: Path) -> dict:
    """config.json's ``quantization`` object, its ``quant_algo`` one this reader takes (W4A16_AWQ: a positive
    group_size, no zero point); UnsupportedError naming config.json otherwise."""
    value = value or {}
    if not isinstance(value, dict):
        raise InputError(f"quantization is {_shown(value)}, not an object", file)
    algo = value.get("quant_algo")
    if algo == W4A16_GPTQ:
        raise UnsupportedError(
            "quant_algo W4A16_GPTQ is not read: its weights are laid out for one GPU architecture "
            "(TensorRT-LLM re-lays W4A16_AWQ weights at load, not GPTQ ones)",
            file,
        )
    if algo not in QUANT_ALGOS:
        known = ", ".join(a for a in QUANT_ALGOS if a)
        raise UnsupportedError(f"quant_algo {_shown(algo)} is not read (read: {known}, or null)", file)
    if value.get("kv_cache_quant_algo") is not None:
        raise UnsupportedError(f"kv_cache_quant_algo {_shown(value['kv_cache_quant_algo'])} is not read", file)
    if algo == W4A16_AWQ:
        group = value.get("group_size", 128)  # ref: QuantConfig.group_size default
        if type(group) is not int or group < 1:
            raise InputError(f"quantization group_size is {_shown(group)}, not an integer >= 1", file)
        if value.get("has_zero_point"):
            raise UnsupportedError("W4A16_AWQ with has_zero_point is not read", file)
        value = {**value, "group_size": group}
    return value
