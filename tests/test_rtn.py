"""RTN quantizer: by-hand numbers, compressed-tensors' own math as the oracle, config validation."""

from __future__ import annotations

import pytest
import torch

from converters import hf
from gemport.errors import CheckpointError, UnsupportedError
from quantizers.record import QuantFormat, QuantizedTensor
from quantizers.rtn import RTNConfig, projection_names, quantize, quantize_weight

SYM8 = QuantFormat(8, None, True, "f32")


def test_int8_per_channel_by_hand():
    # Row 0: amax 2.55 -> scale 2.55 / 127.5 = 0.02; row 1: amax 1.0 -> scale 1 / 127.5.
    w = torch.tensor([[2.55, -1.0, 0.013, 0.0], [1.0, -0.62, 0.25, 0.0]])
    r = quantize_weight(w, SYM8)
    torch.testing.assert_close(r.scales, torch.tensor([[0.02], [1 / 127.5]]))
    # 2.55 / 0.02 = 127.5 -> 127 after the clamp to [-128, 127]; -1 / 0.02 = -50; 0.013 / 0.02 = 0.65 -> 1;
    # row 1: 1.0 * 127.5 -> 127 after the clamp, -0.62 * 127.5 = -79.05 -> -79, 0.25 * 127.5 = 31.875 -> 32.
    assert r.codes.tolist() == [[127, -50, 1, 0], [127, -79, 32, 0]]
    assert r.zero_points is None


def test_int4_group_sym_and_asym_by_hand():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, -0.3, -0.1, 0.2, 0.75]])
    sym = quantize_weight(w, QuantFormat(4, 4, True, "f32"))
    # group 0: amax 3 -> scale 3 / 7.5 = 0.4, codes 0, 2.5 -> 2 (even), 5, 7.5 -> 8 clamped to 7;
    # group 1: amax 0.75 -> scale 0.1, codes -3, -1, 2, 7.5 -> 7.
    torch.testing.assert_close(sym.scales, torch.tensor([[0.4, 0.1]]))
    assert sym.codes.tolist() == [[0, 2, 5, 7, -3, -1, 2, 7]]
    asym = quantize_weight(w, QuantFormat(4, 4, False, "f32"))
    # group 0: lo 0 (min clamped to 0), hi 3 -> scale 3 / 15 = 0.2, zp = -8 - 0 / 0.2 = -8,
    # codes w / 0.2 - 8 = -8, -3, 2, 7; group 1: lo -0.3, hi 0.75 -> scale 0.07,
    # zp = round(-8 + 0.3 / 0.07 = -3.714) = -4, codes round(-4.286 - 4) = -8, round(-1.43 - 4) = -5,
    # round(2.857 - 4) = -1, round(10.714 - 4) = 7.
    torch.testing.assert_close(asym.scales, torch.tensor([[0.2, 0.07]]))
    assert asym.zero_points.tolist() == [[-8, -4]]
    assert asym.codes.tolist() == [[-8, -3, 2, 7, -8, -5, -1, 7]]
    # asymmetric spends its 16 levels on [lo, hi]: a smaller error than symmetric on this row
    err_sym = (sym.dequantize() - w).abs().sum()
    err_asym = (asym.dequantize() - w).abs().sum()
    assert err_asym < err_sym


@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (4, 32, True), (4, 32, False), (4, 128, False)])
def test_reconstruction_within_half_a_step(bits, group, symmetric):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.rand(48, 1) + 0.3 * torch.rand(48, 1)
    r = quantize_weight(w, QuantFormat(bits, group, symmetric, "f32"))
    lo, hi = r.format.code_range()
    assert int(r.codes.min()) >= lo and int(r.codes.max()) <= hi
    step = r.scales.repeat_interleave(group or 256, dim=1)
    err = (r.dequantize() - w).abs()
    # half a step, plus float32 rounding of values up to 128 steps (~1e-5 of a step)
    assert bool((err <= step * (0.5 + 1e-4)).all()), float((err / step).max())


def test_zero_group_dequantizes_to_zero():
    w = torch.zeros(2, 64)
    w[1, 32:] = torch.linspace(-1, 1, 32)
    for symmetric in (True, False):
        r = quantize_weight(w, QuantFormat(4, 32, symmetric, "bf16"))
        assert torch.equal(r.dequantize()[0], torch.zeros(64)) and torch.equal(r.dequantize()[1, :32], torch.zeros(32))


@pytest.mark.parametrize("scale_dtype", ["f32", "bf16"])
@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (4, 32, True), (4, 64, False), (8, 128, False)])
def test_same_codes_scales_and_zero_points_as_compressed_tensors(bits, group, symmetric, scale_dtype):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    from gemport.checkpoint import torch_dtype

    torch.manual_seed(1)
    w = (torch.randn(64, 256) * 0.05 + 0.01).to(torch.bfloat16)
    args = QuantizationArgs(
        num_bits=bits,
        type="int",
        strategy="channel" if group is None else "group",
        group_size=group,
        symmetric=symmetric,
        scale_dtype=torch_dtype(scale_dtype),
    )
    x = w.float().reshape(64, -1, group or 256)
    scale, zp = calculate_qparams(x.amin(-1), x.amax(-1), args)
    codes = ct_quantize(w.float(), scale, zp if not symmetric else None, args, dtype=torch.int8)
    ours = quantize_weight(w, QuantFormat(bits, group, symmetric, scale_dtype))
    assert torch.equal(ours.scales.float(), scale.float())
    assert torch.equal(ours.codes, codes)
    if not symmetric:
        assert torch.equal(ours.zero_points, zp)


def test_record_rejects_inconsistent_parts():
    codes = torch.zeros(4, 64, dtype=torch.int8)
    fmt = QuantFormat(4, 32, False, "f32")
    with pytest.raises(CheckpointError, match="zero points are required"):
        QuantizedTensor(codes, torch.ones(4, 2), None, fmt)
    with pytest.raises(CheckpointError, match="scales are"):
        QuantizedTensor(codes, torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.int8), fmt)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"bits": 3}, "bits must be 4 or 8"),
        ({"group_size": 48}, "group_size must be"),
        ({"symmetric": "yes"}, "symmetric must be"),
        ({"scale_dtype": "f64"}, "scale_dtype must be"),
        ({"embedding_bits": 2}, "embedding_bits must be"),
    ],
)
def test_config_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        RTNConfig(**options)


def test_config_minus_one_means_per_channel():
    assert RTNConfig(bits=4, group_size=-1).group_size is None


def test_quantize_targets_projections_and_counts_the_rest(tiny_models):
    ckpt = hf.read(tiny_models["gemma3"])
    q = quantize(ckpt, RTNConfig(bits=4, group_size=32))
    names = projection_names(ckpt.spec.num_layers)
    assert set(q.quantized()) == set(names) and len(names) == 7 * ckpt.spec.num_layers
    manifest = q.extra["quantization"]
    assert manifest["quantized"] == len(names)
    assert sorted(manifest["kept"]) == sorted(set(ckpt.tensors) - set(names))
    assert "model.embed_tokens.weight" in manifest["kept"]
    record = q.tensors[names[0]].load()
    assert record.shape == ckpt.tensors[names[0]].shape and record.scales.dtype == torch.float32
    q8 = quantize(ckpt, RTNConfig(bits=8, embedding_bits=4))
    assert q8.tensors["model.embed_tokens.weight"].quant.bits == 4
    assert "model.embed_tokens.weight" not in q8.extra["quantization"]["kept"]


def test_group_size_must_divide_rows(tiny_models):
    ckpt = hf.read(tiny_models["gemma2"])  # hidden 64: groups of 128 do not fit
    with pytest.raises(UnsupportedError, match="group size 128 does not divide the row length 64"):
        quantize(ckpt, RTNConfig(bits=4, group_size=128))


def test_other_writers_refuse_records(tiny_models, tmp_path):
    q = quantize(hf.read(tiny_models["gemma3"]), RTNConfig(bits=8))
    from converters import gguf, jax

    for writer, dst in ((gguf, tmp_path / "m.gguf"), (jax, tmp_path / "jax")):
        with pytest.raises(UnsupportedError, match="quantized records not supported by this writer yet"):
            writer.write(q, dst)
        assert not dst.exists()


def test_full_range_puts_the_largest_magnitude_on_qmin():
    """ggml's Q4_0 rule (d = max / -8): the signed largest-magnitude value is exactly code -8."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    fmt = QuantFormat(4, 32, True, "f32")
    record = quantize_weight(w, fmt, full_range=True)
    groups = w.reshape(16, 2, 32)
    idx = groups.abs().argmax(-1, keepdim=True)
    assert (torch.gather(record.codes.reshape(16, 2, 32), -1, idx) == -8).all()
    assert torch.allclose(record.scales, torch.gather(groups, -1, idx)[..., 0] / -8)
    plain = quantize_weight(w, fmt)
    error = lambda r: float(((r.dequantize() - w) ** 2).mean())  # noqa: E731
    assert error(record) < 0.9 * error(plain)
    with pytest.raises(ValueError, match="symmetric"):
        RTNConfig(bits=4, group_size=32, symmetric=False, full_range=True)
