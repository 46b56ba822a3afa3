"""Importance matrices as llama.cpp's llama-imatrix makes them: compute, save, load.

An importance matrix holds, for every weight matrix W of a linear projection y = x W^T, the
sum over all calibration tokens of x[j]^2 for each input column j, and the number of tokens.
Divided (``Imatrix.mean_squares``), it is the per-column ``quant_weights`` vector that
llama-quantize passes to libggml's importance-weighted quantizers, and that
``converters.gguf_writer.write(imatrix=...)`` passes to ``quantizers.gguf_blocks``.

The statistic and its scope mirror llama-imatrix (ref: llama.cpp tools/imatrix/imatrix.cpp,
IMatrixCollector::collect_imatrix), run here on the reference model in transformers (fp32,
eager attention, CPU) instead of ggml:

- windows of ``n_ctx`` tokens whose first token is BOS (ref: imatrix.cpp compute_imatrix:
  ``tokens[seq_start] = llama_vocab_bos(vocab)``), taken from the calibration split of the
  corpus only, never from the evaluation split (validation.corpus.split_text);
- every token of a window is evaluated through every layer (ref: compute_imatrix requests
  logits for all tokens, so the last layer's ``inp_out_ids`` keeps them all), so each tensor's
  count grows by ``n_ctx`` per window;
- only matrices whose GGUF name starts with ``blk.`` are collected, plus ``output.weight``
  with ``process_output`` (ref: collect_imatrix, the ``ask`` branch: ``wname.substr(0, 4) ==
  "blk." || (m_params.process_output && wname == "output.weight")``). For Gemma that is
  attn_q/k/v, attn_output, ffn_gate/up/down of every layer. With tied embeddings the output
  projection multiplies by ``token_embd.weight`` (ref: src/models/gemma3.cpp load_arch_tensors,
  ``output`` falls back to TOKEN_EMBD with TENSOR_DUPLICATED), a name neither test accepts, so
  llama-imatrix records no output entry even with ``--process-output``, and neither does this;
- batches of fewer than 16 tokens are ignored (ref: collect_imatrix, ``src1->ne[1] < 16``),
  so ``n_ctx`` must be at least 16.

File formats, both read by llama-quantize ``--imatrix`` (ref: common/imatrix-loader.cpp
common_imatrix_load, tools/quantize/quantize.cpp load_imatrix):

- GGUF (what llama-imatrix writes by default, ref: imatrix.cpp IMatrixCollector::save_imatrix):
  no ``general.architecture``; ``general.type = "imatrix"``; ``imatrix.datasets`` (array of
  strings), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32); per entry, in sorted name
  order, F32 tensors ``{name}.in_sum2`` (the raw sums, ne = [n_per_row]) and ``{name}.counts``
  (the token count as a float, ne = [1]). Written and read here.
- legacy ``imatrix.dat`` (ref: imatrix.cpp save_imatrix_legacy, imatrix-loader.cpp
  common_imatrix_load_legacy): little-endian int32 entry count; per entry int32 name length,
  name bytes, int32 ncall, int32 nval, nval float32 values = mean * ncall; then optionally int32
  chunk count, int32 dataset-name length and the name. Read here (not written).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from converters.gguf import LAYER_NAMES, TOP_NAMES
from converters.gguf_header import read_header
from gemport.errors import CheckpointError, InputError, UnsupportedError
from gemport.output import atomic_output
from gemport.progress import progress as rich_progress
from gemport.progress import stage
from gemport.spec import GemmaSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ProgressFactory = Callable[[str, int | None], AbstractContextManager[Callable[[int], None]]]

# GGUF names of the decoder's linear projections, per layer. The HF module behind each is its
# canonical tensor name (converters.gguf LAYER_NAMES: GGUF name -> HF suffix) without ".weight".
LINEAR_NAMES = (
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
)
OUTPUT_NAME = "output.weight"
# ref: imatrix.cpp collect_imatrix: "if (src1->ne[1] < 16 ...) return false" (small batches are ignored).
MIN_TOKENS = 16

# ref: common/imatrix-loader.h LLM_KV_IMATRIX_*; gguf-py constants.py Keys.IMatrix, GGUFType.IMATRIX.
KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
TYPE_IMATRIX = "imatrix"
SUM_SUFFIX = ".in_sum2"  # ref: imatrix.cpp save_imatrix, ggml_format_name(in_sum2, "%s.in_sum2", ...)
COUNT_SUFFIX = ".counts"  # ref: imatrix.cpp save_imatrix, ggml_format_name(counts, "%s.counts", ...)
GGUF_MAGIC = b"GGUF"


class ImatrixWriter(gguf.GGUFWriter):
    """GGUFWriter without general.architecture, as llama.cpp's imatrix files have none (ref:
    imatrix.cpp save_imatrix starts from gguf_init_empty; llama.cpp's
    convert_legacy_imatrix_to_gguf.py overrides add_architecture the same way)."""

    def add_architecture(self) -> None:
        pass

    def _pack_val(
        self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None
    ) -> bytes:
        # gguf-py 0.19 refuses empty arrays; gguf_set_arr_str writes one (element type, n = 0)
        # when llama-imatrix has no dataset names, and llama.cpp reads it back.
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


@dataclass
class Imatrix:
    """Per-column sums of squared activations and token counts, keyed by GGUF tensor name.

    ``sums[name]`` is float32 of length n_per_row (the weight's input dimension), as stored in
    the file; ``counts[name]`` the number of activation rows summed. ``chunks`` and ``chunk_size``
    are llama-imatrix's chunk count and tokens per chunk (n_ctx). A matrix read from a legacy
    ``.dat`` file holds ``mean * ncall`` as sums and ``ncall`` as counts (chunk_size 0, as
    llama.cpp's loader reports it), which gives the same means.
    """

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    chunks: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)

    def mean_squares(self) -> dict[str, np.ndarray]:
        """GGUF name -> float32 in_sum2 / count per column: llama-quantize's quant_weights.

        ref: tools/quantize/quantize.cpp load_imatrix: ``e[i] = sums[i] / count`` in float, and
        all ones where the count is 0.
        """
        out = {}
        for name, sums in self.sums.items():
            count = self.counts[name]
            if count > 0:
                out[name] = np.asarray(sums, dtype=np.float32) / np.float32(count)
            else:
                out[name] = np.ones_like(sums, dtype=np.float32)
        return out


def summary(imatrix: Imatrix) -> str:
    """One line for the end of ``gemport imatrix`` (llama-imatrix ends with the chunk count it stored):
    entries and the layers they span, chunks and tokens per chunk, tokens in all, the datasets.
    A legacy file's chunk size is unknown (0), so its token total is left out."""
    layers = {name.split(".")[1] for name in imatrix.sums if name.startswith("blk.")}
    entries = "1 entry" if len(imatrix.sums) == 1 else f"{len(imatrix.sums)} entries"
    line = f"imatrix  {entries} ({_plural(len(layers), 'layer')}), {_plural(imatrix.chunks, 'chunk')}"
    if imatrix.chunk_size:
        line += f" of {imatrix.chunk_size} tokens, {_plural(imatrix.chunks * imatrix.chunk_size, 'token')}"
    if imatrix.datasets:
        line += f", from {', '.join(imatrix.datasets)}"
    return line


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ---------------------------------------------------------------------------------------------
# compute


def compute_imatrix(
    model_dir: str | Path,
    corpus: str | Path | None = None,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    progress: ProgressFactory = rich_progress,
    process_output: bool = False,
) -> Imatrix:
    """Run the HF reference model over the calibration split of ``corpus`` (default: pydoc topics)
    in windows of ``n_ctx`` tokens starting with BOS (all windows, or the first ``n_chunks``) and
    collect llama-imatrix's statistic for every decoder linear projection; with ``process_output``
    also for ``output.weight`` when the model has an untied LM head (as ``--process-output``).
    """
    from validation.corpus import load_text, split_text, tokenize, windows
    from validation.validate import load_tokenizer

    model_dir = Path(model_dir)
    _check_options(n_ctx, n_chunks)
    spec = _read_spec(model_dir)
    with stage(f"tokenizing the calibration text for {model_dir.name}"):
        calibration = split_text(load_text(corpus))[1]  # [0], the evaluation part, is never read
        tokenizer = load_tokenizer(model_dir, "model")
        if tokenizer.bos_token_id is None:
            raise CheckpointError("the tokenizer has no BOS token", model_dir)
        tokens = tokenize(tokenizer, calibration)
    wanted = n_chunks if n_chunks is not None else len(tokens) // n_ctx
    chunks = windows(tokens, n_ctx, max(wanted, 1), tokenizer.bos_token_id)
    if len(chunks) < wanted:
        log.warning(
            "the calibration text holds %d windows of %d tokens, fewer than the %d asked", len(chunks), n_ctx, wanted
        )
    if max(max(c) for c in chunks) >= spec.vocab_size:
        raise CheckpointError(f"the tokenizer yields ids beyond the vocab of {spec.vocab_size}", model_dir)

    with stage(f"loading {model_dir.name}"):
        model = _load_model(model_dir)
    targets = _linear_targets(model, spec, process_output and not spec.tie_embeddings, model_dir)
    if process_output and spec.tie_embeddings:
        log.info("tied embeddings: the output matmul uses token_embd.weight, which llama-imatrix does not record")
    sums, counts = _collect(model, targets, chunks, progress, f"imatrix {model_dir.name}", OUTPUT_NAME in targets)
    log.info("imatrix: %d tensors from %d windows of %d tokens", len(sums), len(chunks), n_ctx)
    dataset = str(corpus) if corpus is not None else "pydoc_data.topics"
    return Imatrix(
        sums={name: sums[name].numpy().astype(np.float32) for name in sorted(sums)},
        counts={name: counts[name] for name in sorted(counts)},
        chunks=len(chunks),
        chunk_size=n_ctx,
        datasets=[f"{dataset} (calibration split)"],
    )


def _check_options(n_ctx: int, n_chunks: int | None) -> None:
    if n_ctx < MIN_TOKENS:
        raise UnsupportedError(
            f"n_ctx must be at least {MIN_TOKENS} (llama-imatrix ignores smaller batches), got {n_ctx}"
        )
    if n_chunks is not None and n_chunks < 1:
        raise UnsupportedError(f"chunks must be at least 1, got {n_chunks}")


def _read_spec(model_dir: Path) -> GemmaSpec:
    from converters.hf import CONFIG, read_json, sniff

    if not sniff(model_dir):
        raise InputError(f"not a Hugging Face checkpoint folder (no {CONFIG})", model_dir)
    return GemmaSpec.from_hf_config(read_json(model_dir / CONFIG), model_dir / CONFIG)


def _load_model(model_dir: Path) -> torch.nn.Module:
    from validation.runtimes.hf_transformers import TransformersRuntime

    return TransformersRuntime(model_dir).model  # fp32, eager attention, CPU, eval mode


def _linear_targets(model: torch.nn.Module, spec: GemmaSpec, with_output: bool, model_dir: Path) -> dict[str, Any]:
    """GGUF name -> the nn.Linear whose input is collected."""
    from torch import nn

    layer_names = LAYER_NAMES[spec.family]
    paths = {
        f"blk.{i}.{name}": f"model.layers.{i}.{layer_names[name].removesuffix('.weight')}"
        for i in range(spec.num_layers)
        for name in LINEAR_NAMES
    }
    if with_output:
        paths[OUTPUT_NAME] = TOP_NAMES[OUTPUT_NAME].removesuffix(".weight")  # lm_head
    targets = {}
    for gguf_name, module_path in paths.items():
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise CheckpointError(f"the model has no module {module_path} (for {gguf_name})", model_dir) from None
        if not isinstance(module, nn.Linear):
            raise CheckpointError(f"{module_path} is a {type(module).__name__}, not a Linear", model_dir)
        targets[gguf_name] = module
    return targets


def _collect(
    model: torch.nn.Module,
    targets: dict[str, Any],
    chunks: list[list[int]],
    progress: ProgressFactory,
    description: str,
    need_head: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Run every window; a forward pre-hook per target adds sum_t x[t, j]^2 and the row count."""
    import torch

    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in targets.items()}
    counts = dict.fromkeys(targets, 0)

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            # x^2 in fp32 as ggml does (ref: collect_imatrix, acc[j] += x[j] * x[j]); the sum
            # over rows is kept in fp64 here rather than llama.cpp's fp32 accumulator.
            sums[name] += x.square().sum(dim=0, dtype=torch.float64)
            counts[name] += x.shape[0]  # ref: collect_imatrix, e.counts[i] += ggml_nrows(src1) / n_mat

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in targets.items()]
    # Without the output entry, the LM head (vocab x hidden, the largest matmul) is not run at all.
    runner = model if need_head else model.get_decoder()
    try:
        with torch.inference_mode(), progress(description, len(chunks), unit="chunks") as advance:
            for chunk in chunks:
                runner(input_ids=torch.tensor([chunk], dtype=torch.long), use_cache=False)
                advance(1)
    finally:
        for h in handles:
            h.remove()
    return sums, counts


# ---------------------------------------------------------------------------------------------
# save


def save_imatrix(imatrix: Imatrix, dst: str | Path, overwrite: bool = False) -> Path:
    """Write ``imatrix`` as llama-imatrix's GGUF file (atomically); returns ``dst``."""
    dst = Path(dst)
    with atomic_output(dst, overwrite=overwrite) as tmp:
        writer = ImatrixWriter(tmp, arch="")
        # Keys in save_imatrix's order (ref: imatrix.cpp save_imatrix, gguf_set_val_str / _arr_str / _val_u32).
        writer.add_type(TYPE_IMATRIX)
        writer.add_key_value(KEY_DATASETS, list(imatrix.datasets), GGUFValueType.ARRAY, GGUFValueType.STRING)
        writer.add_uint32(KEY_CHUNK_COUNT, imatrix.chunks)
        writer.add_uint32(KEY_CHUNK_SIZE, imatrix.chunk_size)
        for name in sorted(imatrix.sums):  # ref: save_imatrix, "deterministic tensor name order" (std::sort)
            sums = np.ascontiguousarray(imatrix.sums[name], dtype=np.float32).reshape(-1)
            # ne = [n_per_row, 1] and [1, 1]; ggml_n_dims drops the trailing 1s, so both are 1-D on disk.
            writer.add_tensor(name + SUM_SUFFIX, sums)
            writer.add_tensor(name + COUNT_SUFFIX, np.array([imatrix.counts[name]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.info("wrote %s: %d entries, %d chunks of %d tokens", dst, len(imatrix.sums), imatrix.chunks, imatrix.chunk_size)
    return dst


# ---------------------------------------------------------------------------------------------
# load


def load_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF imatrix (llama-imatrix's default) or a legacy ``imatrix.dat``.

    Like common_imatrix_load, a file that is not GGUF is read as legacy. Bad files raise a
    one-line InputError naming the file; an entry of several matrices (a mixture-of-experts
    tensor, which Gemma has none of) raises UnsupportedError.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise InputError("imatrix file not found", path) from None
    except OSError as exc:
        raise InputError(f"cannot read the imatrix: {exc.strerror}", path) from None
    if magic != GGUF_MAGIC and path.suffix.lower() == ".gguf":  # named GGUF, so not a legacy .dat
        raise InputError("not a GGUF file (no GGUF magic)", path)
    imatrix = _load_gguf(path) if magic == GGUF_MAGIC else _load_legacy(path)
    _check_finite(imatrix, path)
    log.info("loaded %d imatrix entries from %s (%d chunks)", len(imatrix.sums), path, imatrix.chunks)
    return imatrix


def _load_gguf(path: Path) -> Imatrix:
    # The header is read by gemport's bounded GGUF reader: gguf-py's GGUFReader trusts every count
    # a (possibly hostile) file states (see converters/gguf_header.py).
    header = read_header(path)
    values = header.values
    kind = values.get(KEY_TYPE)
    if kind is not None and kind != TYPE_IMATRIX:
        raise InputError(f"a GGUF of general.type {kind!r}, not an imatrix", path)
    if kind is None and "general.architecture" in values:
        raise InputError("a GGUF model, not an imatrix (no .in_sum2 / .counts tensors)", path)
    if kind is None and "split.count" in values:  # ref: gguf-split.cpp: later shards hold only split.*
        raise InputError("a shard of a split GGUF model, not an imatrix", path)
    if any(k not in values for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)):
        # ref: quantize.cpp load_imatrix: "missing imatrix metadata" is fatal there.
        log.warning("%s: imatrix metadata missing; llama-quantize would refuse this file", path)

    pairs: dict[str, dict[str, Any]] = {}
    for t in header.tensors:
        for suffix in (SUM_SUFFIX, COUNT_SUFFIX):
            if t.name.endswith(suffix):
                pairs.setdefault(t.name.removesuffix(suffix), {})[suffix] = t
    if not pairs:
        raise InputError("no imatrix entries (no .in_sum2 / .counts tensors)", path)

    sums, counts = {}, {}
    for name in sorted(pairs):
        pair = pairs[name]
        if len(pair) != 2:
            missing = COUNT_SUFFIX if SUM_SUFFIX in pair else SUM_SUFFIX
            raise InputError(f"entry {name} has no {name}{missing} tensor", path)
        s, c = pair[SUM_SUFFIX], pair[COUNT_SUFFIX]
        if s.qtype != GGMLQuantizationType.F32 or c.qtype != GGMLQuantizationType.F32:
            raise InputError(f"entry {name}: sums and counts must be F32", path)  # ref: common_imatrix_load
        if int(np.prod(c.ne)) != 1:
            raise UnsupportedError(f"entry {name} holds {int(np.prod(c.ne))} matrices (mixture of experts)", path)
        sums[name] = np.array(s.array(), dtype=np.float32).reshape(-1)
        counts[name] = round(float(np.asarray(c.array()).reshape(-1)[0]))  # ref: std::lround(counts->data[j])
    return Imatrix(
        sums=sums,
        counts=counts,
        chunks=_count(values, KEY_CHUNK_COUNT, path),
        chunk_size=_count(values, KEY_CHUNK_SIZE, path),
        datasets=_datasets(values, path),
    )


def _count(values: dict[str, Any], key: str, path: Path) -> int:
    value = values.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{key} is {value!r}, not a count", path)
    return value


def _datasets(values: dict[str, Any], path: Path) -> list[str]:
    value = values.get(KEY_DATASETS, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{KEY_DATASETS} is not an array of strings", path)
    return value


class _Cursor:
    """Little-endian reads from a byte string; InputError naming the file at the end of data."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise InputError(f"legacy imatrix truncated while reading {what} at byte {self.pos}", self.path)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]

    def at_end(self) -> bool:
        return self.pos >= len(self.data)


def _load_legacy(path: Path) -> Imatrix:
    """ref: common/imatrix-loader.cpp common_imatrix_load_legacy (layout: save_imatrix_legacy)."""
    try:
        cur = _Cursor(path.read_bytes(), path)
    except OSError as exc:
        raise InputError(f"cannot read the imatrix: {exc.strerror}", path) from None
    n_entries = cur.int32("the entry count") if len(cur.data) >= 4 else 0
    if n_entries < 1:
        raise InputError("neither a GGUF imatrix nor a legacy imatrix.dat (no entries)", path)
    sums, counts = {}, {}
    for i in range(n_entries):
        name = _legacy_name(cur, i, path)
        ncall = cur.int32(f"ncall of {name}")
        nval = cur.int32(f"the size of {name}")
        if nval < 1:
            raise InputError(f"legacy entry {name} has {nval} values", path)
        sums[name] = np.frombuffer(cur.take(4 * nval, f"the values of {name}"), dtype="<f4").astype(np.float32)
        # quantize.cpp divides legacy values by ncall, or keeps them as is when ncall is 0; a
        # count of 1 gives the latter through Imatrix.mean_squares.
        counts[name] = ncall if ncall > 0 else 1
    chunks, datasets = 0, []
    if not cur.at_end():  # ref: common_imatrix_load_legacy, "the trailing data ... is optional"
        chunks = cur.int32("the chunk count")
        length = cur.int32("the dataset name length") if not cur.at_end() else 0
        if length > 0:
            datasets.append(cur.take(length, "the dataset name").decode("utf-8", errors="replace"))
    # ref: common_imatrix_load_legacy: chunk_size = 0 (unknown in this format).
    return Imatrix(sums=sums, counts=counts, chunks=chunks, chunk_size=0, datasets=datasets)


def _legacy_name(cur: _Cursor, i: int, path: Path) -> str:
    length = cur.int32(f"the name length of entry {i + 1}")
    if length < 1 or length > 4096:
        raise InputError(f"neither a GGUF imatrix nor a legacy imatrix.dat (entry {i + 1} name length {length})", path)
    raw = cur.take(length, f"the name of entry {i + 1}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"neither a GGUF imatrix nor a legacy imatrix.dat (entry {i + 1} name)", path) from None


def _check_finite(imatrix: Imatrix, path: Path) -> None:
    # ref: src/llama-quant.cpp: "imatrix contains non-finite value" aborts quantization.
    for name, sums in imatrix.sums.items():
        if not np.isfinite(sums).all():
            raise InputError(f"entry {name} has non-finite values", path)
        if imatrix.counts[name] < 0:
            raise InputError(f"entry {name} has a negative count {imatrix.counts[name]}", path)
