"""The GPU validation runtime (``gemport validate --device cuda``): gemport's Triton W4A16/W8A16 kernels in
every decoder projection (q/k/v/o/gate/up/down), reading the weights as the artifact stores them.

- compressed-tensors folders (int4 groups / int8 channels, symmetric or not, as ``gemport quantize`` writes
  them): transformers' own Gemma model built from config.json with empty parameters
  (accelerate.init_empty_weights), its embedding, norms and LM head loaded from the folder, each quantized
  nn.Linear replaced by a module holding the stored ``weight_packed`` / ``weight_scale`` /
  ``weight_zero_point`` that calls quantizers.kernels.dequant_matmul.matmul;
- TensorRT-LLM W4A16_AWQ / W4A16 / W8A16 checkpoints: the layout runtime's forward pass
  (trtllm_layout.py) with its projections computed by quantizers.kernels.trtllm_matmul from the stored
  int4 rows (W4A16_AWQ, with the pre-quant scale applied to the activations) or from the record
  trtllm-build makes of the stored float weight (W4A16 / W8A16, converters/trtllm.py weight_only_record).

No projection weight is dequantized to a float matrix: the kernels dequantize tile by tile in registers.
With ``TRITON_INTERPRET=1`` set before triton is imported the same code runs on CPU tensors through
Triton's interpreter (slow; CI runs it on tiny models), and the runtime's name says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gemport.errors import UnsupportedError
from validation.runtimes import KERNELS
from validation.runtimes.trtllm_layout import TrtllmLayoutRuntime

log = logging.getLogger(__name__)

FORMATS = ("hf", "trtllm")  # compressed-tensors folders are HF folders; TensorRT-LLM checkpoints
TRTLLM_ALGOS = ("W4A16_AWQ", "W4A16", "W8A16")


def check_supported(fmt: str, path: Path | None) -> None:
    """UnsupportedError unless the kernels can run here (a CUDA device, or the interpreter) and ``path`` is
    a quantized artifact they compute: a compressed-tensors pack-quantized folder or a TensorRT-LLM
    W4A16_AWQ / W4A16 / W8A16 checkpoint."""
    from quantizers import kernels

    try:
        kernels.check_available()
    except RuntimeError as exc:
        raise UnsupportedError(f"--device cuda: {exc}", path) from None
    if fmt not in FORMATS:
        raise UnsupportedError(
            f"--device cuda scores compressed-tensors folders and TensorRT-LLM W4A16_AWQ/W4A16/W8A16 checkpoints, "
            f"not {fmt}",
            path,
        )
    if path is not None:
        _quantization(fmt, path)


def _quantization(fmt: str, path: Path) -> str:
    """What the kernels will read: "compressed-tensors" or the TensorRT-LLM quant_algo; UnsupportedError for
    an artifact without quantized projections."""
    if fmt == "trtllm":
        from converters.trtllm import read_config

        cfg, _, _ = read_config(path)
        algo = (cfg.get("quantization") or {}).get("quant_algo")
        if algo not in TRTLLM_ALGOS:
            raise UnsupportedError(
                f"--device cuda: quant_algo {algo} has no kernel (W4A16_AWQ, W4A16, W8A16 have)", path / "config.json"
            )
        return algo
    from converters import compressed_tensors as ct
    from converters.hf import read_json

    quantization = read_json(path / "config.json").get("quantization_config")
    if quantization is None:
        raise UnsupportedError(
            "--device cuda: a float HF folder has no quantized projections for the kernels (validate it on the cpu)",
            path / "config.json",
        )
    ct.check_readable(quantization, path)
    return "compressed-tensors"


def kernel_runtime(path: Path, fmt: str):
    """The kernel runtime of ``path`` (format ``fmt``, one check_supported accepts)."""
    if _quantization(fmt, path) == "compressed-tensors":
        return CompressedTensorsKernelRuntime(path)
    return TrtllmKernelRuntime(path)


def where() -> str:
    """Where the kernels run, in words."""
    from quantizers import kernels

    if kernels.INTERPRET:
        return "on the CPU through Triton's interpreter (TRITON_INTERPRET=1), not a GPU"
    import torch

    return f"on CUDA ({torch.cuda.get_device_name()})"


class _Calls:
    """Which kernel paths ran, counted (the runtime's name says them after scoring)."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, path: str) -> None:
        self.counts[path] = self.counts.get(path, 0) + 1

    def said(self) -> str:
        if not self.counts:
            return "GEMM (16 rows and more) / GEMV (fewer)"
        return " and ".join(f"{p.upper()} x{n}" for p, n in sorted(self.counts.items()))


def _path(rows: int) -> str:
    from quantizers.kernels.dequant_matmul import GEMV_MAX_ROWS

    return "gemv" if rows < GEMV_MAX_ROWS else "gemm"


# ---------------------------------------------------------------------------------------------
# compressed-tensors: transformers' Gemma model, each quantized Linear a kernel call


def _packed_linear(packed, scales, zeros, bits: int, calls: _Calls):
    """A module ``y = x @ W.T`` over the stored compressed-tensors tensors of one Linear, by
    dequant_matmul.matmul (the buffers move with the model; nothing is unpacked)."""
    import torch

    from quantizers.kernels import dequant_matmul

    class PackedLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bits = bits
            self.register_buffer("packed", packed)
            self.register_buffer("scales", scales)
            self.register_buffer("zeros", zeros)

        def forward(self, x):
            flat = x.reshape(-1, x.shape[-1])
            calls.add(_path(flat.shape[0]))
            y = dequant_matmul.matmul(flat, self.packed, self.scales, self.zeros, self.bits)
            return y.reshape(*x.shape[:-1], y.shape[-1])

    return PackedLinear()


class CompressedTensorsKernelRuntime:
    """A compressed-tensors pack-quantized folder: transformers' model of its config.json (the config's dtype
    and the attention hf_transformers.attention_for gives it, as ``gemport validate`` loads HF folders),
    parameters left empty at construction (accelerate.init_empty_weights: no float projection is ever
    allocated), the stored dense tensors loaded into it and every quantized Linear replaced by a kernel
    call on its stored tensors."""

    def __init__(self, path: Path):
        import torch

        from converters import hf
        from quantizers.kernels import device
        from quantizers.rtn import PROJECTIONS
        from validation.runtimes.hf_transformers import attention_for, config_dtype

        ckpt = hf.read(path)  # every stored tensor checked: names, shapes, dtypes of the packed sets
        formats = {t.quant for t in ckpt.quantized().values()}  # one scheme per folder (compressed_tensors.py)
        if not formats:
            raise UnsupportedError("--device cuda: no projection of this folder is quantized", path)
        fmt = formats.pop()
        bits = fmt.bits
        dtype = config_dtype(path)
        attention = attention_for(dtype)  # as transformers' runtime loads the folder
        model = self._empty_model(path, getattr(torch, dtype), attention)
        stored = _stored_tensors(path)
        self.calls, kernels, floats = _Calls(), 0, []
        for i in range(ckpt.spec.num_layers):
            for proj in PROJECTIONS:
                module = f"model.layers.{i}.{proj}"
                if f"{module}.weight_packed" not in stored:
                    floats.append(module)  # left unquantized by its writer: its float weight loads below
                    continue
                parts = [stored.get(f"{module}.{s}") for s in ("weight_packed", "weight_scale", "weight_zero_point")]
                packed, scales, zeros = (t.load().contiguous() if t is not None else None for t in parts)
                parent, _, child = module.rpartition(".")
                model.get_submodule(parent).register_module(
                    child, _packed_linear(packed, scales, zeros, bits, self.calls)
                )
                kernels += 1
        _load_dense(model, ckpt, getattr(torch, dtype), path)
        self.model = model.eval().to(device())
        self.vocab_size = int(model.config.vocab_size)
        scheme = fmt.describe()
        self._text = (
            f"Triton W{bits}A16 kernels ({{calls}}) on the compressed-tensors layout: {scheme} in {kernels} "
            "projections"
            + (f", {len(floats)} stored in float as torch matmuls" if floats else "")
            + f"; transformers {_version('transformers')} Gemma model around them ({dtype}, "
            + f"{model.config._attn_implementation} attention) {where()}"
        )
        shown = ", ".join(floats[:3]) + (f" and {len(floats) - 3} more" if len(floats) > 3 else "")
        self.notes = [f"stored in float, run as torch matmuls, not kernels: {shown}"] if floats else []
        log.info("loaded %s: %s", path, self.name)

    kind = KERNELS

    @property
    def name(self) -> str:
        return self._text.format(calls=self.calls.said())

    @staticmethod
    def _empty_model(path: Path, dtype, attention: str | None):
        """transformers' model of the folder's config with its parameters on the meta device, with
        ``attention`` (an ``attn_implementation``; None: transformers' choice)."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from gemport.errors import CheckpointError

        hf_logging.disable_progress_bar()
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"transformers cannot read its config: {exc}", path) from None
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the kernels compute the quantized Linears, not compressed-tensors
        with init_empty_weights(include_buffers=False):  # buffers (rotary tables) computed as usual
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)

    def logprobs(self, tokens: list[int]):
        import torch

        with torch.inference_mode():
            ids = torch.tensor([tokens], dtype=torch.long, device=self.model.device)
            logits = self.model(input_ids=ids, use_cache=False).logits[0]
            return torch.log_softmax(logits.float(), dim=-1).cpu().numpy()

    def scored_logits(self, tokens: list[int], first: int, count: int):
        """float32 logits of positions first .. first + count - 1, the LM head on those only (as
        hf_transformers.TransformersRuntime.scored_logits)."""
        import torch

        with torch.inference_mode():
            ids = torch.tensor([tokens], dtype=torch.long, device=self.model.device)
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=len(tokens) - first).logits[0]
            return logits[:count].float().cpu().numpy()


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _stored_tensors(path: Path) -> dict:
    """Every tensor of the folder's safetensors files as stored (lazy, integers kept): the packed sets
    the kernels read. converters/hf.py has checked them when it read the folder."""
    from converters import hf

    return {t.name: t for file in hf._weight_files(path) for t in hf._read_header(file, integers=True)}


def _load_dense(model, ckpt, dtype, path: Path) -> None:
    """The checkpoint's dense tensors (embedding, norms, an untied LM head, float projections) into the
    model's empty parameters; CheckpointError naming the first parameter the folder does not hold."""
    import torch

    from gemport.errors import CheckpointError

    for name, param in list(model.named_parameters()):
        if not param.is_meta:
            continue
        t = ckpt.tensors.get(name)
        if t is None or t.quant is not None:
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            raise CheckpointError(f"tensor {name} is missing", path)
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(f"tensor {name} is {list(t.shape)}, the model needs {list(param.shape)}", path)
        parent, _, attr = name.rpartition(".")
        module = model.get_submodule(parent)
        module._parameters[attr] = torch.nn.Parameter(t.load().to(dtype), requires_grad=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"tensor {left[0]} is missing", path)


# ---------------------------------------------------------------------------------------------
# TensorRT-LLM: the layout runtime's forward pass, each projection a kernel call


class TrtllmKernelRuntime(TrtllmLayoutRuntime):
    """A TensorRT-LLM W4A16_AWQ / W4A16 / W8A16 checkpoint scored by the layout runtime's forward pass
    (trtllm_layout.py, float32) with every projection computed by trtllm_matmul from the int8 weight a
    checkpoint of tp 1 stores (rank parts joined by converters/trtllm.py's rules and packed back: for tp 1
    the stored bytes; for W4A16 / W8A16 the record trtllm-build makes of the stored float weight), its
    scales in the checkpoint dtype (as TensorRT-LLM casts them at load) and AWQ's pre-quant scale applied
    to the activations. The projections' activations are rounded to ``act_dtype`` (default the
    checkpoint's dtype: the 16-bit activations of TensorRT-LLM's weight-only GEMMs), their outputs
    returned as float32."""

    kind = KERNELS

    def __init__(self, path: Path, act_dtype: str | None = None):
        self.calls, self._act = _Calls(), act_dtype
        self._text = "Triton kernels ({calls}) on a TensorRT-LLM checkpoint"  # named in full once loaded
        super().__init__(path)
        self.act_dtype = act_dtype or self.cfg["dtype"]
        self.algo = self.cfg["quantization"]["quant_algo"]
        self._text = (
            f"Triton {self.algo} kernels ({{calls}}) on the TensorRT-LLM layout: {self._scheme} in "
            f"{self._kernels} projections, "
            f"{self.act_dtype} activations; the TensorRT-LLM layout runtime's forward pass around them "
            f"(plain torch, fp32; {self.cfg['dtype']} checkpoint) {where()}: not TensorRT-LLM"
        )

    @property
    def name(self) -> str:
        return self._text.format(calls=self.calls.said())

    @name.setter
    def name(self, value: str) -> None:  # the layout runtime's constructor names itself; this name replaces it
        pass

    def _weights(self, tensors: dict) -> dict:
        """The dense tensors as float32 (the layout runtime's way); each projection as the kernel's
        (int8 weight, scales, pre-quant scale or None, bits)."""
        import torch

        from quantizers.kernels import on_device
        from quantizers.kernels.trtllm_matmul import stored_weight

        dtype = getattr(torch, self.cfg["dtype"])
        dense = {n: t for n, t in tensors.items() if t.quant is None and not n.endswith(".prequant_scaling_factor")}
        weights = super()._weights(dense)
        self._kernels, self._scheme = 0, ""
        for name, t in tensors.items():
            if t.quant is None:
                continue
            record = t.load()
            bits = record.format.bits
            pre = tensors.get(name.removesuffix("weight") + "prequant_scaling_factor")
            kernel = (
                on_device(stored_weight(record.codes, bits)),
                on_device(record.scales.to(dtype)),  # ref: trtllm_layout._dequantized, TensorRT-LLM's cast at load
                on_device(pre.load().to(dtype)) if pre is not None else None,
                bits,
            )
            weights[name] = kernel
            self._kernels += 1
            group = record.format.group_size
            self._scheme = f"int{bits} {f'g{group}' if group else 'per-channel'} sym ({self.cfg['dtype']} scales)"
        return weights

    def _linear(self, x, name: str):
        import torch

        from quantizers.kernels import on_device
        from quantizers.kernels.trtllm_matmul import matmul

        weight = self.weights[name]
        if not isinstance(weight, tuple):  # a float projection: not written by gemport, but read alike
            return super()._linear(x, name)
        self.calls.add(_path(x.shape[0]))
        y = matmul(on_device(x.to(getattr(torch, self._act or self.cfg["dtype"]))), *weight)
        return y.to(device=x.device, dtype=torch.float32)
