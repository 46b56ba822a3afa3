"""Will an fp16 artifact overflow? Activation peaks from a short float32 forward on calibration text.

Gemma 2 and 3 are known to overflow in fp16: their residual stream and the outputs of their extra
post-attention / post-feed-forward norms reach values beyond fp16's largest finite number, 65504,
and an fp16 runtime then computes inf and NaN (ref: huggingface/transformers#29338 and the Gemma 2
model cards, which ask for bf16 or fp32; onnxruntime-genai keeps the residual stream and the norms
of Gemma 2/3 in float32 for that reason, builders/gemma.py ``Gemma2Model.__init__``,
``layernorm_attrs["cast"]["use_fp32"] = True``).

Whether a given fp16 artifact overflows depends on which of its tensors the runtime holds in fp16.
Each writer that offers fp16 names those tensors as a set of *points* (below) and calls
``check_fp16``: the model runs in float32, one decoder layer at a time (quantizers.calibration,
transformers' own layers), over windows of the corpus calibration split (never the evaluation
split), and the largest |value| at every point is compared with 65504. Weights are checked as
they are loaded (``guard_weights``).

The peaks are those of the calibration text: a probe that stays below the limit is evidence, not a
proof, that other text does; ``MARGIN`` leaves room for that.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from gemport.checkpoint import Checkpoint, LazyTensor, RowLoader
from gemport.errors import UnsupportedError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FP16_MAX = 65504.0  # ref: IEEE 754 binary16, largest finite value (torch.finfo(torch.float16).max)
# A point within this factor of FP16_MAX on the calibration text is refused too: other text goes higher.
MARGIN = 2.0
ALLOW_FLAG = "--allow-fp16-overflow"
GLOBAL = -1  # the layer index of points outside the decoder layers

# Points, per decoder layer unless marked: what each names, for messages.
POINTS: dict[str, str] = {
    "embedding": "scaled embedding output",  # global
    "attn_norm": "input norm output",
    "q": "q_proj output",
    "k": "k_proj output",
    "v": "v_proj output",
    "q_norm": "q-norm output",
    "k_norm": "k-norm output",
    "attn_out": "attention output (o_proj input)",
    "o_proj": "o_proj output",
    "post_attn_norm": "post-attention norm output",
    "residual_mid": "residual stream after attention",
    "ffn_norm": "feed-forward norm output",
    "gate": "gate_proj output",
    "up": "up_proj output",
    "act": "gelu(gate) * up (down_proj input)",
    "down": "down_proj output",
    "post_ffn_norm": "post-feedforward norm output",
    "residual": "residual stream (layer output)",
    "final_norm": "final norm output (LM head input)",  # global
}
# Every point: a runtime computing in fp16 throughout (transformers with dtype float16).
ALL = frozenset(POINTS)
# Residual stream and the norms that write into it kept in float32 (onnxruntime-genai's Gemma 2/3 layout).
FP32_RESIDUAL = ALL - {"residual", "residual_mid", "post_attn_norm", "post_ffn_norm"}
# The inputs of matrix products with fp16 weights: llama.cpp's CPU backend converts the activations of
# an F16 mul_mat to fp16 (ref: ggml/src/ggml-cpu/ggml-cpu.c type_traits_cpu[GGML_TYPE_F16].vec_dot_type
# = GGML_TYPE_F16); everything else it computes in float32.
MATMUL_INPUTS = frozenset({"attn_norm", "attn_out", "ffn_norm", "act", "final_norm"})
NONE: frozenset[str] = frozenset()  # weights only (the runtime computes in float32 or bf16)

# transformers decoder-layer submodule -> (point of its input, point of its output), per family
# (ref: transformers models/gemma*/modeling_gemma*.py, Gemma*DecoderLayer.forward).
_HOOKS_COMMON = {
    "input_layernorm": (None, "attn_norm"),
    "self_attn.q_proj": (None, "q"),
    "self_attn.k_proj": (None, "k"),
    "self_attn.v_proj": (None, "v"),
    "self_attn.q_norm": (None, "q_norm"),
    "self_attn.k_norm": (None, "k_norm"),
    "self_attn.o_proj": ("attn_out", "o_proj"),
    "mlp.gate_proj": (None, "gate"),
    "mlp.up_proj": (None, "up"),
    "mlp.down_proj": ("act", "down"),
}
_HOOKS = {
    # Gemma 1: attention added to the residual, then post_attention_layernorm feeds the MLP.
    "gemma": _HOOKS_COMMON | {"post_attention_layernorm": ("residual_mid", "ffn_norm")},
    "gemma2": _HOOKS_COMMON
    | {
        "post_attention_layernorm": (None, "post_attn_norm"),
        "pre_feedforward_layernorm": ("residual_mid", "ffn_norm"),
        "post_feedforward_layernorm": (None, "post_ffn_norm"),
    },
}
_HOOKS["gemma3"] = _HOOKS["gemma2"]


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """``windows`` windows of ``n_ctx`` tokens from the calibration split of ``corpus``."""

    windows: int = 2
    n_ctx: int = 256
    corpus: str | None = None


Peaks = dict[tuple[int, str], float]  # (layer or GLOBAL, point) -> max |value|


def activation_peaks(ckpt: Checkpoint, config: ProbeConfig | None = None) -> Peaks:
    """Max |value| at every point of every layer, over the calibration windows, computed in float32."""

    from quantizers import calibration as cal

    config = config or ProbeConfig()
    ckpt = dataclasses.replace(ckpt, tensors={n: t.dequantized("f32") for n, t in ckpt.tensors.items()})
    cal_config = cal.CalibrationConfig(tokens=config.windows * config.n_ctx, n_ctx=config.n_ctx, corpus=config.corpus)
    ids = _probe_ids(ckpt, cal_config)
    peaks: Peaks = {}

    def record(layer: int, point: str, value: torch.Tensor) -> None:
        peak = float(value.detach().abs().max()) if value.numel() else 0.0
        if peak != peak:  # NaN in float32 already: report it as such, never as "fits"
            peak = float("inf")
        peaks[(layer, point)] = max(peaks.get((layer, point), 0.0), peak)

    final = []
    # quantized_outputs: each layer runs once, after it is yielded, so the hooks set here see it run.
    for item in cal.stream_layers(ckpt, cal_config, ids=ids, quantized_outputs=True, final=final.append):
        if item.index == 0:
            record(GLOBAL, "embedding", item.hidden)
        _hook(item.layer, ckpt.spec.family, lambda point, v, i=item.index: record(i, point, v))
    record(GLOBAL, "final_norm", cal.final_norm(ckpt, final[0]))
    return peaks


def _probe_ids(ckpt: Checkpoint, config) -> torch.Tensor:
    """Calibration token ids; without tokenizer files, seeded random ids (BOS first) stand in."""
    import torch

    from quantizers import calibration as cal

    if ckpt.tokenizer_files:
        return cal.calibration_ids(ckpt, config)
    log.info("%s: no tokenizer, the fp16 range probe runs on seeded random token ids", ckpt.source)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ckpt.spec.vocab_size, (config.n_windows, config.n_ctx), generator=generator)
    ids[:, 0] = ckpt.spec.bos_token_id if ckpt.spec.bos_token_id is not None else 0
    return ids


def _hook(layer, family: str, record: Callable[[str, torch.Tensor], None]) -> None:
    """Forward hooks recording the points of ``layer`` (dropped with the layer)."""
    modules = dict(layer.named_modules())
    layer.register_forward_hook(lambda _module, _args, output: record("residual", output))
    for name, (in_point, out_point) in _HOOKS[family].items():
        if name not in modules:  # q_norm / k_norm exist in Gemma 3 only
            continue

        def hook(_module, args, output, in_point=in_point, out_point=out_point):
            if in_point is not None:
                record(in_point, args[0])
            record(out_point, output)

        modules[name].register_forward_hook(hook)


def worst(peaks: Peaks, points: Iterable[str]) -> tuple[int, str, float] | None:
    """(layer, point, value) of the highest peak among ``points``, or None if there is none."""
    chosen = [(v, layer, p) for (layer, p), v in peaks.items() if p in set(points)]
    if not chosen:
        return None
    value, layer, point = max(chosen)
    return layer, point, value


def describe(layer: int, point: str) -> str:
    return POINTS[point] if layer == GLOBAL else f"layer {layer} {POINTS[point]}"


def check_fp16(
    ckpt: Checkpoint,
    points: frozenset[str],
    target: str,
    allow: bool = False,
    config: ProbeConfig | None = None,
    label: str = "--dtype f16",
) -> Peaks:
    """UnsupportedError (one line naming the source, the layer, the point and the value) when an
    activation among ``points`` that ``target`` holds in fp16 comes within ``MARGIN`` of 65504 on the
    calibration text; with ``allow`` a warning instead. Returns the peaks. ``label`` says where the
    fp16 comes from (the option, or the source's own dtype)."""
    if not points:
        return {}
    peaks = activation_peaks(ckpt, config)
    hit = worst(peaks, points)
    if hit is None:
        return peaks
    layer, point, value = hit
    log.info("fp16 range probe: highest fp16 activation of %s is %s, %.4g", target, describe(layer, point), value)
    if value * MARGIN <= FP16_MAX:
        return peaks
    message = (
        f"{label} ({target}): {describe(layer, point)} reaches {value:.3g} on calibration text, "
        f"{'beyond' if value > FP16_MAX else 'within a factor ' + str(MARGIN) + ' of'} fp16's 65504; "
        f"use --dtype bf16 or f32 (or {ALLOW_FLAG})"
    )
    if allow:
        log.warning("%s: %s", ckpt.source, message.replace(f" (or {ALLOW_FLAG})", "") + "; written anyway")
        return peaks
    raise UnsupportedError(message, ckpt.source or None)


def guard_weights(ckpt: Checkpoint, names: Iterable[str] | None = None) -> Checkpoint:
    """``ckpt`` whose float tensors (those in ``names``, default all) raise, when loaded, a
    CheckpointError naming the tensor if a value is beyond fp16's range (it would be stored as inf)."""
    chosen = set(ckpt.tensors) if names is None else set(names)
    return dataclasses.replace(
        ckpt,
        tensors={
            n: _guarded(t, ckpt.source) if n in chosen and t.quant is None else t for n, t in ckpt.tensors.items()
        },
    )


def _guarded(t: LazyTensor, source: str) -> LazyTensor:
    def check(data):
        import torch

        if data.is_floating_point() and data.numel():
            peak = float(data.abs().max().to(torch.float32))
            if peak > FP16_MAX and peak != float("inf"):
                raise UnsupportedError(
                    f"--dtype f16: tensor {t.name} holds |w| = {peak:.3g}, beyond fp16's 65504; use bf16 or f32",
                    source or None,
                )
        return data

    rows = t.load
    load = (
        RowLoader(lambda a, b: check(rows.rows(a, b)), rows.n) if isinstance(rows, RowLoader) else lambda: check(rows())
    )
    return dataclasses.replace(t, load=load, raw=None)


def checked_gguf_f16(ckpt: Checkpoint, allow: bool = False) -> tuple[Checkpoint, Background | None]:
    """A GGUF F16 file: llama.cpp keeps the residual stream and norms in float32 and rounds only
    the inputs of matrix products with F16 weights to fp16 (``MATMUL_INPUTS``); its norm weights
    stay F32 (ref: llama.cpp convert_hf_to_gguf.py, 1-D tensors kept in F32), so the 2-D weights
    are the fp16 ones. Returns the guarded checkpoint and the activation probe, started in the
    background: the writer works meanwhile and calls its ``join()`` before it commits the file.
    With ``allow`` no probe runs (None): the file is written whatever it finds, and a 7B's probe
    costs as much CPU as the conversion (llama.cpp's converter checks nothing either)."""
    guarded = guard_weights(ckpt, [n for n, t in ckpt.tensors.items() if len(t.shape) == 2])
    if allow:
        log.warning("%s: fp16 activations not checked (%s)", ckpt.source or "checkpoint", ALLOW_FLAG)
        return guarded, None
    return guarded, Background(lambda: check_fp16(ckpt, MATMUL_INPUTS, "gguf", allow))


class Background:
    """``fn()`` running in a daemon thread (torch and file reads release the GIL, so it overlaps a
    writer's work): ``check()`` raises its exception once it has failed, ``join()`` waits for it to
    end and raises its exception."""

    def __init__(self, fn: Callable[[], object]):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name="fp16-range-probe", daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001  (handed to the thread that joins)
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def join(self) -> None:
        self.thread.join()
        self.check()
