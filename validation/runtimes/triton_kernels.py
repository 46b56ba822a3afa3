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
    """The kernel runtime of ``path``."""
    raise UnsupportedError("--device cuda: the kernel runtime is not built yet", path)
