"""Triton kernels for int4/int8 weights.

- group_quant.py: group-wise int4/int8 quantize (the RTN records of quantizers/rtn.py, bit for bit) and
  the compressed-tensors int32 packing (compressed_tensors.compressors.pack_quantized.helpers
  .pack_to_int32, bit for bit);
- gguf_legacy.py: GGUF Q8_0 and Q4_0 blocks (quantizers/gguf_blocks.py without an importance matrix,
  byte for byte);
- dequant_matmul.py: W4A16/W8A16 matmul on compressed-tensors' packed records (GEMM and GEMV);
- trtllm_matmul.py: the same on TensorRT-LLM's stored W4A16_AWQ / W4A16 / W8A16 weights;
- gptq_block.py: GPTQ's column-block step (quantizers/gptq.py ``_quantize_block``, bit for bit).

Each kernel has its pure-torch/numpy reference beside it (named in its docstring) and runs either on a
CUDA device or, with ``TRITON_INTERPRET=1`` set before triton is imported, on CPU tensors through
Triton's interpreter: that is how CI proves the arithmetic without a GPU (tests/test_kernels.py).
compile.py compiles every kernel for sm_80 and sm_90 to cubins without a GPU.

Floating-point contract: kernels are launched with ``enable_fp_fusion=False`` (no a*b+c contracted into
an FMA, which would change roundings the references make separately), divide with ``div_rn`` (IEEE
round-to-nearest; Triton's ``/`` on float32 may be approximate on the GPU) and round half to even
with the 1.5 * 2**23 trick (exact in float32 for |v| < 2**22; every rounded value here is clamped to
at most 128 first). Inputs must be finite: gemport checks weights before it quantizes them.

Loop bounds are constexpr (a kernel is specialised per group size or K): Triton 3.6's interpreter
cannot iterate over a bound passed at run time under numpy 2 (it converts a 1-element array to int).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FP_OPTIONS = {"enable_fp_fusion": False}
# Read once, when the kernels are defined: triton.jit makes an interpreted function or a GPU one then.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device() -> str:
    """Where kernel tensors live: ``cpu`` under the interpreter, else ``cuda``."""
    return "cpu" if INTERPRET else "cuda"


def check_available() -> None:
    """RuntimeError unless the kernels can run here: triton importable, and a CUDA device or the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        raise RuntimeError("the Triton kernels need the triton package (pip install triton==3.6.0)") from None
    if INTERPRET:
        return
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: the Triton kernels run on a GPU, or on the CPU with TRITON_INTERPRET=1")


def on_device(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the kernels' device, contiguous."""
    return t.to(device()).contiguous()
