"""What an artifact stores, read from its headers: ``gemport inspect`` and the end-of-command summary.

Nothing here loads or dequantizes a tensor. GGUF files are read through converters/gguf_header.py
(header and metadata only), safetensors folders through their JSON headers, ONNX folders through
the graph without its external data and the metadata gemport writes beside it; JAX and
gemma_pytorch checkpoints through their readers, which open tensors lazily. The spec and the
checks of the config and the tensor table come from each format's reader (for GGUF and ONNX, its
functions called in its order, without the steps that build: GGUF's tokenizer rebuild, ONNX's
loaders), so ``inspect`` refuses a damaged header or config with the error ``convert`` gives.

Stored types are named as each format's own tools name them: GGUF by ggml type as gguf-dump prints
them (Q4_K, Q6_K, F32), safetensors by dtype (BF16) and a compressed-tensors module by its scheme
("int4 pack-quantized g128 sym"), ONNX by MatMulNBits / GatherBlockQuantized bits and block size
and by initializer dtype. Bits per weight are the stored weights' bits over the model's parameters,
as llama.cpp's loader reports BPW (ref: llama-model-loader.cpp, ``n_bytes * 8.0 / n_elements``).

The type rows sum to the total, and the total's parameters are the model's (each canonical tensor
counted once). What an artifact stores besides the model's tensors (ONNX rotary cos/sin tables and
const_* initializers, a tied model's dropped lm_head.weight) is one "other" row, left out of the
parameters, the weight bytes and bits per weight; the size on disk counts everything. A row that
reads a table another row counts (an ONNX head sharing the lookup's table) or stores a second copy
of a tied table shows those elements in parentheses, not summed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from gemport import registry
from gemport.checkpoint import Checkpoint, LazyTensor
from gemport.errors import CheckpointError, InputError, UnsupportedError


@dataclass
class Row:
    """One stored type: how many tensors, their elements (weights) and their bytes. ``shared`` counts
    the elements a row reads or stores again that another row already counts (an ONNX head reading
    the lookup's table, a second copy of a tied table): shown, never summed into the parameters."""

    tensors: int = 0
    parameters: int = 0
    bytes: int = 0
    shared: int = 0

    def add(self, parameters: int, nbytes: int, tensors: int = 1, shared: int = 0) -> None:
        self.tensors += tensors
        self.parameters += parameters
        self.bytes += nbytes
        self.shared += shared


# The row of what an artifact stores besides the model's tensors (not parameters, not weight bytes,
# still on disk), named by format.
OTHER = {"onnx": "other (rotary tables, constants)"}
OTHER_DEFAULT = "other (not model tensors)"


def cmd_inspect(args) -> int:
    options = {}
    if args.preset or args.keep_padded_vocab:
        options = {"preset": args.preset, "keep_padded_vocab": args.keep_padded_vocab}
    info = describe(args.path, args.src_format, **options)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def describe(path: str | Path, fmt: str | None = None, **reader_options) -> dict:
    """What ``path`` stores (format, family, spec, stored types, sizes, bits per weight, recorded
    quantization) as a JSON-ready dict; the reader's one-line errors for anything it would refuse."""
    path = Path(path)
    fmt = fmt or registry.detect(path)
    if reader_options and fmt not in ("jax", "gemma-pytorch"):
        raise UnsupportedError(
            f"--preset and --keep-padded-vocab apply to a JAX or gemma_pytorch source, not {fmt}", path
        )
    registry.get(fmt)  # an unknown name lists the known ones
    described = {"gguf": _gguf, "hf": _hf, "onnx": _onnx, "trtllm": _trtllm}.get(fmt)
    if described is not None:
        spec, parameters, rows, other, files, quantization = described(path)
    else:
        spec, parameters, rows, other, files, quantization = _by_reader(path, fmt, reader_options)
    rows = dict(sorted(rows.items(), key=lambda kv: (-kv[1].parameters, -kv[1].bytes, kv[0])))
    weight_bytes = sum(r.bytes for r in rows.values())
    return {
        "path": str(path),
        "format": fmt,
        "family": spec.family,
        "quantization": quantization,
        "tensors": sum(r.tensors for r in rows.values()),
        "parameters": parameters,
        "types": {name: asdict(r) for name, r in rows.items()},
        "other": {"name": OTHER.get(fmt, OTHER_DEFAULT), **asdict(other)} if other.tensors else None,
        "files": len(files),
        "size": sum(f.stat().st_size for f in files),
        "weight_bytes": weight_bytes,
        "bits_per_weight": weight_bytes * 8 / parameters if parameters else None,
        "spec": spec.to_json(),
    }


def _not_loaded():
    raise AssertionError("describe never loads a tensor")


def _parameters(ckpt: Checkpoint) -> int:
    return sum(math.prod(t.shape) for t in ckpt)


def _folder_files(path: Path) -> list[Path]:
    """Every file of an artifact: the file itself, or every file under the folder."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def artifact_size(path: str | Path) -> int:
    """Bytes on disk of everything at ``path`` (a file, or every file under a folder); with the other
    shards of a split GGUF named ``NAME-00001-of-0000N.gguf``."""
    path = Path(path)
    files = _folder_files(path)
    if path.is_file() and path.suffix == ".gguf":
        from converters.gguf import _SHARD_RE, split_paths

        m = _SHARD_RE.fullmatch(path.name)
        if m and int(m.group(2)) == 1:
            shards = split_paths(path.with_name(m.group(1) + ".gguf"), int(m.group(3)))
            files = [s for s in shards if s.is_file()]
    return sum(f.stat().st_size for f in files)


# --- GGUF -----------------------------------------------------------------------------------------


def _gguf(path: Path):
    """converters.gguf.read without the tokenizer rebuild (its metadata still checked): through
    transformers, that rebuild is 22 of the 23 s the reader takes on Gemma 3's 262144 pieces."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

    from converters import gguf as reader

    ckpt = reader.read(path, tokenizer=False)
    rows: dict[str, Row] = {}
    for t in ckpt:
        qtype = t.raw[0]  # ref: gguf-py scripts/gguf_dump.py prints tensor.tensor_type.name
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
        rows.setdefault(qtype, Row()).add(math.prod(t.shape), math.prod(t.shape) // block * size)
    quantization: dict = {}
    file_type = ckpt.extra["gguf.file_type"]
    if file_type is not None:
        try:  # ref: gguf-py constants.py LlamaFileType (MOSTLY_Q4_K_M = 15); llama.cpp names it Q4_K - Medium
            quantization["file_type"] = LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            quantization["file_type"] = str(file_type)
    made = ckpt.extra["gguf.quantization"]
    if isinstance(made, str):
        try:
            quantization["gemport"] = json.loads(made)
        except ValueError:
            quantization["gemport"] = made
    # the reader refuses a tensor that is no model tensor, so a GGUF has no "other" row
    return ckpt.spec, _parameters(ckpt), rows, Row(), ckpt.extra["gguf.files"], quantization or None


# --- Hugging Face safetensors -----------------------------------------------------------------------


def _hf(path: Path):
    """The reader for the spec and every check (it reads headers only); stored types from the
    safetensors headers, a compressed-tensors module's packed set counted once under its scheme;
    entries the reader does not take as model tensors (a tied model's lm_head.weight, which it
    drops) in the "other" row."""
    from converters import compressed_tensors as ct
    from converters import hf

    ckpt = hf.read(path)
    config = hf.read_json(path / hf.CONFIG)
    quantization_config = config.get("quantization_config")
    scheme = _ct_scheme(quantization_config, path) if quantization_config is not None else None
    records = ckpt.quantized()
    rows: dict[str, Row] = {}
    other = Row()
    weight_files = hf._weight_files(path)
    for file in weight_files:
        _, header, _ = hf._header_json(file)
        for name, dtype, shape, start, stop in hf._header_entries(file, header):
            module = name.rsplit(".", 1)[0]
            if scheme is not None and name.endswith(ct.SUFFIXES) and f"{module}.weight" in records:
                record = records[f"{module}.weight"]
                packed = name.endswith(".weight_packed")
                rows.setdefault(scheme, Row()).add(math.prod(record.shape) if packed else 0, stop - start, int(packed))
            elif name in ckpt.tensors:
                rows.setdefault(dtype, Row()).add(math.prod(shape), stop - start)
            else:
                other.add(math.prod(shape), stop - start)
    quantization: dict = {}
    if scheme is not None:
        quantization["config.json"] = scheme
    manifest = ckpt.extra.get("quantization")
    if manifest:
        quantization["gemport"] = _compact(manifest)
    return ckpt.spec, _parameters(ckpt), rows, other, _folder_files(path), quantization or None


def _ct_scheme(quantization_config: dict, path: Path) -> str:
    """e.g. 'int4 pack-quantized g128 sym', from the config the reader has checked
    (ref: compressed-tensors QuantizationArgs num_bits, group_size, symmetric; the format)."""
    from converters import compressed_tensors as ct

    bits, group_size, symmetric = ct._scheme(quantization_config, path)
    group = f"g{group_size}" if group_size else "per-channel"
    return f"int{bits} {quantization_config['format']} {group} {'sym' if symmetric else 'asym'}"


def _compact(manifest: dict) -> dict:
    """gemport.json's quantization block without its long lists (counted) and unset settings."""
    out = {}
    for key, value in manifest.items():
        if isinstance(value, list):
            out[key] = len(value)
        elif isinstance(value, dict):
            out[key] = {k: v for k, v in value.items() if v is not None and not isinstance(v, list | dict)}
        elif value is not None:
            out[key] = value
    return out


# --- TensorRT-LLM ---------------------------------------------------------------------------------


def _trtllm(path: Path):
    """The reader for the spec and every check (headers only); stored types from the rank files'
    headers: a W4A16_AWQ projection's three tensors under one row ("W4A16_AWQ int4 g128"), a W8A16 /
    W4A16 projection under its float dtype and the algorithm trtllm-build applies to it. A model tensor
    stored on several ranks (norms, a copied KV head, the vocabulary's padding rows) counts its
    parameters once and its bytes every time."""
    from converters import hf, trtllm
    from quantizers.rtn import PROJECTIONS

    ckpt = trtllm.read(path)
    config = hf.read_json(path / trtllm.CONFIG)
    quant = config.get("quantization") or {}
    algo = quant.get("quant_algo")
    stored = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[config["dtype"]]
    projections = {name for name, (_, split) in trtllm.layer_table(ckpt.spec).items() if split != trtllm.WHOLE}

    def label(projection: bool, dtype: str) -> str:
        if projection and algo == trtllm.W4A16_AWQ:
            return f"W4A16_AWQ int4 g{quant['group_size']}"
        return f"{dtype} ({algo} at build)" if projection and algo else dtype

    rows: dict[str, Row] = {}
    for name, t in ckpt.tensors.items():
        projection = name.startswith("model.layers.") and name.split(".", 3)[-1].removesuffix(".weight") in PROJECTIONS
        rows.setdefault(label(projection, stored), Row()).add(math.prod(t.shape), 0)
    for rank in range(config["mapping"]["world_size"]):
        file = path / trtllm.rank_file(rank)
        _, header, _ = hf._header_json(file)
        for name, dtype, _, start, stop in hf._header_entries(file, header):
            key = name.split(".", 3)[-1] if name.startswith("transformer.layers.") else name
            projection = key.rsplit(".", 1)[0] + ".weight" in projections
            rows.setdefault(label(projection, stored if projection else dtype), Row()).add(0, stop - start, 0)
    quantization = {"config.json": algo} if algo else None
    manifest = hf.read_json(path / trtllm.MANIFEST).get("quantization") if (path / trtllm.MANIFEST).is_file() else None
    if isinstance(manifest, dict):
        quantization = (quantization or {}) | {"gemport": _compact(manifest)}
    return ckpt.spec, _parameters(ckpt), rows, Row(), _folder_files(path), quantization


# --- ONNX -------------------------------------------------------------------------------------------


def _onnx(path: Path):
    """converters.onnx.open_model's checks (read's, without its loaders, which import onnx_ir and torch)
    on the graph without external data; stored types from the graph's nodes and initializers."""
    from converters import onnx as reader
    from gemport.checkpoint import expected_shapes

    file, proto, spec, layout = reader.open_model(path)
    shapes = expected_shapes(spec)
    tensors = {n: LazyTensor(n, shape, "f32", load=_not_loaded) for n, shape in shapes.items()}
    ckpt = Checkpoint(spec=spec, tensors=tensors, source=str(path))
    holds = _onnx_holds(layout, shapes)
    names = {t.name for t in proto.graph.initializer}
    for name in sorted(n for n in holds if n not in names and not n.endswith(".zero_points")):
        raise CheckpointError(f"initializer {name} is missing", file)  # as the reader's loader says it
    rows, other = _onnx_rows(proto.graph, spec.vocab_size, file, holds)
    folder = file.parent
    files = _folder_files(folder) if path.is_dir() else [file, *_external_files(proto, folder)]
    quantization = None
    manifest = folder / reader.MANIFEST
    if manifest.is_file():
        from converters.hf import read_json

        recorded = read_json(manifest).get("quantization")
        quantization = {"gemport": _compact(recorded)} if isinstance(recorded, dict) else None
    return spec, _parameters(ckpt), rows, other, files, quantization


def _onnx_holds(layout: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, int]]:
    """Initializer name -> {canonical tensor: elements} it stores, from the layout table the reader
    checked: a float entry's initializer, a MatMulNBits entry's .qweight/.scales/.zero_points (ref:
    converters/onnx.py _loader), several canonical tensors for a fused (stacked) one. An entry that is
    no canonical tensor (a tied model's separately quantized lm_head) holds nothing of its own."""
    holds: dict[str, dict[str, int]] = {}
    for canonical, entry in layout.items():
        name = entry["name"]
        parts = [name] if entry["kind"] == "float" else [f"{name}.{s}" for s in ("qweight", "scales", "zero_points")]
        for part in parts:
            held = holds.setdefault(part, {})
            if canonical in shapes:
                held[canonical] = math.prod(shapes[canonical])
    return holds


def _external_files(proto, folder: Path) -> list[Path]:
    import onnx

    names = {
        e.value
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    return [folder / n for n in sorted(names)]


# ONNX TensorProto data type number -> (name as safetensors names it, bits per element)
# (ref: onnx/onnx.proto TensorProto.DataType).
_ONNX_TYPES = {1: ("F32", 32), 2: ("U8", 8), 3: ("I8", 8), 4: ("U16", 16), 5: ("I16", 16), 6: ("I32", 32)}
_ONNX_TYPES |= {7: ("I64", 64), 9: ("BOOL", 8), 10: ("F16", 16), 11: ("F64", 64), 12: ("U32", 32)}
_ONNX_TYPES |= {13: ("U64", 64), 16: ("BF16", 16), 21: ("U4", 4), 22: ("I4", 4)}


def _initializer_bytes(t) -> int:
    """Bytes an initializer stores: its external length (checked by the reader), its raw bytes, or
    its typed values at their element size."""
    import onnx

    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if "length" in info:
            return int(info["length"])
    if t.raw_data:
        return len(t.raw_data)
    bits = _ONNX_TYPES.get(t.data_type, ("", 0))[1]
    return -(-math.prod(t.dims) * bits // 8)


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _onnx_rows(graph, vocab_size: int, file: Path, holds: dict[str, dict[str, int]]) -> tuple[dict[str, Row], Row]:
    """(rows, other): MatMulNBits by bits and block (the LM head apart: the one of N = vocab rows),
    GatherBlockQuantized likewise, every other model initializer by dtype; initializers that hold no
    model tensor (rotary cos/sin tables, const_* shapes and scalars) in ``other``. An initializer
    reached through Reshape (a lookup table and a head sharing one table) is followed back and its
    bytes counted once, under the node that reads it first; the other's row says "(shared table)".
    A canonical tensor's parameters are counted once too: a row reading or storing one again (a
    head over the lookup's table, a tied head quantized apart) holds them as ``shared``
    (ref: onnxruntime docs/ContribOperators.md MatMulNBits: inputs A, B, scales, zero_points, g_idx,
    bias, attributes K, N, bits (default 4), block_size; GatherBlockQuantized: data, indices, scales,
    zero_points, attributes bits (default 4), block_size (default 128))."""
    inits = {t.name: t for t in graph.initializer}
    made_by = {out: node for node in graph.node for out in node.output}

    def source(name: str) -> str | None:
        for _ in range(len(graph.node) + 1):
            if name in inits:
                return name
            node = made_by.get(name)
            if node is None or node.op_type not in ("Reshape", "Identity", "Transpose") or not node.input:
                return None
            name = node.input[0]
        return None

    rows: dict[str, Row] = {}
    counted: set[str] = set()  # initializers whose bytes a row holds
    held: set[str] = set()  # canonical tensors whose parameters a row holds

    def add(key: str, elements: int, names: Iterable[str]) -> None:
        parts = {source(n) for n in names if n} - {None}
        new = parts - counted
        if parts and not new:
            key = f"{key[:-1]}, shared table)" if key.endswith(")") else f"{key} (shared table)"
        counted.update(new)
        canonical = {c: n for p in parts for c, n in holds.get(p, {}).items() if c not in held}
        held.update(canonical)
        parameters = min(sum(canonical.values()), elements)
        nbytes = sum(_initializer_bytes(inits[n]) for n in new)
        rows.setdefault(key, Row()).add(parameters, nbytes, shared=elements - parameters)

    for node in graph.node:
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        a = _attrs(node)
        bits = a.get("bits", 4)
        if node.op_type == "MatMulNBits":
            if not all(isinstance(a.get(k), int) for k in ("K", "N", "block_size")):
                raise InputError(f"MatMulNBits node {node.name!r} lacks its K, N or block_size attribute", file)
            head = " (head)" if a["N"] == vocab_size else ""
            add(f"MatMulNBits int{bits} b{a['block_size']}{head}", a["K"] * a["N"], node.input[1:])
        else:
            block = a.get("block_size", 128)
            scales = source(node.input[2]) if len(node.input) > 2 else None
            elements = math.prod(inits[scales].dims) * block if scales else 0
            add(f"GatherBlockQuantized int{bits} b{block}", elements, [node.input[0], *node.input[2:]])
    other = Row()
    for name, t in inits.items():
        if name in counted:
            continue
        if name not in holds:
            other.add(math.prod(t.dims), _initializer_bytes(t))
            continue
        canonical = {c: n for c, n in holds[name].items() if c not in held}
        held.update(canonical)
        elements = math.prod(t.dims)
        parameters = min(sum(canonical.values()), elements)
        key = _ONNX_TYPES.get(t.data_type, (str(t.data_type), 0))[0]
        rows.setdefault(key, Row()).add(parameters, _initializer_bytes(t), shared=elements - parameters)
    return rows, other


# --- formats read through their readers (JAX, gemma_pytorch) ---------------------------------------


def _by_reader(path: Path, fmt: str, options: dict):
    """The reader opens tensors lazily; types and bytes are its LazyTensors' (a quantized record as
    its format, e.g. 'int8 per-channel sym (f32 scales)')."""
    ckpt = registry.get(fmt).load().read(path, **options)
    rows: dict[str, Row] = {}
    for t in ckpt:
        key = t.quant.describe() if t.quant is not None else t.dtype.upper()
        rows.setdefault(key, Row()).add(math.prod(t.shape), t.nbytes)
    manifest = ckpt.extra.get("quantization")
    quantization = {"gemport": _compact(manifest)} if isinstance(manifest, dict) else None
    return ckpt.spec, _parameters(ckpt), rows, Row(), _folder_files(path), quantization


# --- text ----------------------------------------------------------------------------------------


def human_bytes(n: int | float) -> str:
    """1536 -> '1.50 KiB'; as llama.cpp prints sizes, in powers of 1024."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def human_count(n: int) -> str:
    """268098176 -> '268.10 M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def number(value) -> str:
    """A value readably: small floats in scientific notation (1e-06), others as Python writes them."""
    if isinstance(value, float) and value != 0 and abs(value) < 1e-3:
        return f"{value:.4g}"
    return str(value)


def _runs(values: list) -> str:
    """['a', 'a', 'b'] -> '2 x a, b'."""
    out: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        out.append(f"{j - i} x {values[i]}" if j - i > 1 else str(values[i]))
        i = j
    return ", ".join(out)


def _quantization_text(q: dict | None) -> str:
    """e.g. 'file type Q4_K_M' or 'config.json int4 pack-quantized g128 sym; gemport rtn bits=4 ...,
    126 quantized, 110 kept'."""
    if not q:
        return "none recorded"
    parts = []
    for key, value in q.items():
        if key == "file_type":
            parts.append(f"file type {value}")
        elif isinstance(value, dict):
            parts.append(f"{key} {_made_text(value)}")
        else:
            parts.append(f"{key} {value}")
    return "; ".join(parts)


def _made_text(made: dict) -> str:
    """A compact quantization record: its method, its settings, then its counts."""
    words = [str(made["method"])] if made.get("method") else []
    counts = []
    for key, value in made.items():
        if key == "method":
            continue
        if isinstance(value, dict):
            inner = " ".join(f"{k}={number(v)}" for k, v in value.items())
            words.append(inner if key == "config" else f"{key}({inner})")
        elif key in ("quantized", "kept") and isinstance(value, int):
            counts.append(f"{value} {key}")
        else:
            words.append(f"{key}={number(value)}")
    return " ".join(words) + (", " + ", ".join(counts) if counts else "")


def table(info: dict) -> str:
    """The stored types as an aligned table: one row per type, their total (the rows' tensors,
    parameters and bytes sum to it), then the "other" row, which the total leaves out. Elements in
    parentheses are not counted in the total: a row's shared table, or what is no model weight."""
    rows = [(name, r["tensors"], r["parameters"], r.get("shared", 0), r["bytes"]) for name, r in info["types"].items()]
    rows.append(("total", info["tensors"], info["parameters"], 0, info["weight_bytes"]))
    other = info.get("other")
    other_name = other["name"] if other else None
    if other:
        rows.append((other_name, other["tensors"], 0, other["parameters"], other["bytes"]))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'type':<{width}}  {'tensors':>7}  {'parameters':>10}  {'bytes':>11}  {'bpw':>6}"]
    for name, tensors, parameters, shared, nbytes in rows:
        elements = parameters or shared
        bpw = f"{nbytes * 8 / elements:.2f}" if elements and nbytes and name != other_name else "-"
        count = f"({human_count(shared)})" if shared and not parameters else human_count(parameters)
        lines.append(f"{name:<{width}}  {tensors:>7}  {count:>10}  {human_bytes(nbytes):>11}  {bpw:>6}")
    return "\n".join(lines)


def _types_line(info: dict) -> str:
    """e.g. 'F32 42 (42 tensors); other (rotary tables, constants) 14'."""
    rows = ", ".join(f"{name} {r['tensors']}" for name, r in info["types"].items())
    other = info.get("other")
    return f"{rows} ({info['tensors']} tensors)" + (f"; {other['name']} {other['tensors']}" if other else "")


def render(info: dict) -> str:
    """``inspect``'s text: the facts, the type table, the spec."""
    bpw = info["bits_per_weight"]
    files = f"{info['files']} file" + ("s" if info["files"] != 1 else "")
    facts = [
        ("path", info["path"]),
        (
            "format",
            info["format"]
            + (
                " (compressed-tensors)"
                if "config.json" in (info["quantization"] or {}) and info["format"] == "hf"
                else ""
            ),
        ),
        ("family", info["family"]),
        ("quantization", _quantization_text(info["quantization"])),
        ("tensors", info["tensors"]),
        ("parameters", f"{human_count(info['parameters'])} ({info['parameters']})"),
        ("size", f"{human_bytes(info['size'])} on disk ({info['size']} bytes, {files})"),
        ("weights", f"{human_bytes(info['weight_bytes'])}, " + (f"{bpw:.2f} bits per weight" if bpw else "-")),
    ]
    lines = [f"{key:<12} {value}" for key, value in facts]
    lines.append("types")
    lines += ["  " + line for line in table(info).splitlines()]
    lines.append("spec")
    for key, value in info["spec"].items():
        shown = _runs(value) if isinstance(value, list | tuple) else number(value)
        lines.append(f"  {key:<22} {shown}")
    return "\n".join(lines)


def summary(src: Path | None, dst: Path, seconds: float, fmt: str | None = None, info: dict | None = None) -> str:
    """Two lines for the end of ``convert`` / ``quantize``, as llama-quantize ends: the stored types
    with counts, then size before (``src`` on disk) and after, bits per weight and the time taken.
    ``dst`` is the path the writer returned (a split GGUF's first shard); ``fmt`` its format when
    detection should be skipped; ``info`` its describe() when the caller has it."""
    info = info or describe(dst, fmt)
    before = f"{human_bytes(artifact_size(src))} -> " if src is not None else ""
    bpw = info["bits_per_weight"]
    return (
        f"types  {_types_line(info)}\n"
        f"size   {before}{human_bytes(info['size'])}"
        + (f", {bpw:.2f} bits per weight" if bpw else "")
        + f", {seconds:.1f} s"
    )
