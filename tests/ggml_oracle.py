"""libggml's own quantizer, called through ctypes: the oracle for quantizers/gguf_blocks.py.

libggml-base.so ships inside llama-cpp-python (llama_cpp/lib/); ``ggml_quantize_chunk`` lives there.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


class GgmlOracle:
    """``quantize`` has the signature of gemport's quantizers.gguf_blocks.quantize."""

    def __init__(self, lib_dir: Path):
        self.path = lib_dir / "libggml-base.so"
        self._lib = ctypes.CDLL(str(self.path))
        fn = self._lib.ggml_quantize_chunk
        # size_t ggml_quantize_chunk(enum ggml_type, const float *, void *, int64_t start, int64_t nrows,
        #                            int64_t n_per_row, const float * imatrix)
        fn.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        fn.restype = ctypes.c_size_t
        self._chunk = fn

    def quantize(self, x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n_per_row = x.shape
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        out = np.zeros((rows, n_per_row // block_size * type_size), np.uint8)
        qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        written = self._chunk(
            int(qtype),
            x.ctypes.data,
            out.ctypes.data,
            0,
            rows,
            n_per_row,
            None if qw is None else qw.ctypes.data,
        )
        assert written == out.nbytes, (written, out.nbytes)
        return out


def load_oracle() -> GgmlOracle:
    """Find libggml-base.so next to the importable llama_cpp package (raises ImportError if absent)."""
    import llama_cpp

    return GgmlOracle(Path(llama_cpp.__file__).resolve().parent / "lib")
