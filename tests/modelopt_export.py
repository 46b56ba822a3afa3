"""Export a Hugging Face Gemma folder to a TensorRT-LLM checkpoint with NVIDIA ModelOpt (a test oracle).

Run with the ModelOpt venv (`make modelopt-venv`), never with gemport's own: this script imports only
torch, transformers, modelopt and safetensors, so the oracle shares no code with converters/trtllm.py.

    build/modelopt-venv/bin/python tests/modelopt_export.py HF_DIR OUT_DIR --dtype bf16 --tp 2
    build/modelopt-venv/bin/python tests/modelopt_export.py HF_DIR OUT_DIR --dtype bf16 --tp 1 \
        --awq --group-size 64 --calib-tokens 256

OUT_DIR gets what modelopt.torch.export.export_tensorrt_llm_checkpoint writes: config.json (written once,
by the last rank, so its "rank" is tp - 1), rank{r}.safetensors per tensor-parallel rank, and, unquantized
only, quant_cfg.json. The model is loaded on the CPU in --dtype; ModelOpt exports fp32 as float16 (it warns
"dtype torch.float32 not fully compatible ..."; ref: model_config_export.py torch_to_tensorrt_llm_checkpoint).
ModelOpt's TensorRT-LLM export knows decoder_type "gemma" (Gemma 1) only: for Gemma 2/3 (--decoder-type
gemma2/gemma3) it raises NotImplementedError "Cannot export tensorrt_llm checkpoint for model gemma2:
Gemma2ForCausalLM. It's not supported by TensorRT-LLM yet. ..." (ref: tensorrt_llm_utils.py
convert_to_tensorrt_llm_config); as "gemma" they fail with KeyError 'parallel_attn_mlp_res'. A refused
export leaves no OUT_DIR behind (when this script created it).

With --awq: mtq.quantize(model, INT4_AWQ_CFG with block_sizes[-1] = --group-size, forward_loop) first,
where forward_loop runs deterministic random token windows: a torch.Generator seeded with --seed
(default 0) draws token ids uniform in [3, vocab_size) (skipping pad/eos/bos); --calib-tokens tokens in
all (default 256), in windows of at most --calib-window (64), batch 1. Then the export, then
OUT_DIR/fake_quant.safetensors with, per quantized linear, keyed by its HF module name (e.g.
model.layers.0.self_attn.q_proj):

    {name}.fake_weight      module.weight_quantizer(module.weight): the fake-quantized weight ModelOpt's
                            own QuantLinear forward uses, [out, in], model dtype
    {name}.pre_quant_scale  module.input_quantizer.pre_quant_scale, [in], model dtype; the forward is
                            y = (x * pre_quant_scale) @ fake_weight.T
    {name}.weight           W', the module's unquantized weight as exported, [out, in], model dtype
    {name}.amax             the weight quantizer's amax, [out, in/group], model dtype

(metadata: seed, calib_tokens, calib_windows, group_size). They are taken AFTER the export on purpose:
the export mutates the q/k/v modules it fuses into qkv: each gets the MEAN of the three pre_quant_scales,
its weight is rescaled by own_pqs / mean_pqs and its amax recalibrated (ref:
modelopt/torch/export/quant_utils.py preprocess_linear_fusion, called from layer_utils.py build_qkv).
gate_proj/up_proj keep their own pre_quant_scales (build_mlp_config resmooths them only when merging
gate and fc, or for FP8/NVFP4).

Exported AWQ tensors (ModelOpt 0.37.0; each fact checked numerically on the tiny models), per layer i:
transformer.layers.{i}.attention.qkv / attention.dense / mlp.fc / mlp.gate / mlp.proj, each with
.weight, .weights_scaling_factor, .prequant_scaling_factor. mlp.fc is gate_proj (the activated branch),
mlp.gate is up_proj, mlp.proj is down_proj, attention.dense is o_proj (ref: layer_utils.py
build_mlp_config). lm_head is not quantized (INT4_AWQ_CFG disables "*lm_head*").

* weight: int8 (packed uint8 bytes viewed as int8), [out/2, in], NOT transposed. Two consecutive OUTPUT
  rows share a byte: byte[k, j] = (q[2k, j] & 0xF) | ((q[2k+1, j] & 0xF) << 4), i.e. low nibble = even
  row, high nibble = odd row, nibbles two's complement (ref: quant_utils.py pack_int4_in_uint8;
  model_config_utils.py pack_linear_weights views it as int8). Codes:
  q = clamp(round(W'.float() / s[:, j // group]), -8, 7), exactly (0 mismatches).
* weights_scaling_factor: float32 whatever the export dtype, [out, in/group], s = amax.float() / 7
  exactly (ref: quant_utils.py get_scaling_factor; postprocess.py postprocess_tensors casts only
  weight/bias/prequant_scaling_factor to the export dtype).
* prequant_scaling_factor: export dtype, 1-D [in]: the pre_quant_scale (qkv: the q/k/v mean), NOT
  folded into weight or scales; the runtime multiplies the activations by it. 1/pre_quant_scale is
  already inside W' (awq_lite smooths the weight before calibrating its amax, ref:
  modelopt/torch/quantization/model_calib.py apply_pre_quant_scale_and_smooth).
* fake_weight = round(W'.float() * (7 / amax.float())) / (7 / amax.float()), cast to the model dtype
  (ref: modelopt/torch/quantization/tensor_quant.py _tensor_quant, the CPU path). So
  dequant = q * s equals fake_weight except (a) where W'/s lies within 2.4e-7 of k + 0.5, the two
  roundings (x / s vs x * (7/amax)) may pick neighbouring codes: 180 of 688,128 elements over all the
  tiny exports, exactly one step s apart; (b) elsewhere within 1.6e-7 relative (fp32; 0 after a bf16
  cast). A test should compare codes with round(W'/s) exactly and dequant with fake_weight to one step.
* Tensor parallel (ref: postprocess.py _split_model_config_for_tp): column-parallel qkv / fc / gate
  split weight (packed) and weights_scaling_factor on dim 0, prequant_scaling_factor replicated; qkv per
  rank is [q of that rank's heads; k; v], KV heads copied to every rank when tp > num_kv_heads
  (layer_utils.py dup_kv_weight). Row-parallel dense / proj split weight on dim 1 (in), scales on dim 1
  (in/group) and prequant_scaling_factor on dim 0; (in / tp) % group must be 0, else ModelOpt raises
  "Weight shape 64 of each TP tp=2 is not divisible for block size 64 for block quantization."
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tp", type=int, default=1, help="inference tensor parallelism")
    parser.add_argument("--awq", action="store_true", help="INT4 AWQ (W4A16) with ModelOpt first")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calib-tokens", type=int, default=256, help="total calibration tokens")
    parser.add_argument("--calib-window", type=int, default=64, help="tokens per window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--decoder-type",
        choices=["gemma", "gemma2", "gemma3"],
        default="gemma",
        help="ModelOpt decoder_type (only gemma exports; the others are for probing refusals)",
    )
    return parser.parse_args(argv)


def load_model(hf_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    model.eval()
    return model


def calibration_windows(vocab_size: int, tokens: int, window: int, seed: int) -> list[torch.Tensor]:
    """Deterministic random windows: ids uniform in [3, vocab) from a generator seeded with seed."""
    gen = torch.Generator().manual_seed(seed)
    windows = []
    left = tokens
    while left > 0:
        n = min(window, left)
        windows.append(torch.randint(3, vocab_size, (1, n), generator=gen))
        left -= n
    return windows


def awq_config(group_size: int) -> dict:
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    cfg["quant_cfg"]["*weight_quantizer"]["block_sizes"][-1] = group_size
    return cfg


def quantize_awq(model: torch.nn.Module, args: argparse.Namespace) -> int:
    import modelopt.torch.quantization as mtq

    windows = calibration_windows(model.config.vocab_size, args.calib_tokens, args.calib_window, args.seed)

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for ids in windows:
                m(input_ids=ids)

    mtq.quantize(model, awq_config(args.group_size), forward_loop)
    return len(windows)


def fake_quant_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Per quantized linear: the weight as ModelOpt's forward fake-quantizes it, and pre_quant_scale."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            wq = getattr(module, "weight_quantizer", None)
            if wq is None or not wq.is_enabled:
                continue
            # ref: modelopt/torch/quantization/nn/modules/quant_module.py QuantLinearConvBase
            # (forward applies weight_quantizer to self.weight)
            out[f"{name}.fake_weight"] = wq(module.weight).detach().contiguous().clone()
            out[f"{name}.weight"] = module.weight.detach().contiguous().clone()
            out[f"{name}.amax"] = wq.amax.detach().reshape(module.weight.shape[0], -1).clone()
            pqs = module.input_quantizer.pre_quant_scale
            if pqs is not None:
                out[f"{name}.pre_quant_scale"] = pqs.detach().reshape(-1).contiguous().clone()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from safetensors.torch import save_file

    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    model = load_model(args.hf_dir, dtype)
    n_windows = quantize_awq(model, args) if args.awq else 0
    created = not args.out_dir.exists()
    try:
        export_tensorrt_llm_checkpoint(
            model,
            decoder_type=args.decoder_type,
            dtype=dtype,
            export_dir=args.out_dir,
            inference_tensor_parallel=args.tp,
        )
    except BaseException:
        if created:  # ModelOpt makes OUT_DIR first; leave nothing behind when it refuses
            shutil.rmtree(args.out_dir, ignore_errors=True)
        raise
    if args.awq:
        meta = {
            "seed": str(args.seed),
            "calib_tokens": str(args.calib_tokens),
            "calib_windows": str(n_windows),
            "group_size": str(args.group_size),
            "taken": "after export_tensorrt_llm_checkpoint (q/k/v resmoothed to their mean pre_quant_scale)",
        }
        save_file(fake_quant_tensors(model), args.out_dir / "fake_quant.safetensors", metadata=meta)
    print(json.dumps({"out_dir": str(args.out_dir), "tp": args.tp, "awq": args.awq}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
