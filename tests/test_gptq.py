"""GPTQ: exact reductions to RTN, lower output error than RTN, the layer loop and the CLI.

Tolerances: with a diagonal Hessian GPTQ has no error to carry between columns, so its codes
equal RTN's exactly; "lower output error" is asked by a margin (GPTQ's error on correlated
inputs is typically a third to a half of RTN's; the bound 0.8 leaves room for the seed).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from converters import hf
from gemport.cli import main
from quantizers import gptq, rtn
from quantizers.calibration import CalibrationConfig
from quantizers.record import QuantFormat
from validation.validate import validate

pytestmark = pytest.mark.usefixtures("one_thread")


FORMATS = [
    QuantFormat(4, 32, True, "f32"),
    QuantFormat(4, 64, False, "bf16"),
    QuantFormat(8, None, True, "f32"),
]


def _gptq(w, h, fmt, **options):
    config = gptq.GPTQConfig(bits=fmt.bits, group_size=fmt.group_size, symmetric=fmt.symmetric, **options)
    width = fmt.group_size or w.shape[1]
    levels, values, grids = gptq.gptq_weight(w, h, functools.partial(gptq.MinMaxGrid.fit, fmt=fmt), width, config)
    return gptq.record_from(levels, grids, fmt), values


def _correlated_inputs(n: int, tokens: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen) / n**0.5 + torch.eye(n)
    scale = torch.exp(torch.randn(n, generator=gen))  # some channels far louder than others
    return (torch.randn(tokens, n, generator=gen) @ mix) * scale


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("act_order", [True, False])
def test_diagonal_hessian_gives_rtn_codes(fmt, act_order):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 128, generator=gen)
    h = torch.diag(torch.rand(128, generator=gen) + 0.1)
    record, values = _gptq(w, h, fmt, act_order=act_order)
    want = rtn.quantize_weight(w, fmt)
    assert torch.equal(record.codes, want.codes) and torch.equal(record.scales, want.scales)
    assert (record.zero_points is None) == (want.zero_points is None)
    if want.zero_points is not None:
        assert torch.equal(record.zero_points, want.zero_points)
    assert torch.equal(values, record.dequantize("f32"))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("act_order", [True, False])
def test_output_error_below_rtn(fmt, act_order):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 128, generator=gen)
    x = _correlated_inputs(128, 2048, seed=2)
    h = 2 * x.T @ x / x.shape[0]
    record, values = _gptq(w, h, fmt, act_order=act_order)
    assert torch.equal(values, record.dequantize("f32"))  # the values GPTQ optimised are the record's

    def error(q):
        return float((x @ (w - q).T).square().mean())

    ours, baseline = error(record.dequantize("f32")), error(rtn.quantize_weight(w, fmt).dequantize("f32"))
    assert ours < 0.8 * baseline, (ours, baseline)


def test_lazy_blocks_do_not_change_the_result():
    """Lazy batch updates are a reordering of the same arithmetic (GPTQ paper, step 2)."""
    fmt = QuantFormat(4, 32, True, "f32")
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 256, generator=gen)
    x = _correlated_inputs(256, 1024, seed=4)
    h = 2 * x.T @ x / x.shape[0]
    for act_order in (True, False):
        one, _ = _gptq(w, h, fmt, act_order=act_order, block_size=1)
        lazy, _ = _gptq(w, h, fmt, act_order=act_order, block_size=128)
        # A float tie of the reordered sums may flip one code, and the error fed forward then changes
        # the rest of that row: most rows stay identical and the output error stays the same.
        same_rows = int((one.codes == lazy.codes).all(dim=1).sum())
        assert same_rows >= 14, same_rows
        errors = [float((x @ (w - r.dequantize("f32")).T).square().mean()) for r in (one, lazy)]
        assert abs(errors[0] - errors[1]) < 0.02 * errors[0], errors


def test_dead_columns_are_zero_and_cholesky_failure_retries(caplog):
    fmt = QuantFormat(4, 32, True, "f32")
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 64, generator=gen)
    x = torch.randn(16, 64, generator=gen)  # rank 16 < 64: singular without dampening
    x[:, 5] = 0
    h = 2 * x.T @ x / x.shape[0]
    record, _ = _gptq(w, h, fmt, damp=1e-9)
    assert bool((record.codes[:, 5] == 0).all())
    assert "needed damp" in caplog.text


def test_gptq_beats_rtn_kld_on_tiny_gemma3(tiny_models, tmp_path, corpus):
    src = tiny_models["gemma3"]
    ckpt = hf.read(src)
    calibration = CalibrationConfig(tokens=1024, n_ctx=128, corpus=str(corpus))
    quantized = gptq.quantize(ckpt, gptq.GPTQConfig(group_size=32, calibration=calibration))
    manifest = quantized.extra["quantization"]
    assert manifest["method"] == "gptq" and manifest["quantized"] == 7 * ckpt.spec.num_layers
    assert "model.embed_tokens.weight" in manifest["kept"]
    out_gptq = hf.write(quantized, tmp_path / "gptq")
    out_rtn = hf.write(rtn.quantize(ckpt, rtn.RTNConfig(bits=4, group_size=32)), tmp_path / "rtn")
    got = {
        name: validate(out, src, corpus=corpus, n_ctx=128, n_windows=16).to_json()["metrics"]
        for name, out in (("gptq", out_gptq), ("rtn", out_rtn))
    }
    assert got["gptq"]["tokens"] == got["rtn"]["tokens"] > 500
    assert got["gptq"]["kld"] < got["rtn"]["kld"] - 2 * got["rtn"]["kld_se"], got


@pytest.mark.parametrize("variant", ["gemma-mqa", "gemma2"])
def test_cli_gptq_writes_a_folder_transformers_loads(tiny_models, tmp_path, corpus, variant):
    src, dst = tiny_models[variant], tmp_path / "gptq"
    argv = ["quantize", str(src), str(dst), "--method", "gptq", "--bits", "8", "--no-act-order"]
    assert main([*argv, "--corpus", str(corpus), "--calib-tokens", "256", "--calib-ctx", "64"]) == 0
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    manifest = json.loads((dst / "gemport.json").read_text())["quantization"]
    assert manifest["method"] == "gptq" and manifest["config"]["act_order"] is False
    report = validate(dst, src, corpus=corpus, n_ctx=64, n_windows=4).to_json()["metrics"]
    assert report["kld"] < 1e-3, report  # int8 of a tiny model: close to the reference


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--bits", "4", "--group-size", "48"], "--group-size: '48' is not a group size"),
        (["--bits", "4", "--damp", "0"], "--damp must be in (0, 1)"),
        (["--bits", "4", "--grid", "4"], "--grid applies to --method awq, not gptq"),
        (["--bits", "4"], "group size 128 does not divide the row length 64"),
        (["--bits", "4", "--group-size", "32", "--calib-tokens", "100000000"], "fewer than the 100000256 asked"),
    ],
)
def test_cli_gptq_bad_options(tiny_models, tmp_path, capsys, extra, message):
    argv = ["quantize", str(tiny_models["gemma3"]), str(tmp_path / "out"), "--method", "gptq", *extra]
    try:
        code = main(argv)
    except SystemExit as exc:  # refused by the option parser
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("gemport") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def wide_gemma3(tmp_path_factory):
    """Rows of 256 and 512: the Q4_K_M mix uses Q4_K and Q6_K blocks, not only 32-block fallbacks."""
    from tests.tiny import make_tiny

    root = tmp_path_factory.mktemp("gptq-wide")
    return make_tiny(
        "gemma3", root / "gemma3-256", hidden_size=256, intermediate_size=512, head_dim=64, query_pre_attn_scalar=64
    )


def _types(path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_gptq_gguf_beats_llama_quantize_with_imatrix_in_llamacpp(wide_gemma3, tmp_path, corpus):
    """The same Q4_K_M tensor types as llama-quantize (so the same size), lower KLD in llama.cpp
    than llama-quantize's Q4_K_M with an imatrix (gemport's writer, byte-identical to it:
    tests/test_gguf_write.py)."""
    import gguf

    calib = ["--corpus", str(corpus), "--calib-tokens", "1024", "--calib-ctx", "128"]
    ours, peer = tmp_path / "gptq.gguf", tmp_path / "peer.gguf"
    assert (
        main(["quantize", str(wide_gemma3), str(ours), "--method", "gptq", "--bits", "4", "--to", "gguf", *calib]) == 0
    )
    assert (
        main(
            [
                "convert",
                str(wide_gemma3),
                str(peer),
                "--to",
                "gguf",
                "--quant",
                "q4_k_m",
                "--calibrate",
                "--corpus",
                str(corpus),
            ]
        )
        == 0
    )
    assert _types(ours) == _types(peer) and "Q4_K" in _types(ours).values()
    assert abs(ours.stat().st_size - peer.stat().st_size) < 16384  # the same blocks; metadata differ
    made = json.loads(gguf.GGUFReader(ours).get_field("gemport.quantization").contents())
    assert made["method"] == "gptq" and made["gguf_type"] == "q4_k_m"
    got = {
        name: validate(path, wide_gemma3, corpus=corpus, n_ctx=128, n_windows=16).to_json()
        for name, path in (("gptq", ours), ("peer", peer))
    }
    assert got["gptq"]["runtime"] == got["peer"]["runtime"] and "llama" in got["gptq"]["runtime"]["name"]
    ours_m, peer_m = got["gptq"]["metrics"], got["peer"]["metrics"]
    assert ours_m["kld"] < peer_m["kld"] - 2 * peer_m["kld_se"], got


@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_inverse_cholesky_in_place_is_the_upper_factor_of_the_inverse(n):
    """U of (H + damp I)^-1 from LAPACK in H's own buffer equals torch's three-step result; the
    in-place permutation equals fancy indexing exactly."""
    import numpy as np

    gen = torch.Generator().manual_seed(n)
    x = torch.randn(4 * n + 3, n, generator=gen, dtype=torch.float64)
    h = (x.T @ x / x.shape[0]).to(torch.float32)
    mean = float(torch.diag(h).mean())
    a = (h + 0.01 * mean * torch.eye(n)).double()
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(a)), upper=True)
    work = h.clone()
    u = gptq._inverse_cholesky(work, 0.01)
    assert u.data_ptr() == work.data_ptr()
    assert torch.equal(u, torch.triu(u))
    assert torch.allclose(u.double(), want, rtol=2e-3, atol=1e-5 * float(want.abs().max()))
    perm = torch.randperm(n, generator=gen)
    s = h.clone()
    gptq._permute_symmetric(s.numpy(), perm.numpy())
    assert torch.equal(s, h[perm][:, perm])
    flat = np.arange(2 * n + 1)
    gptq._reverse(flat)
    assert flat.tolist() == list(range(2 * n, -1, -1))


def test_a_retry_restores_the_matrix_lapack_overwrote():
    """An eigenvalue of -5e-4: positive definite only at the fourth damp (1e-3); each retry starts
    from the original matrix, not from the partial factor LAPACK left in the buffer."""
    h = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 0.999]])
    u = gptq._inverse_cholesky(h.clone(), 1e-6)
    for attempt in range(gptq.MAX_DAMP_RETRIES + 1):
        d = 1e-6 * 10**attempt
        a = (h + d * float(torch.diag(h).mean()) * torch.eye(3)).double()
        if bool(torch.all(torch.linalg.eigvalsh(a) > 0)):
            break
    assert attempt == 3
    want = torch.linalg.cholesky(torch.linalg.inv(a), upper=True)
    assert torch.allclose(u.double(), want, rtol=1e-3)
