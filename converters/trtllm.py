"""TensorRT-LLM checkpoints of Gemma 1, 2 and 3: write (and read back) the folder ``trtllm-build`` takes.

A checkpoint is ``config.json`` (TensorRT-LLM's ``PretrainedConfig`` fields) and one
``rank{N}.safetensors`` per rank, rank = pp_rank * tp_size + tp_rank (ref: TensorRT-LLM
tensorrt_llm/mapping.py ``Mapping``: tp_rank = rank % tp_size, pp_rank = rank // tp_size).
Nothing here imports TensorRT-LLM: the layout is written from gemport's canonical checkpoint.

Names and transforms (ref: TensorRT-LLM tensorrt_llm/models/gemma/convert.py and model.py
``GemmaDecoderLayer``; modelopt/torch/export/layer_utils.py and model_config_export.py):

- ``transformer.vocab_embedding.weight``, ``transformer.ln_f.weight``, ``lm_head.weight``
  (the LM head written even when tied: the engine builder shares it by ``share_embedding_table``);
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

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gemport.checkpoint import DTYPES, Checkpoint, LazyTensor, torch_dtype
from gemport.errors import CheckpointError, InputError, UnsupportedError
from gemport.output import atomic_output
from gemport.progress import progress
from gemport.spec import FULL, SLIDING, GemmaSpec, RopeScaling

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
        "share_embedding_table": spec.tie_embeddings,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": mapping.world_size, "tp_size": mapping.tp_size, "pp_size": mapping.pp_size},
        "quantization": quantization or {"quant_algo": None, "kv_cache_quant_algo": None},
        "bias": False,
        "mlp_bias": False,
        "attn_bias": False,
    }
    if spec.family in ("gemma2", "gemma3"):
        cfg["query_pre_attn_scalar"] = spec.query_pre_attn_scalar or spec.head_dim
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
        raise UnsupportedError(f"rope scaling {scaling.rope_type!r}: the TensorRT-LLM writer takes linear scaling")
    return {"type": "linear", "factor": scaling.factor}


# ---------------------------------------------------------------------------------------------
# tensors: canonical (HF) -> TensorRT-LLM, per rank

# Per-layer table: TensorRT-LLM name -> (canonical names, how it is split across tp ranks).
ROWS, COLS, WHOLE, QKV = "rows", "cols", "whole", "qkv"
NORMS = ("input_layernorm", "post_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


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
    """ref: tensorrt_llm/_utils.py ``pad_vocab_size``: the LM head's rows rounded up to a multiple of tp."""
    return -(-vocab // tp) * tp


def kv_heads_of(rank: int, spec: GemmaSpec, tp: int) -> range:
    """The KV heads tp rank ``rank`` holds: its share, or the one head it shares with tp / kv - 1 others."""
    kv = spec.num_kv_heads
    if kv >= tp:
        n = kv // tp
        return range(rank * n, (rank + 1) * n)
    head = rank // (tp // kv)
    return range(head, head + 1)


def rank_tensors(ckpt: Checkpoint, dtype: str, mapping: Mapping, rank: int) -> list[LazyTensor]:
    """The float tensors of rank ``rank`` in TensorRT-LLM's names, shapes and order, cast to ``dtype``."""
    spec, tp = ckpt.spec, mapping.tp_size
    tp_rank, pp_rank = rank % tp, rank // tp
    out: list[LazyTensor] = []
    src = ckpt.tensors
    if pp_rank == 0:
        out.append(_whole("transformer.vocab_embedding.weight", src["model.embed_tokens.weight"], dtype))
    table = layer_table(spec)
    for i in mapping.layers(pp_rank, spec.num_layers):
        for name, (canon, split) in table.items():
            tensors = [src[f"model.layers.{i}.{c}"] for c in canon]
            out.append(_split(f"transformer.layers.{i}.{name}", tensors, split, dtype, spec, tp, tp_rank))
    if pp_rank == mapping.pp_size - 1:
        out.append(_whole("transformer.ln_f.weight", src["model.norm.weight"], dtype, norm=True))
        head = src.get("lm_head.weight", src["model.embed_tokens.weight"])
        out.append(_lm_head(head, dtype, spec.vocab_size, tp, tp_rank))
    return out


def norm_weight(w, dtype: str):
    """The stored ``1 + w`` of a canonical RMSNorm weight, computed in float32 and rounded once to ``dtype``."""
    return (w.float() + 1.0).to(torch_dtype(dtype))


def _whole(name: str, t: LazyTensor, dtype: str, norm: bool = False) -> LazyTensor:
    if norm:
        return LazyTensor(name, t.shape, dtype, load=lambda: norm_weight(t.load(), dtype))
    return LazyTensor(name, t.shape, dtype, load=lambda: t.load().to(torch_dtype(dtype)))


def _split(name: str, tensors: list[LazyTensor], split: str, dtype: str, spec, tp: int, tp_rank: int) -> LazyTensor:
    if split == WHOLE:
        return _whole(name, tensors[0], dtype, norm=True)
    t = tensors[0]
    if split == ROWS:
        n = t.shape[0] // tp
        return _sliced(name, t, (n, t.shape[1]), dtype, lambda w: w[tp_rank * n : (tp_rank + 1) * n])
    if split == COLS:
        n = t.shape[1] // tp
        return _sliced(name, t, (t.shape[0], n), dtype, lambda w: w[:, tp_rank * n : (tp_rank + 1) * n])
    return _qkv(name, tensors, dtype, spec, tp, tp_rank)


def _sliced(name: str, t: LazyTensor, shape: tuple[int, ...], dtype: str, cut: Callable) -> LazyTensor:
    return LazyTensor(name, shape, dtype, load=lambda: cut(t.load().to(torch_dtype(dtype))).contiguous())


def _qkv(name: str, tensors: list[LazyTensor], dtype: str, spec, tp: int, tp_rank: int) -> LazyTensor:
    import torch

    d = spec.head_dim
    q_heads = spec.num_heads // tp
    kv = kv_heads_of(tp_rank, spec, tp)
    rows = (q_heads + 2 * len(kv)) * d

    def load():
        q, k, v = (t.load().to(torch_dtype(dtype)) for t in tensors)
        q = q[tp_rank * q_heads * d : (tp_rank + 1) * q_heads * d]
        return torch.cat([q, k[kv.start * d : kv.stop * d], v[kv.start * d : kv.stop * d]]).contiguous()

    return LazyTensor(name, (rows, spec.hidden_size), dtype, load=load)


def _lm_head(t: LazyTensor, dtype: str, vocab: int, tp: int, tp_rank: int) -> LazyTensor:
    import torch

    n = padded_vocab(vocab, tp) // tp

    def load():
        w = t.load().to(torch_dtype(dtype))[tp_rank * n : (tp_rank + 1) * n]
        if w.shape[0] < n:  # the last rank's padding rows
            w = torch.cat([w, w.new_zeros(n - w.shape[0], w.shape[1])])
        return w.contiguous()

    return LazyTensor("lm_head.weight", (n, t.shape[1]), dtype, load=load)


# ---------------------------------------------------------------------------------------------
# writing


def write(
    ckpt: Checkpoint,
    dst: str | Path,
    dtype: str | None = None,
    tp_size: int = 1,
    pp_size: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write ``ckpt`` as a TensorRT-LLM checkpoint folder at ``dst`` (atomically): config.json, one
    rank{N}.safetensors per rank, the tokenizer files, gemport.json and build-engine.sh.

    ``dtype``: bf16, f16 or f32 (default: the embedding's dtype). Errors: UnsupportedError for a
    tp/pp size the model cannot be split by; CheckpointError for missing tensors or NaN weights;
    OutputError when ``dst`` exists (unless ``overwrite``) or cannot be written."""
    from converters.hf import _write_safetensors

    dtype = dtype or ckpt.tensors["model.embed_tokens.weight"].dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    ckpt.check()
    mapping = Mapping(tp_size, pp_size)
    check_mapping(ckpt.spec, mapping, ckpt.source)
    config = trtllm_config(ckpt.spec, dtype, mapping)
    ranks = [rank_tensors(ckpt, dtype, mapping, r) for r in range(mapping.world_size)]
    with atomic_output(dst, overwrite) as tmp:
        tmp.mkdir()
        total = sum(len(r) for r in ranks)
        with progress(f"writing {Path(dst).name}", total=total, unit="tensors") as advance:
            for rank, tensors in enumerate(ranks):
                _write_safetensors(tmp / rank_file(rank), tensors, lambda: advance(1), ckpt.source)
        _write_json(tmp / CONFIG, config)
        _write_json(tmp / MANIFEST, {"source": ckpt.source, "dtype": dtype, "mapping": config["mapping"]})
        (tmp / BUILD_SCRIPT).write_text(build_script(ckpt.spec, Path(dst)), encoding="utf-8")
        for name, data in ckpt.tokenizer_files.items():
            (tmp / name).write_bytes(data)
    return Path(dst)


def build_command(spec: GemmaSpec, folder: Path) -> str:
    """The trtllm-build command line for this checkpoint, with the attention windows of Gemma 2/3's
    sliding layers (set at build/run time, not in the checkpoint)."""
    return f"trtllm-build --checkpoint_dir {folder} --output_dir {folder}-engine"


def build_script(spec: GemmaSpec, folder: Path) -> str:
    return "#!/bin/sh\n" + build_command(spec, folder) + "\n"


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
        hf["sliding_window"] = _field(cfg, "sliding_window", "int", file)
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


def _skeleton(spec: GemmaSpec, dtype: str) -> Checkpoint:
    """A checkpoint of ``spec`` whose tensors have shapes only: what rank_tensors needs to name a rank's tensors."""
    from gemport.checkpoint import expected_shapes

    def never():
        raise AssertionError("a skeleton tensor is never loaded")

    shapes = expected_shapes(spec)
    if "lm_head.weight" not in shapes:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return Checkpoint(spec, {n: LazyTensor(n, s, dtype, load=never) for n, s in shapes.items()})


def rank_headers(path: Path, spec: GemmaSpec, mapping: Mapping, dtype: str) -> list[dict[str, LazyTensor]]:
    """Each rank file's tensors, checked against the names, shapes and dtypes the layout gives that rank:
    CheckpointError naming the rank file at the first difference, InputError when a rank file is missing."""
    from converters.hf import _read_header

    skeleton = _skeleton(spec, dtype)
    missing = [rank_file(r) for r in range(mapping.world_size) if not (path / rank_file(r)).is_file()]
    if missing:
        raise InputError(
            f"{missing[0]} is missing: config.json maps {mapping.world_size} ranks "
            f"(tp_size {mapping.tp_size} x pp_size {mapping.pp_size})",
            path,
        )
    out = []
    for rank in range(mapping.world_size):
        file = path / rank_file(rank)
        found = {t.name: t for t in _read_header(file, integers=True)}
        want = {t.name: t for t in rank_tensors(skeleton, dtype, mapping, rank)}
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
        out.append(found)
    extra = sorted(p.name for p in path.glob("rank*.safetensors") if p.name not in map(rank_file, range(len(out))))
    if extra:
        log.warning("%s: %s not in the mapping of config.json (ignored)", path, ", ".join(extra))
    return out


def joined_tensors(path: Path, spec: GemmaSpec, mapping: Mapping, dtype: str) -> dict[str, LazyTensor]:
    """The model's tensors in TensorRT-LLM's names with the ranks joined (the inverse of the splits above):
    the whole qkv of every head, dense and proj of every column, the LM head cut to the vocabulary."""
    ranks = rank_headers(path, spec, mapping, dtype)
    tp = mapping.tp_size
    last = mapping.world_size - tp  # the first rank of the last stage
    out = {"transformer.vocab_embedding.weight": ranks[0]["transformer.vocab_embedding.weight"]}
    table = layer_table(spec)
    for pp in range(mapping.pp_size):
        for i in mapping.layers(pp, spec.num_layers):
            for name, (_, split) in table.items():
                full = f"transformer.layers.{i}.{name}"
                parts = [ranks[pp * tp + r][full] for r in range(tp)]
                out[full] = _join(full, parts, split, spec, tp)
    out["transformer.ln_f.weight"] = ranks[last]["transformer.ln_f.weight"]
    head = [ranks[last + r]["lm_head.weight"] for r in range(tp)]
    out["lm_head.weight"] = _join_head(head, spec.vocab_size)
    return out


def _join(name: str, parts: list[LazyTensor], split: str, spec: GemmaSpec, tp: int) -> LazyTensor:
    import torch

    first = parts[0]
    if split == WHOLE or tp == 1:
        return first
    if split in (ROWS, COLS):
        dim = 0 if split == ROWS else 1
        shape = list(first.shape)
        shape[dim] *= tp
        return LazyTensor(name, tuple(shape), first.dtype, load=lambda: torch.cat([p.load() for p in parts], dim))
    d, q_rows = spec.head_dim, spec.num_heads // tp * spec.head_dim
    # the first rank holding each KV head (with fewer KV heads than ranks, tp / kv ranks hold a copy)
    holders = sorted({kv_heads_of(r, spec, tp).start: r for r in reversed(range(tp))}.values())
    kv_rows = spec.num_kv_heads * d

    def load():
        loaded = [p.load() for p in parts]
        q = [w[:q_rows] for w in loaded]
        k = [loaded[r][q_rows : q_rows + (w := (loaded[r].shape[0] - q_rows) // 2)] for r in holders]
        v = [loaded[r][q_rows + w :] for r in holders]
        return torch.cat(q + k + v)

    rows = spec.num_heads * d + 2 * kv_rows
    return LazyTensor(name, (rows, first.shape[1]), first.dtype, load=load)


def _join_head(parts: list[LazyTensor], vocab: int) -> LazyTensor:
    import torch

    first = parts[0]
    if len(parts) == 1 and first.shape[0] == vocab:
        return first
    return LazyTensor(
        "lm_head.weight",
        (vocab, first.shape[1]),
        first.dtype,
        load=lambda: torch.cat([p.load() for p in parts])[:vocab],
    )


def read(path: str | Path) -> Checkpoint:
    """Open a TensorRT-LLM checkpoint folder lazily as a canonical checkpoint (only headers are read here):
    qkv split into q/k/v, norms as ``w`` (float32, so that ``1 + w`` rounds back to the stored value),
    the LM head dropped when config.json shares the embedding table."""
    from converters.hf import TOKENIZER_FILES

    path = Path(path)
    if not sniff(path):
        raise InputError(f"not a TensorRT-LLM checkpoint folder (no {CONFIG} and {rank_file(0)})", path)
    cfg, spec, mapping = read_config(path)
    dtype = {v: k for k, v in DTYPE_NAMES.items()}[cfg["dtype"]]
    trt = joined_tensors(path, spec, mapping, dtype)
    tensors = {
        "model.embed_tokens.weight": _renamed(trt["transformer.vocab_embedding.weight"], "model.embed_tokens.weight")
    }
    for i in range(spec.num_layers):
        for name, (canon, split) in layer_table(spec).items():
            t = trt[f"transformer.layers.{i}.{name}"]
            names = [f"model.layers.{i}.{c}" for c in canon]
            if split == QKV:
                tensors.update(_unfused(t, names, spec))
            elif split == WHOLE:
                tensors[names[0]] = _norm_of(t, names[0])
            else:
                tensors[names[0]] = _renamed(t, names[0])
    tensors["model.norm.weight"] = _norm_of(trt["transformer.ln_f.weight"], "model.norm.weight")
    if not spec.tie_embeddings:
        tensors["lm_head.weight"] = trt["lm_head.weight"]
    ckpt = Checkpoint(
        spec=spec,
        tensors=tensors,
        tokenizer_files={n: (path / n).read_bytes() for n in TOKENIZER_FILES if (path / n).is_file()},
        source=str(path),
    )
    ckpt.check(quantized_ok=True)
    return ckpt


def _renamed(t: LazyTensor, name: str) -> LazyTensor:
    return LazyTensor(name, t.shape, t.dtype, load=t.load, quant=t.quant)


def _norm_of(t: LazyTensor, name: str) -> LazyTensor:
    return LazyTensor(name, t.shape, "f32", load=lambda: t.load().float() - 1.0)


def _unfused(t: LazyTensor, names: list[str], spec: GemmaSpec) -> dict[str, LazyTensor]:
    d = spec.head_dim
    sizes = (spec.num_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d)
    starts = (0, sizes[0], sizes[0] + sizes[1])
    return {
        n: LazyTensor(n, (size, t.shape[1]), t.dtype, load=lambda s=s, size=size: t.load()[s : s + size].contiguous())
        for n, s, size in zip(names, starts, sizes, strict=True)
    }


QUANT_ALGOS = (None,)


def read_quantization(value, file: Path) -> dict:
    """config.json's ``quantization`` object, its ``quant_algo`` one this reader takes."""
    value = value or {}
    if not isinstance(value, dict):
        raise InputError(f"quantization is {_shown(value)}, not an object", file)
    algo = value.get("quant_algo")
    if algo not in QUANT_ALGOS:
        known = ", ".join(a for a in QUANT_ALGOS if a) or "none"
        raise UnsupportedError(f"quant_algo {_shown(algo)} is not read (read: {known}, or null)", file)
    if value.get("kv_cache_quant_algo") is not None:
        raise UnsupportedError(f"kv_cache_quant_algo {_shown(value['kv_cache_quant_algo'])} is not read", file)
    return value
