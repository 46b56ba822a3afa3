"""GemmaSpec: every architectural fact of a Gemma 1/2/3 text model, and HF config I/O.

Converters translate their own configs to and from this class; nothing else reads a
foreign config. HF configs are read in both the transformers 4.x style (``rope_theta``,
``rope_local_base_freq``, ``sliding_window_pattern``, ``rope_scaling``) and the 5.x style
(nested ``rope_parameters``, ``layer_types``); they are written in the 5.x style, or 4.x
on request.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from gemport.errors import InputError, UnsupportedError

FAMILIES = ("gemma", "gemma2", "gemma3")
FULL, SLIDING = "full_attention", "sliding_attention"

# HF model_type -> family; architectures written back for each family.
_MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
_ARCHITECTURES = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
_HF_MODEL_TYPE = {family: model_type for model_type, family in _MODEL_TYPES.items()}


@dataclass(frozen=True)
class RopeScaling:
    """Rope scaling of the global (full-attention) layers; Gemma 3 4B+ use linear x8."""

    rope_type: str = "linear"
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.rope_type != "linear":
            raise ValueError(f"rope scaling type {self.rope_type!r} is not supported (only 'linear')")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class GemmaSpec:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-6
    activation: str = "gelu_pytorch_tanh"
    max_position: int = 8192
    layer_types: tuple[str, ...] = ()  # one of FULL / SLIDING per layer
    sliding_window: int | None = None
    rope_theta: float = 10000.0  # global layers
    rope_local_theta: float | None = None  # sliding layers (Gemma 3); None = same as global
    rope_scaling: RopeScaling | None = None  # global layers only
    query_pre_attn_scalar: float | None = None  # None = head_dim (Gemma 1)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    tie_embeddings: bool = True
    bos_token_id: int = 2
    eos_token_id: int | tuple[int, ...] = 1
    pad_token_id: int = 0
    # Every Gemma scales embeddings by sqrt(hidden_size) rounded to the activation dtype.
    # ref: transformers GemmaModel.forward (normalizer = tensor(hidden**0.5, dtype=hidden.dtype))
    embed_scale_rule: str = field(default="sqrt_hidden_in_dtype")

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - {FULL, SLIDING}:
            raise ValueError(f"layer_types must hold {self.num_layers} of {FULL!r}/{SLIDING!r}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("sliding layers need a sliding_window")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # --- derived facts ---------------------------------------------------------
    @property
    def qk_norm(self) -> bool:
        return self.family == "gemma3"

    @property
    def post_norms(self) -> bool:
        """Gemma 2 and 3 have post-attention and post-feedforward norms."""
        return self.family in ("gemma2", "gemma3")

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def layer_rope_theta(self, layer: int) -> float:
        if self.layer_types[layer] == SLIDING and self.rope_local_theta is not None:
            return self.rope_local_theta
        return self.rope_theta

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> GemmaSpec:
        data = dict(data)
        if data.get("rope_scaling"):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    # --- HF config I/O ---------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict, path: str | Path | None = None) -> GemmaSpec:
        """Build a spec from a transformers config dict (4.x or 5.x style)."""
        model_type = cfg.get("model_type")
        if model_type == "gemma3" and isinstance(cfg.get("text_config"), dict):
            raise UnsupportedError("multimodal Gemma 3 (model_type 'gemma3') is not supported; only text models", path)
        if model_type not in _MODEL_TYPES:
            raise UnsupportedError(
                f"unsupported architecture model_type={model_type!r} (supported: {', '.join(_MODEL_TYPES)})", path
            )
        family = _MODEL_TYPES[model_type]
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if cfg.get(k) is None]
        if missing:
            raise InputError(f"config is missing required field(s): {', '.join(missing)}", path)
        n_layers = int(cfg["num_hidden_layers"])
        rope_theta, rope_local, scaling = _read_rope(cfg, family)
        try:
            return cls(
                family=family,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=n_layers,
                num_heads=int(cfg["num_attention_heads"]),
                num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
                head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                activation=cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
                max_position=int(cfg.get("max_position_embeddings", 8192)),
                layer_types=_read_layer_types(cfg, family, n_layers),
                sliding_window=cfg.get("sliding_window") if family != "gemma" else None,
                rope_theta=rope_theta,
                rope_local_theta=rope_local,
                rope_scaling=scaling,
                query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
                attn_softcap=cfg.get("attn_logit_softcapping"),
                final_softcap=cfg.get("final_logit_softcapping"),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                bos_token_id=int(cfg.get("bos_token_id", 2)),
                eos_token_id=cfg.get("eos_token_id", 1),
                pad_token_id=int(cfg.get("pad_token_id", 0) or 0),
            )
        except (ValueError, TypeError) as exc:
            raise InputError(f"invalid config: {exc}", path) from None

    def to_hf_config(self, style: str = "5") -> dict:
        """A config.json dict that transformers loads; ``style`` '5' (nested) or '4' (flat)."""
        cfg: dict = {
            "architectures": [_ARCHITECTURES[self.family]],
            "model_type": _HF_MODEL_TYPE[self.family],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_eps,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_bias": False,
            "attention_dropout": 0.0,
        }
        if self.family == "gemma":
            cfg["hidden_act"] = self.activation
        else:
            cfg["hidden_activation"] = self.activation
            cfg["sliding_window"] = self.sliding_window
            cfg["query_pre_attn_scalar"] = self.query_pre_attn_scalar or self.head_dim
            cfg["attn_logit_softcapping"] = self.attn_softcap
            cfg["final_logit_softcapping"] = self.final_softcap
        if style == "5":
            if self.family != "gemma":
                cfg["layer_types"] = list(self.layer_types)
            cfg["rope_parameters"] = self._rope_parameters()
        elif style == "4":
            cfg.update(self._rope_4x())
        else:
            raise ValueError(f"config style must be '4' or '5', got {style!r}")
        return cfg

    def _rope_parameters(self) -> dict:
        full = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            full = {
                "rope_type": self.rope_scaling.rope_type,
                "factor": self.rope_scaling.factor,
                "rope_theta": self.rope_theta,
            }
        if self.family != "gemma3":
            return full
        local = {"rope_type": "default", "rope_theta": self.rope_local_theta or self.rope_theta}
        return {FULL: full, SLIDING: local}

    def _rope_4x(self) -> dict:
        out: dict = {"rope_theta": self.rope_theta}
        if self.family == "gemma3":
            out["rope_local_base_freq"] = self.rope_local_theta or self.rope_theta
            out["sliding_window_pattern"] = _pattern_of(self.layer_types)
            out["rope_scaling"] = (
                {"rope_type": self.rope_scaling.rope_type, "factor": self.rope_scaling.factor}
                if self.rope_scaling
                else None
            )
        return out


def _pattern_of(layer_types: tuple[str, ...]) -> int:
    """The 4.x ``sliding_window_pattern`` that yields these layer types (every n-th is global)."""
    for n in range(1, len(layer_types) + 1):
        if tuple(FULL if (i + 1) % n == 0 else SLIDING for i in range(len(layer_types))) == layer_types:
            return n
    raise ValueError("layer types follow no sliding_window_pattern; write the config in 5.x style")


def _read_layer_types(cfg: dict, family: str, n_layers: int) -> tuple[str, ...]:
    if cfg.get("layer_types"):
        return tuple(cfg["layer_types"])
    if family == "gemma":
        return (FULL,) * n_layers
    if family == "gemma2":  # ref: transformers Gemma2Config: sliding on even layers
        return tuple(SLIDING if i % 2 == 0 else FULL for i in range(n_layers))
    pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers))


def _scaling_of(params: dict | None) -> RopeScaling | None:
    if not params or params.get("rope_type", params.get("type", "default")) == "default":
        return None
    return RopeScaling(params.get("rope_type", params.get("type")), float(params["factor"]))


def _read_rope(cfg: dict, family: str) -> tuple[float, float | None, RopeScaling | None]:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and FULL in params:  # 5.x, per layer type
        full, local = params[FULL], params.get(SLIDING, {})
        return float(full.get("rope_theta", 1e6)), float(local.get("rope_theta", 1e4)), _scaling_of(full)
    if isinstance(params, dict) and "rope_theta" in params:  # 5.x, one rope for all layers
        theta, scaling = float(params["rope_theta"]), _scaling_of(params)
    else:
        theta = float(cfg.get("rope_theta", 1e6 if family == "gemma3" else 1e4))
        scaling = _scaling_of(cfg.get("rope_scaling"))
    local = float(cfg.get("rope_local_base_freq", 1e4)) if family == "gemma3" else None
    return theta, local, scaling
