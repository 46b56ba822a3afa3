"""gemport.offgrid: the off-grid demo model, each quantized weight redrawn inside its own bin."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from gemport import offgrid
from gemport.errors import UnsupportedError

Q = gguf.GGMLQuantizationType
TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def random_blocks(qtype: Q, n: int, seed: int = 0) -> np.ndarray:
    """n random blocks of ``qtype``: random code bytes, finite f16 scales (as real files hold)."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):  # gguf-py quantizes these itself
        return gguf.quants.quantize(rng.standard_normal((n, block)).astype(np.float32), qtype).reshape(n, size)
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    scales = rng.uniform(1e-4, 1e-2, (n, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:  # ql, qh, int8 scales, then d
        raw[:, 208:210] = scales[:, :2]
    else:  # Q4_K/Q5_K: d, dmin, then 12 bytes of 6-bit scales and mins
        raw[:, 0:4] = scales
    raw[0] = 0  # an all-zero block: zero step
    return raw


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_grid_decodes_as_gguf_dequantizes(qtype):
    blocks = random_blocks(qtype, 64)
    step, offset, code = offgrid.grid(blocks, qtype)
    value = step * code.astype(np.float32) + offset
    assert np.array_equal(value.reshape(-1), gguf.quants.dequantize(blocks, qtype).reshape(-1))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_redraw_stays_in_each_bin_and_is_uniform(qtype):
    blocks = random_blocks(qtype, 512)
    step, offset, code = offgrid.grid(blocks, qtype)
    x = offgrid.redraw(blocks, qtype, np.random.default_rng(0))
    assert x.dtype == torch.bfloat16
    xf = x.float().numpy().reshape(step.shape)
    centre = step * code.astype(np.float32) + offset
    # Re-quantized with the block's own scales, every weight gets its original code back, except
    # where no bf16 value lies in the bin at all (the bf16 nearest the centre is outside it; the
    # random scales here make such narrow bins far from zero): those keep that nearest value.
    nearest = torch.from_numpy(centre).to(torch.bfloat16).float().numpy()
    nz = step != 0
    none_in_bin = ~offgrid.in_bin(nearest, step, offset, code)
    ok = np.rint((xf - offset) / np.where(nz, step, 1)).astype(np.int64) == code
    assert np.all(ok[nz & ~none_in_bin])
    assert np.array_equal(xf[none_in_bin], nearest[none_in_bin]) and none_in_bin.mean() < 0.05
    assert np.array_equal(xf[~nz & ~none_in_bin], centre[~nz & ~none_in_bin])  # a zero step: only the centre
    u = (xf[nz] - centre[nz]) / step[nz]
    # Uniform on [-1/2, 1/2]: mean 0, std 1/sqrt(12) = 0.2887; bf16 storage coarsens the draw a little.
    u = u[~none_in_bin[nz]]
    assert abs(u.mean()) < 0.01 and 0.26 < u.std() < 0.295, (u.mean(), u.std())
    assert np.mean(xf[nz] == centre[nz]) < 0.05  # off the grid, not on it


def test_redraw_is_reproducible():
    blocks = random_blocks(Q.Q4_K, 32)
    a = offgrid.redraw(blocks, Q.Q4_K, offgrid.tensor_rng("w"))
    b = offgrid.redraw(blocks, Q.Q4_K, offgrid.tensor_rng("w"))
    c = offgrid.redraw(blocks, Q.Q4_K, offgrid.tensor_rng("other"))
    assert torch.equal(a.view(torch.int16), b.view(torch.int16)) and not torch.equal(a, c)


def test_type_without_decoder_is_refused():
    with pytest.raises(UnsupportedError, match="Q2_K"):
        offgrid.grid(np.zeros((1, 84), np.uint8), Q.Q2_K)


@pytest.mark.realmodel
def test_every_redrawn_weight_keeps_its_code(offgrid_model, demo_model):
    """Over the whole off-grid model: each weight the GGUF stores quantized re-quantizes to its
    original code with its original block scales; F32 tensors (norms) equal the faithful model's."""
    from safetensors import safe_open

    from converters.gguf import canonical_name
    from gemport.demo import demo_gguf

    path = demo_gguf(demo_model.parent)
    reader = gguf.GGUFReader(path)
    checked = 0
    with (
        safe_open(offgrid_model / "model.safetensors", "pt") as ours,
        safe_open(demo_model / "model.safetensors", "pt") as faithful,
    ):
        for t in reader.tensors:
            name, _ = canonical_name(t.name, "gemma3", path)
            x = ours.get_tensor(name)
            assert x.dtype == torch.bfloat16
            if t.tensor_type == Q.F32:
                assert torch.equal(x, faithful.get_tensor(name)), name
                continue
            size = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
            rows = np.asarray(t.data).reshape(-1, size)
            for start in range(0, len(rows), 1 << 16):
                step, offset, code = offgrid.grid(rows[start : start + (1 << 16)], t.tensor_type)
                n = step.size
                xs = x.reshape(-1)[start * step.shape[1] : start * step.shape[1] + n].float().numpy()
                xs = xs.reshape(step.shape)
                nz = step != 0
                requant = np.rint((xs[nz].astype(np.float64) - offset[nz]) / step[nz])
                assert np.array_equal(requant.astype(np.int64), code[nz]), name
                assert np.array_equal(xs[~nz], offset[~nz]), name
                checked += n
    assert checked > 200_000_000  # Gemma 3 270M: ~268M parameters, all but the norms quantized


@pytest.mark.realmodel
def test_offgrid_model_loads_and_scores_near_the_faithful_one(offgrid_model, demo_model):
    from transformers import AutoModelForCausalLM

    from validation.validate import validate

    model, info = AutoModelForCausalLM.from_pretrained(offgrid_model, output_loading_info=True)
    assert not any(info.values()), info
    del model
    # One more round of the file's own quantization noise: measured on the default protocol
    # (16 windows) +12.1 % ppl, KLD 0.108 against the faithful model; the first 3 windows are
    # checked here. The issue hoped for 6 %; the README states the measured figure.
    report = validate(offgrid_model, demo_model, n_windows=3)
    m = report.metrics
    assert 0 < m.delta_ppl_pct < 15.0, m
    assert 0.05 < m.kld < 0.2, m  # a different model, not a copy, and not a broken one
