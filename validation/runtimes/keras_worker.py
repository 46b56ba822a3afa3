"""Worker of validation.runtimes.keras: keras-hub (Keras 3, JAX backend) scoring token windows, fp32, CPU.

Runs in keras-hub's own environment (``make keras-venv``, pins in requirements/keras-runtime.txt), never in
gemport's: it imports nothing from gemport, only the standard library, numpy, Keras and keras-hub, plus
the protocol helpers of gemma_worker.py (loaded by file path: ``-I`` keeps this folder off sys.path, so
that validation/runtimes/keras.py cannot shadow the ``keras`` package).

Protocol: as gemma_worker.py's. stdin line 1: ``{"preset": PATH}``; reply ``{"ok": true, "model": ...,
"versions": {...}, "vocab_size": V}`` or ``{"error": MESSAGE}``; then one ``{"tokens": [ids]}`` line per
window, answered by ``{"rows": n, "cols": V}`` and n * V little-endian float32 log-probabilities.

The preset is loaded as a user loads it: ``keras_hub.models.CausalLM.from_preset(PATH, dtype="float32",
preprocessor=None)`` when it has task.json, and run by ``predict_on_batch`` (the Gemma 3 preprocessor
needs TensorFlow, which this environment leaves out; ref: keras_hub/src/models/gemma3/gemma3_causal_lm_preprocessor.py
assert_tf_installed), else ``keras_hub.models.Backbone.from_preset`` and the tied embedding's reverse
projection; its tokenizer, when there is one, with ``keras_hub.models.Tokenizer.from_preset(PATH)``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path

import numpy as np


def _helpers():
    spec = importlib.util.spec_from_file_location("gemma_worker", Path(__file__).with_name("gemma_worker.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Scorer:
    def __init__(self, setup: dict):
        import keras_hub

        preset = setup["preset"]
        self.tokenizer, self.model = None, None
        if os.path.isfile(os.path.join(preset, "task.json")):
            self.model = keras_hub.models.CausalLM.from_preset(preset, dtype="float32", preprocessor=None)
            self.backbone = self.model.backbone
            self.description = f"{type(self.model).__name__}.from_preset"
        else:
            self.backbone = keras_hub.models.Backbone.from_preset(preset, dtype="float32")
            self.description = f"{type(self.backbone).__name__}.from_preset"
        if os.path.isfile(os.path.join(preset, "tokenizer.json")):
            self.tokenizer = keras_hub.models.Tokenizer.from_preset(preset)
            self.description += f", {type(self.tokenizer).__name__}"
        self.vocab = int(self.backbone.vocabulary_size)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """The CausalLM's logits, through Keras's compiled predict step (``predict_on_batch``; XLA on the
        JAX backend, as users run inference); a backbone preset's hidden states then the tied head with
        its final soft cap (ref: keras_hub/src/models/gemma/gemma_causal_lm.py __init__:
        token_embedding(x, reverse=True)). An explicit all-ones padding mask: id 0 inside a window is a
        token."""
        ids = np.asarray([tokens], dtype=np.int32)
        inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
        if self.model is not None:
            return np.asarray(self.model.predict_on_batch(inputs), dtype=np.float32)[0]
        hidden = self.backbone.predict_on_batch(inputs)
        return np.asarray(self.backbone.token_embedding(hidden, reverse=True), dtype=np.float32)[0]


def _versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("keras-hub", "keras", "jax")}


def main() -> int:
    helpers = _helpers()

    class Scored(Scorer):
        def logprobs(self, tokens: list[int]) -> np.ndarray:
            return helpers.log_softmax(self.logits(tokens))

    return helpers.serve(Scored, _versions)


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # skip JAX's teardown; nothing is left to write
