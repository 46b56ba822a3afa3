"""Tiny Gemma presets made by keras-hub itself, for tests/test_keras.py; runs in build/keras-venv.

``python -I tests/keras_presets.py OUT TOKENIZER_MODEL``: for each variant, a seeded random backbone
(GemmaBackbone with Gemma 1 MHA / MQA and Gemma 2 settings, Gemma3Backbone without a vision encoder),
wrapped in its CausalLM with the tokenizer and saved with keras-hub's own ``save_to_preset`` as
OUT/VARIANT, and keras-hub's log-softmax of one token window (``WINDOW``) as OUT/VARIANT.logprobs.npy;
OUT/window.json holds the tokens; OUT/gemma2-sharded is gemma2 saved in shards; OUT/gemma3-vision is a
multimodal backbone with gemma3's text weights.
Imports nothing from gemport.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

# Token ids of one window (BOS first, id 0 inside it: a token, not padding), 40 long: more than the
# sliding window (16), so sliding layers differ from full ones.
WINDOW = [2, *[(i * 37 + 11) % 509 + 3 for i in range(30)], 0, *[(i * 53 + 7) % 509 + 3 for i in range(8)]]

COMMON = dict(vocabulary_size=512, num_query_heads=4, hidden_dim=64, head_dim=16)
VARIANTS = {
    "gemma-mha": ("GemmaBackbone", dict(COMMON, num_layers=2, num_key_value_heads=4, intermediate_dim=256)),
    "gemma-mqa": ("GemmaBackbone", dict(COMMON, num_layers=2, num_key_value_heads=1, intermediate_dim=256)),
    "gemma2": (
        "GemmaBackbone",
        dict(
            COMMON,
            num_layers=4,
            num_key_value_heads=2,
            intermediate_dim=256,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            final_logit_soft_cap=30.0,
            attention_logit_soft_cap=50.0,
            use_sliding_window_attention=True,
            sliding_window_size=16,
        ),
    ),
    "gemma3": (
        "Gemma3Backbone",
        dict(
            COMMON,
            image_size=None,
            num_layers=6,
            num_key_value_heads=2,
            intermediate_dim=128,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            use_sliding_window_attention=True,
            sliding_window_size=16,
            global_rope_scaling_factor=2.0,
            vision_encoder=None,
        ),
    ),
}


def make(variant: str, out: Path, tokenizer_model: str, seed: int) -> None:
    import keras_hub

    cls, config = VARIANTS[variant]
    backbone = getattr(keras_hub.models, cls)(**config, dtype="float32")
    rng = np.random.default_rng(seed)
    for w in backbone.weights:  # norms start at zero: random values make (1 + w) mistakes visible
        w.assign(rng.standard_normal(w.shape).astype(np.float32) * (0.3 if len(w.shape) == 1 else 0.08))
    if cls == "Gemma3Backbone":
        tokenizer = keras_hub.models.Gemma3Tokenizer(proto=tokenizer_model, has_vision_tokens=False)
        model = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)  # its preprocessor needs TF
    else:
        tokenizer = keras_hub.models.GemmaTokenizer(proto=tokenizer_model)
        preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer=tokenizer)
        model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
    model.save_to_preset(str(out / variant))
    if variant == "gemma2":  # the same model in shards of at most 200 kB (model.weights.json + model_*.weights.h5)
        model.save_to_preset(str(out / "gemma2-sharded"), max_shard_size=0.0002)
    if cls == "Gemma3Backbone":
        tokenizer.save_to_preset(str(out / variant))
    ids = np.asarray([WINDOW], dtype=np.int32)
    # predict_on_batch, as the keras runtime scores (a preprocessor attached would tokenize the inputs)
    scorer = type(model)(backbone=backbone, preprocessor=None)
    logits = np.asarray(scorer.predict_on_batch({"token_ids": ids, "padding_mask": np.ones_like(ids)}), np.float64)[0]
    logits -= logits.max(axis=1, keepdims=True)
    logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
    np.save(out / f"{variant}.logprobs.npy", logits)  # float64: float32 rounding alone reads as KLD 1e-8


def make_multimodal(out: Path) -> None:
    """OUT/gemma3-vision: a backbone preset of Gemma3Backbone with a (tiny) vision encoder, whose text
    weights are those of OUT/gemma3."""
    import keras_hub
    from keras_hub.src.models.gemma3.gemma3_vision_encoder import Gemma3VisionEncoder

    text = keras_hub.models.Backbone.from_preset(str(out / "gemma3"))
    encoder = Gemma3VisionEncoder(
        image_size=28, patch_size=14, num_heads=2, hidden_dim=16, num_layers=1, intermediate_dim=32, output_dim=64
    )
    config = dict(VARIANTS["gemma3"][1], image_size=28, vision_encoder=encoder)
    backbone = keras_hub.models.Gemma3Backbone(**config, dtype="float32")
    names = ["token_embedding", "final_normalization", *(f"decoder_block_{i}" for i in range(config["num_layers"]))]
    for name in names:
        backbone.get_layer(name).set_weights(text.get_layer(name).get_weights())
    backbone.save_to_preset(str(out / "gemma3-vision"))


def main() -> None:
    out, tokenizer_model = Path(sys.argv[1]), sys.argv[2]
    for seed, variant in enumerate(VARIANTS):
        make(variant, out, tokenizer_model, seed)
    make_multimodal(out)
    (out / "window.json").write_text(json.dumps(WINDOW))


if __name__ == "__main__":
    main()
