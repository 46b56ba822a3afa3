"""A layout runtime for TensorRT-LLM checkpoints: TensorRT-LLM's Gemma forward pass in plain torch on the CPU.

Not TensorRT-LLM: no engine is built and none of its code runs (it needs a GPU and NVIDIA's
wheels). This runtime reads the checkpoint folder the way TensorRT-LLM's Gemma model reads it,
config.json and the rank files only, and computes what that model computes, in float32:

- the ranks joined by TensorRT-LLM's sharding rules, weight-only quantized tensors dequantized by
  its rules (converters/trtllm.py, ``joined_tensors``);
- the embedding times ``sqrt(hidden_size)`` rounded to the checkpoint's dtype (ref:
  tensorrt_llm/models/gemma/model.py ``GemmaModel.forward``, the multiplier is a constant of the
  activation dtype);
- RMSNorm ``x / sqrt(mean(x^2) + norm_epsilon) * w`` with the stored ``w`` (already ``1 + w``);
- attention scores ``q.k / (sqrt(head_size) * q_scaling)``, ``q_scaling =
  sqrt(query_pre_attn_scalar / head_size)`` for Gemma 2 and 3, 1 for Gemma 1 (ref: model.py
  ``GemmaDecoderLayer``), Gemma 2's ``attn_logit_softcapping`` as ``tanh(s / c) * c``;
- Gemma 3's q/k norms with eps 1e-5 (TensorRT-LLM passes them no eps; transformers uses rms_norm_eps);
- GPT-NeoX rotary (rotate half) with ``rotary_base`` and linear ``rotary_scaling``; Gemma 3's
  sliding layers (layer i with ``(i + 1) % _sliding_window_pattern != 0``) use
  ``rope_local_base_freq`` with the same scaling (TensorRT-LLM builds the local table with it; ref:
  tensorrt_llm/layers/attention.py ``create_attention_const_params``); sliding layers see the last
  ``sliding_window`` keys (Gemma 2: every even layer, the windows build-engine.sh passes at run time);
- MLP ``proj(gelu_tanh(fc(x)) * gate(x))``; ``ln_f``, the LM head, ``final_logit_softcapping``.

``kind`` is "layout": a match proves the layout and the arithmetic, not TensorRT-LLM's kernels.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from validation.runtimes import LAYOUT

log = logging.getLogger(__name__)

# Gemma 3's q/k norms take the Attention layer's default eps, not norm_epsilon (ref: model.py
# GemmaDecoderLayer passes no eps to Attention; tensorrt_llm/layers/attention.py ``Attention(eps=1e-05)``).
QK_NORM_EPS = 1e-5


class TrtllmLayoutRuntime:
    kind = LAYOUT

    def __init__(self, path: Path):
        import torch

        from converters.trtllm import departures, joined_tensors, read_config, sliding_pattern

        self.cfg, spec, mapping = read_config(path)
        self.notes = [f"{d}: computed so here" for d in departures(spec.family, self.cfg.get("rotary_scaling"))]
        self.name = (
            f"TensorRT-LLM layout runtime (plain torch, fp32, CPU; {self.cfg['dtype']} checkpoint, "
            f"tp {mapping.tp_size} pp {mapping.pp_size}): not TensorRT-LLM"
        )
        log.info("loading %s with the %s", path, self.name)
        self.weights = self._weights(joined_tensors(path, spec, mapping, self.cfg))
        self.spec, self.vocab_size = spec, spec.vocab_size
        self.embed_scale = float(torch.tensor(math.sqrt(spec.hidden_size), dtype=getattr(torch, self.cfg["dtype"])))
        pattern = sliding_pattern(spec) if spec.family != "gemma" else 0
        self.sliding = [bool(pattern) and (i + 1) % pattern != 0 for i in range(spec.num_layers)]
        scalar = self.cfg.get("query_pre_attn_scalar") if spec.family != "gemma" else None
        q_scaling = math.sqrt(scalar / spec.head_dim) if scalar else 1.0
        self.score_scale = 1.0 / (math.sqrt(spec.head_dim) * q_scaling)

    def _weights(self, tensors: dict) -> dict:
        """Every tensor as float32, the quantized projections dequantized, a W4A16_AWQ pre-quant scale folded
        into its weight (``y = (x * s) @ W.T``)."""
        loaded: dict[int, object] = {}  # a shared LM head has the embedding's loader: loaded once
        weights = {}
        for name, t in tensors.items():
            if id(t.load) not in loaded:
                loaded[id(t.load)] = _dequantized(t, self.cfg["dtype"])
            weights[name] = loaded[id(t.load)]
        for name in [n for n in weights if n.endswith(".prequant_scaling_factor")]:
            weight = name.removesuffix("prequant_scaling_factor") + "weight"
            weights[weight] = weights[weight] * weights.pop(name)
        return weights

    def _linear(self, x, name: str):
        """``x @ W.T`` of the projection ``name`` (qkv, dense, fc, gate, proj)."""
        return x @ self.weights[name].T

    def _norm(self, x, w, eps: float | None = None):
        import torch

        eps = self.spec.rms_eps if eps is None else eps
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def _rope(self, n: int, layer: int):
        import torch

        spec, cfg = self.spec, self.cfg
        base, scaling = cfg["rotary_base"], cfg.get("rotary_scaling")
        if self.sliding[layer] and spec.family == "gemma3":
            base = cfg["rope_local_base_freq"]  # the scaling stays: the local table is made with it too
        d = spec.head_dim
        inv = 1.0 / (float(base) ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        pos = torch.arange(n, dtype=torch.float64) / (scaling["factor"] if scaling else 1.0)
        angles = torch.outer(pos, inv)
        angles = torch.cat([angles, angles], -1)
        return angles.cos().float(), angles.sin().float()

    @staticmethod
    def _rotate(x, cos, sin):
        import torch

        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def _attention(self, x, i: int):
        import torch

        spec, w, p = self.spec, self.weights, f"transformer.layers.{i}.attention."
        n, d, h, kv = x.shape[0], spec.head_dim, spec.num_heads, spec.num_kv_heads
        qkv = self._linear(x, p + "qkv.weight")
        q, k, v = qkv.split([h * d, kv * d, kv * d], -1)
        q, k, v = (t.reshape(n, -1, d).transpose(0, 1) for t in (q, k, v))
        if spec.qk_norm:
            q = self._norm(q, w[p + "q_layernorm.weight"], QK_NORM_EPS)
            k = self._norm(k, w[p + "k_layernorm.weight"], QK_NORM_EPS)
        cos, sin = self._rope(n, i)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        k, v = (t.repeat_interleave(h // kv, 0) for t in (k, v))
        scores = (q @ k.transpose(1, 2)) * self.score_scale
        cap = self.cfg.get("attn_logit_softcapping") if spec.family == "gemma2" else None
        if cap:
            scores = torch.tanh(scores / cap) * cap
        i_idx = torch.arange(n)[:, None]
        j_idx = torch.arange(n)[None, :]
        visible = j_idx <= i_idx
        if self.sliding[i]:
            visible &= (i_idx - j_idx) < spec.sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        out = torch.softmax(scores, -1) @ v
        return self._linear(out.transpose(0, 1).reshape(n, h * d), p + "dense.weight")

    def _mlp(self, x, i: int):
        import torch

        p = f"transformer.layers.{i}.mlp."
        fc, gate = self._linear(x, p + "fc.weight"), self._linear(x, p + "gate.weight")
        return self._linear(torch.nn.functional.gelu(fc, approximate="tanh") * gate, p + "proj.weight")

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return torch.log_softmax(self._logits(tokens, 0, len(tokens)), -1).numpy()

    def scored_logits(self, tokens: list[int], first: int, count: int) -> np.ndarray:
        """float32 logits [count, vocab] of positions first .. first + count - 1 (softcapped where the model
        caps): the LM head on those rows only, as TensorRT-LLM computes the logits of the positions it is
        asked for (gather_context_logits) and llama-perplexity of the second half."""
        import torch

        with torch.inference_mode():
            return self._logits(tokens, first, count).numpy()

    def _logits(self, tokens: list[int], first: int, count: int):
        import torch

        w, spec = self.weights, self.spec
        x = w["transformer.vocab_embedding.weight"][torch.tensor(tokens)] * self.embed_scale
        for i in range(spec.num_layers):
            p = f"transformer.layers.{i}."
            a = self._attention(self._norm(x, w[p + "input_layernorm.weight"]), i)
            if spec.post_norms:
                a = self._norm(a, w[p + "post_layernorm.weight"])
                x = x + a
                m = self._mlp(self._norm(x, w[p + "pre_feedforward_layernorm.weight"]), i)
                x = x + self._norm(m, w[p + "post_feedforward_layernorm.weight"])
            else:
                x = x + a
                x = x + self._mlp(self._norm(x, w[p + "post_layernorm.weight"]), i)
        logits = self._norm(x[first : first + count], w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T
        cap = self.cfg.get("final_logit_softcapping")
        return torch.tanh(logits / cap) * cap if cap else logits


def _dequantized(t, dtype: str):
    """A tensor as float32, a record dequantized with its scales in the checkpoint dtype, as TensorRT-LLM
    casts them when it loads a W4A16_AWQ checkpoint (ref: modeling_utils.py preprocess_perlayer_weights;
    ModelOpt stores them in float32)."""
    import dataclasses

    import torch

    if t.quant is None:
        return t.load().float()
    record = t.load()
    scales = record.scales.to(getattr(torch, dtype))
    return dataclasses.replace(
        record, scales=scales.float(), format=dataclasses.replace(record.format, scale_dtype="f32")
    ).dequantize("f32")
