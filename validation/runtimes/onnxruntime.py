"""The parity runtime for ONNX artifacts: an onnxruntime InferenceSession on the CPU.

It scores any decoder graph with the inputs and outputs onnxruntime-genai and optimum use
(``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value`` in,
``logits`` out), not only gemport's: a window runs as one prefill with an empty past.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from gemport.errors import CheckpointError
from validation.runtimes import PARITY

log = logging.getLogger(__name__)

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class OnnxRuntime:
    kind = PARITY

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        from converters.onnx import check_external_data, model_file

        file = model_file(path)
        check_external_data(file)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        log.info("loading %s with onnxruntime %s", file, ort.__version__)
        try:
            self.session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise CheckpointError(f"onnxruntime cannot load it: {str(exc).splitlines()[0]}", file) from None
        self.name, self.file = f"onnxruntime {ort.__version__} (CPU)", file
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        logits = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        if "input_ids" not in self.inputs or logits is None:
            raise CheckpointError("not a decoder graph: needs an input_ids input and a logits output", file)
        self.vocab_size = int(logits.shape[-1])
        self.decoder = _genai_decoder(file.parent)

    def feeds(self, tokens: list[int]) -> dict[str, np.ndarray]:
        """One batch row, no past: every past_key_values input is empty along its sequence axis. Symbolic
        head counts and sizes come from genai_config.json; a sliding-window cache input (onnxruntime-genai's
        builder: ``past_sliding_length``) gets a zero cache of the window, which the mask leaves unread."""
        n = len(tokens)
        feeds: dict[str, np.ndarray] = {"input_ids": np.asarray([tokens], np.int64)}
        for name, info in self.inputs.items():
            if name == "attention_mask":
                feeds[name] = np.ones((1, n), np.int64)
            elif name == "position_ids":
                feeds[name] = np.arange(n, dtype=np.int64)[None]
            elif name.startswith("past_key_values."):
                _, heads, length, head_dim = info.shape
                heads = heads if isinstance(heads, int) else self.decoder.get("num_key_value_heads")
                head_dim = head_dim if isinstance(head_dim, int) else self.decoder.get("head_size")
                window = (self.decoder.get("sliding_window") or {}).get("window_size", 0)
                past = window if length == "past_sliding_length" else 0
                if not isinstance(heads, int) or not isinstance(head_dim, int):
                    raise CheckpointError(f"input {name} has symbolic sizes and no genai_config.json states them")
                feeds[name] = np.zeros((1, heads, past, head_dim), _NUMPY[info.type])
            elif name != "input_ids":
                raise CheckpointError(f"unknown graph input {name!r}: not a decoder graph gemport can feed")
        return feeds

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        import torch

        return torch.log_softmax(torch.from_numpy(self._logits(tokens)), dim=-1).numpy()

    def scored_logits(self, tokens: list[int], first: int, count: int) -> np.ndarray:
        """float32 logits [count, vocab] of positions first .. first + count - 1: the graph computes every
        position's (its LM head is part of the artifact); the others are dropped unnormalised."""
        return self._logits(tokens)[first : first + count]

    def _logits(self, tokens: list[int]) -> np.ndarray:
        (logits,) = self.session.run(["logits"], self.feeds(tokens))
        if logits.ndim != 3 or logits.shape[:2] != (1, len(tokens)):
            shape = f"logits of shape {list(logits.shape)}, expected [1, {len(tokens)}, vocab]"
            raise CheckpointError(shape, self.file)
        return logits[0].astype(np.float32, copy=False)


def _genai_decoder(folder: Path) -> dict:
    """The ``model.decoder`` entry of onnxruntime-genai's genai_config.json beside the model, or {}."""
    import json

    config = folder / "genai_config.json"
    if not config.is_file():
        return {}
    try:
        return json.loads(config.read_text(encoding="utf-8"))["model"]["decoder"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"unreadable genai_config.json: {exc}", config) from None
