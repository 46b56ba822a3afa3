"""GemmaSpec: every architectural fact of a Gemma 1/2/3 text model, and HF config I/O.

Converters translate their own configs to and from this class; nothing else reads a
foreign config. HF configs are read in both the transformers 4.x style (``rope_theta``,
``rope_local_base_freq``, ``sliding_window_pattern``, ``rope_scaling``) and the 5.x style
(nested ``rope_parameters``, ``layer_types``); they are written in the 5.x style, or 4.x
on request.

The spec carries, per family, only what the reference implementation (transformers'
Gemma, Gemma2 and Gemma3 models) uses: a field a family's model ignores is dropped when a
spec is built (logged), so that no writer can apply it. Missing config keys take the
defaults of transformers' config classes; every value read is checked where it is read
(type, range, enum), and a bad one is one error naming config.json and the key.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gemport.errors import InputError, UnsupportedError

log = logging.getLogger(__name__)

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

# Activations, canonically the two GELUs. ref: transformers activations.py ACT2CLS: gelu_pytorch_tanh,
# gelu_python_tanh, gelu_new and gelu_fast are all 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)));
# gelu and gelu_python are the exact (erf) GELU.
TANH_GELU, EXACT_GELU = "gelu_pytorch_tanh", "gelu"
_ACTIVATIONS = {
    "gelu_pytorch_tanh": TANH_GELU,
    "gelu_python_tanh": TANH_GELU,
    "gelu_new": TANH_GELU,
    "gelu_fast": TANH_GELU,
    "gelu": EXACT_GELU,
    "gelu_python": EXACT_GELU,
}

# Sane bounds, checked before anything per layer or per token is built. The largest Gemma (3 27B)
# has 62 layers, 262208 embedding rows, hidden 5376, intermediate 21504, 32 heads of 128 and a
# 131072-token context; the bounds leave room for larger models and refuse absurd counts.
BOUNDS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_layers": 1024,
    "num_heads": 1024,
    "num_kv_heads": 1024,
    "head_dim": 4096,
    "max_position": 1 << 21,
}

# Rope scaling types read (ref: transformers modeling_rope_utils.py ROPE_INIT_FUNCTIONS and the
# _validate_*_rope_parameters keys); longrope (per-dimension factor lists), llama3 and proportional are
# refused. Values are the optional keys each type takes besides rope_type, factor and rope_theta.
ROPE_TYPES = {
    "linear": (),
    "dynamic": ("original_max_position_embeddings",),  # ref: dynamic_rope_update reads it
    "yarn": (
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
}


@dataclass(frozen=True)
class RopeScaling:
    """A rope scaling as transformers states it: ``rope_type``, ``factor`` and the type's other
    parameters as sorted (key, value) pairs. Which layers it applies to: ``GemmaSpec.layer_rope_scaling``."""

    rope_type: str = "linear"
    factor: float = 1.0
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope scaling type {self.rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
            )
        if not _is_number(self.factor) or not self.factor > 0:
            raise ValueError(f"rope scaling factor must be a number > 0, got {self.factor!r}")
        params = tuple(sorted((str(k), v) for k, v in (self.params or ())))
        for key, value in params:
            if key not in ROPE_TYPES[self.rope_type]:
                raise ValueError(f"rope scaling {self.rope_type!r} takes no parameter {key!r}")
            if not (isinstance(value, bool) if key == "truncate" else _is_number(value)):
                raise ValueError(f"rope scaling parameter {key} must be a number, got {value!r}")
        object.__setattr__(self, "params", params)

    def to_hf(self) -> dict:
        return {"rope_type": self.rope_type, "factor": self.factor, **dict(self.params)}


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
    activation: str = TANH_GELU  # TANH_GELU or EXACT_GELU (other names of either are mapped to them)
    max_position: int = 8192
    layer_types: tuple[str, ...] = ()  # one of FULL / SLIDING per layer
    sliding_window: int | None = None
    rope_theta: float = 10000.0  # global layers
    rope_local_theta: float | None = None  # sliding layers (Gemma 3); None = same as global
    # Gemma 3: the full-attention layers' rope; Gemma 1 and 2: every layer's (one rope).
    rope_scaling: RopeScaling | None = None
    query_pre_attn_scalar: float | None = None  # None = head_dim (Gemma 1)
    attn_softcap: float | None = None  # Gemma 2 only
    final_softcap: float | None = None  # Gemma 2 and 3
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
        for name, bound in BOUNDS.items():
            value = getattr(self, name)
            if not _is_int(value) or not 0 < value <= bound:
                raise ValueError(f"{name} must be an integer in 1..{bound}, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        for name in ("rms_eps", "rope_theta"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a number > 0, got {getattr(self, name)!r}")
        for name in ("rope_local_theta", "query_pre_attn_scalar", "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not value > 0):
                raise ValueError(f"{name} must be a number > 0 or None, got {value!r}")
        if not isinstance(self.activation, str) or self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {self.activation!r}")
        # ref: transformers GemmaConfig.__post_init__: a Gemma 1 "gelu" means the tanh approximation
        canonical = TANH_GELU if self.family == "gemma" else _ACTIVATIONS[self.activation]
        object.__setattr__(self, "activation", canonical)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"rope_scaling must be a RopeScaling, got {self.rope_scaling!r}")
        self._normalize_family()
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)
        if not isinstance(self.layer_types, (tuple, list)):
            raise ValueError(f"layer_types must be a list, got {type(self.layer_types).__name__}")
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - {FULL, SLIDING}:
            raise ValueError(f"layer_types must hold {self.num_layers} of {FULL!r}/{SLIDING!r}")
        window = self.sliding_window
        if window is not None and (not _is_int(window) or not 0 < window <= BOUNDS["max_position"]):
            raise ValueError(
                f"sliding_window must be an integer in 1..{BOUNDS['max_position']} or None, got {window!r}"
            )
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("sliding layers need a sliding_window")
        self._check_tokens()

    def _normalize_family(self) -> None:
        """Drop what the family's reference model does not use (ref: transformers GemmaAttention: scale
        head_dim ** -0.5, no softcaps, no sliding window, one rope; Gemma2Attention: one rope for every
        layer; Gemma3Attention: keeps attn_logit_softcapping but never passes it to attention, and
        Gemma3ForCausalLM applies final_logit_softcapping)."""
        if self.family == "gemma3":
            dropped = ("attn_softcap",)
        elif self.family == "gemma2":
            dropped = ()
        else:
            dropped = ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "sliding_window")
            if SLIDING in (self.layer_types or ()):
                log.warning("a Gemma 1 model has no sliding layers: layer_types dropped")
                object.__setattr__(self, "layer_types", ())
        for name in dropped:
            if getattr(self, name) is not None:
                log.warning(
                    "%s %s is not used by the %s model (transformers): dropped", name, getattr(self, name), self.family
                )
                object.__setattr__(self, name, None)
        if self.family != "gemma3" and self.rope_local_theta is not None:
            if self.rope_local_theta != self.rope_theta:
                raise ValueError(
                    f"a {self.family} model has one rope base; rope_local_theta {self.rope_local_theta} differs"
                )
            object.__setattr__(self, "rope_local_theta", None)

    def _check_tokens(self) -> None:
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        eos = self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = eos if name == "eos_token_id" else (getattr(self, name),)
            if not ids or not all(_is_int(i) and 0 <= i < self.vocab_size for i in ids):
                raise ValueError(f"{name} must be token ids in 0..{self.vocab_size - 1}, got {getattr(self, name)!r}")

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

    def layer_rope_scaling(self, layer: int) -> RopeScaling | None:
        """The rope scaling of one layer: Gemma 3 scales its full-attention layers only (rope_parameters
        per layer type), Gemma 1 and 2 every layer (ref: transformers Gemma2RotaryEmbedding, one rope)."""
        if self.family == "gemma3" and self.layer_types[layer] == SLIDING:
            return None
        return self.rope_scaling

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> GemmaSpec:
        """A spec from ``to_json``'s dict; ValueError when it is not one."""
        if not isinstance(data, dict):
            raise ValueError(f"a spec is a JSON object, got {type(data).__name__}")
        data = dict(data)
        try:
            if data.get("rope_scaling"):
                scaling = data["rope_scaling"]
                if not isinstance(scaling, dict):
                    raise ValueError(f"rope_scaling must be an object, got {scaling!r}")
                data["rope_scaling"] = RopeScaling(**scaling)
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ValueError(f"not a spec: {exc}") from None

    # --- HF config I/O ---------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict, path: str | Path | None = None) -> GemmaSpec:
        """Build a spec from a transformers config dict (4.x or 5.x style); every value checked."""
        if not isinstance(cfg, dict):
            raise InputError(f"config is a JSON {type(cfg).__name__}, not an object", path)
        model_type = cfg.get("model_type")
        if model_type == "gemma3" and isinstance(cfg.get("text_config"), dict):
            raise UnsupportedError("multimodal Gemma 3 (model_type 'gemma3') is not supported; only text models", path)
        if not isinstance(model_type, str) or model_type not in _MODEL_TYPES:
            raise UnsupportedError(
                f"unsupported architecture model_type={model_type!r} (supported: {', '.join(_MODEL_TYPES)})", path
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise InputError(f"config is missing required field(s): {', '.join(missing)}", path)
        return _HfConfigReader(cfg, _MODEL_TYPES[model_type], path).spec()

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
            scalar = self.query_pre_attn_scalar or self.head_dim
            cfg["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar  # an int field
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
            full = self.rope_scaling.to_hf() | {"rope_theta": self.rope_theta}
        if self.family != "gemma3":
            return full
        local = {"rope_type": "default", "rope_theta": self.rope_local_theta or self.rope_theta}
        return {FULL: full, SLIDING: local}

    def _rope_4x(self) -> dict:
        out: dict = {
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
        }
        if self.family == "gemma3":
            out["rope_local_base_freq"] = self.rope_local_theta or self.rope_theta
            out["sliding_window_pattern"] = _pattern_of(self.layer_types)
        return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pattern_of(layer_types: tuple[str, ...]) -> int:
    """The 4.x ``sliding_window_pattern`` that yields these layer types (every n-th is global)."""
    for n in range(1, len(layer_types) + 2):  # n = layers + 1: every layer sliding
        if tuple(FULL if (i + 1) % n == 0 else SLIDING for i in range(len(layer_types))) == layer_types:
            return n
    raise ValueError("layer types follow no sliding_window_pattern; write the config in 5.x style")


# --- reading config.json ---------------------------------------------------------------------

# Defaults of keys a config may leave out, per family: the transformers config classes' own
# (ref: transformers models/gemma/configuration_gemma.py GemmaConfig, gemma2/configuration_gemma2.py
# Gemma2Config, gemma3/configuration_gemma3.py Gemma3TextConfig, default_theta).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": {"num_key_value_heads": 16, "head_dim": 256, "max_position_embeddings": 8192, "rope_theta": 10000.0},
    "gemma2": {
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "rope_theta": 10000.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "gemma3": {
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 131072,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    },
}
# Keys a family's transformers model never reads: dropped with a warning when set. Gemma 3 keeps
# attn_logit_softcapping in its config but Gemma3Attention.forward never passes it to attention.
_IGNORED = {
    "gemma": (
        "hidden_activation",
        "query_pre_attn_scalar",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "sliding_window",
        "sliding_window_pattern",
        "layer_types",
        "rope_local_base_freq",
    ),
    "gemma2": ("hidden_act", "rope_local_base_freq", "sliding_window_pattern"),
    "gemma3": ("hidden_act", "attn_logit_softcapping"),
}
_ARCH_NAMES = {"gemma": "Gemma", "gemma2": "Gemma 2", "gemma3": "Gemma 3"}


class _HfConfigReader:
    """config.json values, each checked as it is read: InputError (bad value) or UnsupportedError
    (valid for transformers, not carried by gemport) naming the file and the key."""

    def __init__(self, cfg: dict, family: str, path: str | Path | None):
        self.cfg, self.family, self.path = cfg, family, path
        self.defaults = _DEFAULTS[family]

    def spec(self) -> GemmaSpec:
        self._drop_ignored()
        self._refuse_unsupported()
        heads = self.int("num_attention_heads", BOUNDS["num_heads"])
        kv = self.int("num_key_value_heads", BOUNDS["num_kv_heads"])
        if heads % kv:
            self.bad("num_key_value_heads", kv, f"must divide num_attention_heads ({heads})")
        n_layers = self.int("num_hidden_layers", BOUNDS["num_layers"])
        vocab = self.int("vocab_size", BOUNDS["vocab_size"])
        max_position = self.int("max_position_embeddings", BOUNDS["max_position"])
        rope_theta, rope_local, scaling = self._rope(max_position)
        sliding = self.family != "gemma"
        layer_types = self._layer_types(n_layers)
        facts = dict(
            family=self.family,
            vocab_size=vocab,
            hidden_size=self.int("hidden_size", BOUNDS["hidden_size"]),
            intermediate_size=self.int("intermediate_size", BOUNDS["intermediate_size"]),
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=self.int("head_dim", BOUNDS["head_dim"]),
            rms_eps=self.number("rms_norm_eps", 1e-6, below=1.0),
            activation=self._activation(),
            max_position=max_position,
            layer_types=layer_types,
            sliding_window=self._sliding_window(layer_types) if sliding else None,
            rope_theta=rope_theta,
            rope_local_theta=rope_local,
            rope_scaling=scaling,
            query_pre_attn_scalar=self._query_scalar() if sliding else None,
            attn_softcap=self.number("attn_logit_softcapping", nullable=True) if self.family == "gemma2" else None,
            final_softcap=self.number("final_logit_softcapping", nullable=True) if sliding else None,
            tie_embeddings=self.boolean("tie_word_embeddings", True),
            bos_token_id=self.token("bos_token_id", 2, vocab),
            eos_token_id=self._eos(vocab),
            pad_token_id=self.token("pad_token_id", 0, vocab, nullable=True),
        )
        try:
            return GemmaSpec(**facts)
        except ValueError as exc:  # a combination of valid values (each key was checked above)
            raise InputError(f"invalid config: {exc}", self.path) from None

    # --- errors and checked getters -------------------------------------------------------------
    def bad(self, key: str, value: object, why: str) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise InputError(f"{key} = {shown}: {why}", self.path)

    def unsupported(self, key: str, why: str) -> None:
        raise UnsupportedError(f"{key}: {why}", self.path)

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.cfg:
            return self.cfg[key]
        return self.defaults.get(key, default)

    def int(self, key: str, bound: int, default: int | None = None) -> int:
        value = self.get(key, default)
        if not _is_int(value) or not 0 < value <= bound:
            self.bad(key, value, f"must be an integer in 1..{bound}")
        return value

    def number(
        self,
        key: str,
        default: float | None = None,
        nullable: bool = False,
        below: float | None = None,
        where: dict | None = None,
        name: str | None = None,
    ) -> float | None:
        """A number > 0 (and < ``below``) from the config, or from ``where`` (a nested object named ``name``)."""
        value = self.get(key, default) if where is None else where.get(key, default)
        if value is None and nullable:
            return None
        if not _is_number(value) or not value > 0 or (below is not None and not value < below):
            why = "must be a number > 0" + (f" and < {below}" if below is not None else "")
            self.bad(name or key, value, why + (" or null" if nullable else ""))
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            self.bad(key, value, "must be true or false")
        return value

    def token(self, key: str, default: int, vocab: int, nullable: bool = False) -> int:
        value = self.get(key, default)
        if value is None and nullable:
            return default
        if not _is_int(value) or not 0 <= value < vocab:
            self.bad(key, value, f"must be a token id in 0..{vocab - 1}")
        return value

    # --- single facts ------------------------------------------------------------------------
    def _drop_ignored(self) -> None:
        for key in _IGNORED[self.family]:
            value = self.cfg.get(key)
            if value is None or (isinstance(value, str) and _ACTIVATIONS.get(value) == TANH_GELU):
                continue  # unset, or the tanh GELU every Gemma runs anyway
            where, arch = self.path or "config", _ARCH_NAMES[self.family]
            log.warning("%s: %s = %r is not used by transformers' %s model: dropped", where, key, value, arch)

    def _refuse_unsupported(self) -> None:
        """Switches transformers reads that change the model and gemport does not carry."""
        for key in ("attention_bias", "use_bidirectional_attention"):
            value = self.cfg.get(key)
            if value is None or value is False:
                continue
            if not isinstance(value, bool):
                self.bad(key, value, "must be true or false")
            # ref: transformers GemmaAttention (q/k/v/o biases), Gemma3Attention.is_causal
            self.unsupported(
                key,
                "true is not supported ("
                + ("attention biases" if key == "attention_bias" else "bidirectional attention")
                + ")",
            )

    def _activation(self) -> str:
        key = "hidden_act" if self.family == "gemma" else "hidden_activation"
        value = self.get(key)
        if value is None:
            value = TANH_GELU  # ref: GemmaConfig hidden_act, Gemma2Config/Gemma3TextConfig hidden_activation defaults
        if not isinstance(value, str):
            self.bad(key, value, "must be a string")
        if value not in _ACTIVATIONS:
            self.unsupported(key, f"activation {value!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
        if self.family == "gemma":
            # ref: transformers GemmaConfig.__post_init__: a Gemma 1 "gelu" means the tanh approximation;
            # other names are taken as they are, and a Gemma 1 spec holds the tanh GELU only
            if value != "gelu" and _ACTIVATIONS[value] != TANH_GELU:
                self.unsupported(key, f"activation {value!r}: Gemma 1 with an exact GELU is not supported")
            return TANH_GELU
        return _ACTIVATIONS[value]

    def _query_scalar(self) -> int:
        """An integer, as transformers types it (ref: Gemma2Config/Gemma3TextConfig query_pre_attn_scalar: int);
        an integral float is taken as that integer."""
        value = self.get("query_pre_attn_scalar")
        if not _is_number(value) or not value > 0 or value != int(value) or value > BOUNDS["max_position"]:
            self.bad("query_pre_attn_scalar", value, "must be an integer > 0")
        return int(value)

    def _eos(self, vocab: int) -> int | tuple[int, ...]:
        value = self.get("eos_token_id", 1)
        if isinstance(value, list):
            if not value or len(value) > 1024 or not all(_is_int(v) and 0 <= v < vocab for v in value):
                self.bad("eos_token_id", value, f"must be a token id or a list of token ids in 0..{vocab - 1}")
            return tuple(value)
        return self.token("eos_token_id", 1, vocab)

    def _layer_types(self, n_layers: int) -> tuple[str, ...]:
        if self.family == "gemma":
            return (FULL,) * n_layers
        value = self.cfg.get("layer_types")
        if value is not None:
            if not isinstance(value, list) or len(value) != n_layers:
                self.bad("layer_types", value, f"must be a list of {n_layers} layer types (num_hidden_layers)")
            for i, t in enumerate(value):
                if t not in (FULL, SLIDING):
                    self.bad(f"layer_types[{i}]", t, f"must be {FULL!r} or {SLIDING!r}")
            return tuple(value)
        if self.family == "gemma2":  # ref: transformers Gemma2Config.__post_init__: sliding on even layers
            return tuple(SLIDING if i % 2 == 0 else FULL for i in range(n_layers))
        # ref: Gemma3TextConfig.__post_init__, sliding_window_pattern default 6 (the 4.x key, kept on the Hub)
        key = "sliding_window_pattern" if "sliding_window_pattern" in self.cfg else "_sliding_window_pattern"
        pattern = self.cfg.get(key)
        pattern = 6 if pattern is None else pattern
        if not _is_int(pattern) or pattern <= 0:
            self.bad(key, pattern, "must be an integer > 0")
        return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers))

    def _sliding_window(self, layer_types: tuple[str, ...]) -> int | None:
        value = self.get("sliding_window")
        if value is None and SLIDING not in layer_types:
            return None
        if not _is_int(value) or not 0 < value <= BOUNDS["max_position"]:
            self.bad(
                "sliding_window",
                value,
                f"must be an integer in 1..{BOUNDS['max_position']} (the model has sliding layers)",
            )
        return value

    # --- rope --------------------------------------------------------------------------------
    def _rope(self, max_position: int) -> tuple[float, float | None, RopeScaling | None]:
        """(global base, local base of Gemma 3, scaling) from rope_parameters (5.x) or rope_theta,
        rope_scaling and rope_local_base_freq (4.x); ref: transformers modeling_rope_utils.py
        standardize_rope_params and Gemma3TextConfig.convert_rope_params_to_dict."""
        params = self.cfg.get("rope_parameters")
        if params is not None and not isinstance(params, dict):
            self.bad("rope_parameters", params, "must be an object")
        params = params or {}
        if (
            "rope_scaling" in self.cfg
            and self.cfg["rope_scaling"] is not None
            and not isinstance(self.cfg["rope_scaling"], dict)
        ):
            self.bad("rope_scaling", self.cfg["rope_scaling"], "must be an object or null")
        old_scaling = self.cfg.get("rope_scaling") or None
        if self.family == "gemma3" and (FULL in params or SLIDING in params):
            full, local = self._rope_dict(params, FULL), self._rope_dict(params, SLIDING)
            theta = self.number(
                "rope_theta", self.get("rope_theta"), where=full, name=f"rope_parameters.{FULL}.rope_theta"
            )
            local_theta = self.number(
                "rope_theta",
                self.get("rope_local_base_freq"),
                where=local,
                name=f"rope_parameters.{SLIDING}.rope_theta",
            )
            if self._scaling(local, f"rope_parameters.{SLIDING}", max_position) is not None:
                self.unsupported(
                    f"rope_parameters.{SLIDING}.rope_type", "rope scaling of sliding layers is not supported"
                )
            scaling_src, where = (full | (old_scaling or {})), f"rope_parameters.{FULL}"
            return theta, local_theta, self._scaling(scaling_src, where, max_position)
        if params:  # one rope for all layers (5.x)
            theta = self.number("rope_theta", self.get("rope_theta"), where=params, name="rope_parameters.rope_theta")
            scaling = self._scaling(params | (old_scaling or {}), "rope_parameters", max_position)
        else:
            theta = self.number("rope_theta")
            scaling = self._scaling(old_scaling, "rope_scaling", max_position)
        local = self.number("rope_local_base_freq") if self.family == "gemma3" else None
        return theta, local, scaling

    def _rope_dict(self, params: dict, layer_type: str) -> dict:
        value = params.get(layer_type)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.bad(f"rope_parameters.{layer_type}", value, "must be an object")
        return value

    def _scaling(self, params: dict | None, where: str, max_position: int) -> RopeScaling | None:
        if not params:
            return None
        rope_type = params.get("rope_type", params.get("type", "default"))
        if not isinstance(rope_type, str):
            self.bad(f"{where}.rope_type", rope_type, "must be a string")
        if rope_type == "default":
            return None
        if rope_type not in ROPE_TYPES:
            self.unsupported(
                f"{where}.rope_type",
                f"rope type {rope_type!r} is not supported (supported: default, {', '.join(ROPE_TYPES)})",
            )
        if "factor" not in params:
            self.bad(f"{where}.factor", None, f"rope type {rope_type!r} needs a factor")
        factor = self.number("factor", where=params, name=f"{where}.factor")
        extra = {}
        for key, value in params.items():
            if key in ("rope_type", "type", "factor", "rope_theta"):
                continue
            if key not in ROPE_TYPES[rope_type]:
                log.warning(
                    "%s: %s.%s is not a parameter of rope type %r: ignored",
                    self.path or "config",
                    where,
                    key,
                    rope_type,
                )
                continue
            if value is None:
                continue
            if key == "truncate":
                if not isinstance(value, bool):
                    self.bad(f"{where}.{key}", value, "must be true or false")
            elif key == "original_max_position_embeddings":
                if not _is_int(value) or not 0 < value <= BOUNDS["max_position"]:
                    self.bad(f"{where}.{key}", value, f"must be an integer in 1..{BOUNDS['max_position']}")
            elif not _is_number(value) or (key != "attention_factor" and value <= 0) or value < 0:
                self.bad(f"{where}.{key}", value, "must be a number > 0")
            extra[key] = value
        if rope_type in ("yarn", "dynamic"):  # ref: standardize_rope_params: original_max_position_embeddings
            extra.setdefault("original_max_position_embeddings", max_position)
        return RopeScaling(rope_type, factor, tuple(extra.items()))
