"""The parity runtime for GGUF artifacts: llama.cpp on the CPU, through llama-cpp-python's C API bindings.

Each window is evaluated as llama-perplexity evaluates a chunk (ref: llama.cpp
tools/perplexity/perplexity.cpp, perplexity()): the KV cache is cleared, the tokens go in as one
llama_decode batch at positions 0 .. n - 1 with logits requested for every position, and the
full-vocabulary logits are read back with llama_get_logits. Log-probabilities are computed here, in
float64.

Settings, and where they differ from llama-perplexity's defaults:

- KV cache f32 (llama.cpp's default is f16, which rounds every cached K and V) and flash attention
  off, so that a check of an f32/f16 GGUF measures the file, not the cache's rounding.
- No weight repacking (``use_extra_bufts = false``, what ``llama-cli --no-repack`` sets; ref:
  common/arg.cpp). With repacking on, a CPU with AMX routes quantized matmuls through
  ggml_backend_amx_mul_mat, which segfaults on the demo Gemma 3 Q4_K_M GGUF (seen on a Sapphire
  Rapids VM; ref: ggml-org/llama.cpp issue #20824, closed without a fix). The plain ggml-cpu kernels
  still quantize activations to the weight type's vec_dot_type (Q8_K for K-quants, Q8_0 for Q4_0/Q5_0/
  Q8_0; ref: ggml-cpu/ggml-cpu.c type_traits_cpu), so a quantized GGUF is scored with llama.cpp's own
  arithmetic.
- The low-level API rather than llama_cpp.Llama, because Llama builds its model parameters itself and
  offers no way to turn repacking off.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from gemport.errors import CheckpointError, UnsupportedError
from validation.runtimes import PARITY

log = logging.getLogger(__name__)

DEFAULT_N_CTX = 512  # the context made at load; a longer window re-creates it (see _ensure_context)
ROWS_PER_CHUNK_ELEMENTS = 1 << 24  # float64 work arrays of at most 128 MiB in _log_softmax

# --- llama.cpp's log, routed into Python logging ---------------------------------------------------
# Without a callback llama.cpp writes its whole load log to stderr; llama-cpp-python's own callback
# (llama_cpp/_logger.py) still prints with verbose=False, and its level table predates ggml's current
# enum, so it prints warnings (3) and hides errors (4). gemport promises one line on stderr for a bad
# file, so the callback is replaced: every line goes to this module's logger at DEBUG, and the last
# error lines are kept to say why a load failed. ref: llama.h llama_log_set; ggml.h enum ggml_log_level.
_GGML_LOG_LEVEL_ERROR, _GGML_LOG_LEVEL_CONT = 4, 5
_errors: deque[str] = deque(maxlen=8)
_pending: list[str] = []  # a line may arrive in pieces: a first piece, then GGML_LOG_LEVEL_CONT pieces
_pending_level = [0]
_callback: Any = None  # the ctypes callback object, kept alive here: llama.cpp holds only its address


def _on_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    if level != _GGML_LOG_LEVEL_CONT:
        _pending_level[0] = level
    _pending.append(text.decode("utf-8", errors="replace"))
    if not _pending[-1].endswith("\n"):
        return
    line = "".join(_pending).strip()
    _pending.clear()
    if line:
        log.debug("llama.cpp: %s", line)
        if _pending_level[0] == _GGML_LOG_LEVEL_ERROR:
            _errors.append(line)


def _why(default: str) -> str:
    """llama.cpp's own reason for the last failure, else ``default``.

    The first error line is the cause ("llama_model_load: error loading model: check_tensor_dims: tensor
    'blk.1.ffn_up.weight' not found"); later ones only say that loading failed. ref: llama.cpp
    src/llama.cpp llama_model_load.
    """
    if not _errors:
        return default
    return _errors[0].split("error loading model: ", 1)[-1]


def _library() -> Any:
    """The llama_cpp module, with llama.cpp's log routed to Python logging and the backend initialized."""
    global _callback
    try:
        import llama_cpp
    except ImportError:
        raise UnsupportedError(
            "validating GGUF needs llama-cpp-python (pip install llama-cpp-python==0.3.36)"
        ) from None
    if _callback is None:
        _callback = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax of [rows, vocab] logits, computed in float64 a chunk of rows at a time."""
    out = np.empty(logits.shape, dtype=np.float32)
    step = max(1, ROWS_PER_CHUNK_ELEMENTS // max(1, logits.shape[1]))
    for i in range(0, logits.shape[0], step):
        x = logits[i : i + step].astype(np.float64)
        x -= x.max(axis=1, keepdims=True)
        x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
        out[i : i + step] = x
    return out


class LlamaCppRuntime:
    """A GGUF loaded by llama.cpp (CPU, f32 KV cache, no repacking), scoring one window of tokens at a time."""

    kind = PARITY

    def __init__(self, path: Path, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None):
        self.lib = _library()
        self.path = Path(path)
        self.n_threads = n_threads or os.cpu_count() or 1
        self.name = f"llama.cpp (llama-cpp-python {self.lib.__version__}, CPU, f32 KV cache)"
        self._model = self._ctx = self._batch = None
        self.n_ctx = 0
        if not self.path.is_file():
            raise CheckpointError("llama.cpp cannot load it: not a file", self.path)
        log.info("loading %s with llama.cpp", self.path)
        params = self.lib.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_extra_bufts = False  # no repacking: see the module docstring (AMX segfault)
        _errors.clear()
        self._model = self.lib.llama_model_load_from_file(str(self.path).encode("utf-8"), params)
        if not self._model:
            raise CheckpointError(f"llama.cpp cannot load it: {_why('llama_model_load_from_file failed')}", self.path)
        self._vocab = self.lib.llama_model_get_vocab(self._model)
        self.vocab_size = int(self.lib.llama_vocab_n_tokens(self._vocab))
        self._ensure_context(n_ctx)

    def _ensure_context(self, n_tokens: int) -> None:
        """A context (and batch) of at least ``n_tokens`` cells, evaluated as one micro-batch."""
        if n_tokens <= self.n_ctx:
            return
        self._free_context()
        lib = self.lib
        params = lib.llama_context_default_params()
        # n_batch = n_ubatch = n_ctx: a window is a single llama_decode of a single micro-batch
        params.n_ctx = params.n_batch = params.n_ubatch = n_tokens
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self.n_threads
        params.type_k = params.type_v = lib.GGML_TYPE_F32
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        _errors.clear()
        self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            reason = _why(f"cannot make a context of {n_tokens} tokens")
            raise CheckpointError(f"llama.cpp cannot run it: {reason}", self.path)
        self._batch = lib.llama_batch_init(n_tokens, 0, 1)
        self.n_ctx = n_tokens

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own token ids of ``text``, BOS first (as llama-perplexity tokenizes: add_special on,
        special-token text not parsed). validate() checks them against the reference tokenizer's."""
        data = text.encode("utf-8")
        size = len(data) + 2
        for _ in range(2):  # a negative result is the size needed (ref: llama.h llama_tokenize)
            out = (self.lib.llama_token * size)()
            n = self.lib.llama_tokenize(self._vocab, data, len(data), out, size, True, False)
            if n >= 0:
                return list(out[:n])
            size = -n
        raise CheckpointError("llama.cpp could not tokenize the evaluation text", self.path)

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        """float32 log-softmax [len(tokens), vocab] of one window; row i predicts token i + 1."""
        return _log_softmax(self._decode(tokens, 0, len(tokens)))

    def scored_logits(self, tokens: list[int], first: int, count: int) -> np.ndarray:
        """float32 logits [count, vocab] of positions first .. first + count - 1 of one window, the only
        outputs llama.cpp is asked for (as llama-perplexity does; ref: tools/perplexity/perplexity.cpp,
        perplexity(): ``batch.logits[idx] = batch.pos[idx] >= first``): the LM head runs on those rows only.
        A view of the context's buffer, valid until the next call (validate scores it before that): a copy
        would be 4 bytes x vocab per row more memory for nothing."""
        return self._decode(tokens, first, count)

    def _decode(self, tokens: list[int], first: int, count: int) -> np.ndarray:
        """One window through llama_decode; the logits of positions first .. first + count - 1, a view of
        the context's own float32 buffer."""
        n, lib = len(tokens), self.lib
        self._ensure_context(n)
        # A fresh window: no cached K/V (ref: perplexity.cpp, llama_memory_clear before each chunk).
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        batch = self._batch
        batch.n_tokens = n
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
            batch.logits[i] = first <= i < first + count
            batch.seq_id[i][0] = 0
        _errors.clear()
        status = lib.llama_decode(self._ctx, batch)
        if status != 0:  # ref: llama.h llama_decode return values
            reason = _why(f"llama_decode returned {status}")
            raise CheckpointError(f"llama.cpp failed on a window of {n} tokens: {reason}", self.path)
        # The logits of the requested positions, in batch order: [count, n_vocab] float32 owned by the context.
        return np.ctypeslib.as_array(lib.llama_get_logits(self._ctx), shape=(count, self.vocab_size))

    def _free_context(self) -> None:
        if self._batch is not None:
            self.lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            self.lib.llama_free(self._ctx)
        self._ctx, self.n_ctx = None, 0

    def close(self) -> None:
        """Free the context and the model; the runtime is unusable afterwards."""
        self._free_context()
        if self._model:
            self.lib.llama_model_free(self._model)
        self._model = None

    def __del__(self) -> None:
        if getattr(self, "lib", None) is not None:
            self.close()
