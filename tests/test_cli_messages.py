"""What a user typing commands meets: options after the command, mistyped options, the values each target
takes, destination suffixes, --json targets, help text and the numbers of the report."""

from __future__ import annotations

import json
import math

import pytest

from gemport.cli import build_parser, main
from validation.report import _pm


def _error(capsys, argv: list[str]) -> str:
    """The one stderr line of a refused command line (exit 2), nothing on stdout."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own exit
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def _commands() -> dict:
    return build_parser()._subparsers._group_actions[0].choices


@pytest.mark.parametrize("command", ["formats", "inspect", "convert", "quantize", "imatrix", "validate", "demo-model"])
def test_verbose_is_taken_after_the_command_too(command):
    parser = _commands()[command]
    assert "-v" in [o for a in parser._actions for o in a.option_strings]
    assert build_parser().parse_args(["formats", "-v"]).verbose is True
    assert build_parser().parse_args(["-v", "formats"]).verbose is True
    assert build_parser().parse_args(["formats"]).verbose is False


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["convert", "a", "b", "--to", "gguf", "--qaunt", "q8_0"], "did you mean --quant?"),
        (["validate", "a", "--reference", "r", "--windws", "3"], "did you mean --windows?"),
        (["quantize", "a", "b", "--bits", "4", "--group-sise=64"], "did you mean --group-size?"),
    ],
)
def test_a_mistyped_option_gets_the_closest_one(capsys, argv, suggestion):
    line = _error(capsys, argv)
    assert "unrecognized option" in line and suggestion in line


def test_nothing_close_gets_no_suggestion(capsys):
    line = _error(capsys, ["convert", "a", "b", "--to", "gguf", "--zzzzzzzz"])
    assert "unrecognized option --zzzzzzzz" in line and "did you mean" not in line


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        # a typo is named before argparse's "the following arguments are required: --reference"
        (["validate", "c", "--refrence", "r"], "unrecognized option --refrence; did you mean --reference?"),
        (["convrt", "a", "b"], "unknown command 'convrt'; did you mean convert?"),
        (["--json", "formats"], "--json goes after the command name: gemport formats ... --json"),
        (["convert", "a", "--to", "onnx", "-o", "out"], "unrecognized option -o; gemport takes DST, the second"),
        (["convert", "--model", "a", "b"], "unrecognized option --model; gemport takes SRC, the first"),
        (["convert", "a", "b.gguf", "--outtype", "q8_0"], "gemport takes --quant TYPE (a GGUF type such as q8_0)"),
    ],
)
def test_commands_and_peer_options(capsys, argv, words):
    assert words in _error(capsys, argv)


def test_values_that_look_like_options_are_values(tiny_models, capsys):
    args = build_parser().parse_args(["validate", "c", "--reference", "r", "--json", "-", "--max-ppl-delta", "-1"])
    assert str(args.json_out) == "-" and args.max_ppl_delta == -1.0
    assert build_parser().parse_args(["convert", "a", "b.gguf", "--over"]).overwrite is True  # abbreviations


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--to", "hf", "--quant", "q4_k_m"], ["--to hf takes --quant int8, int4", "GGUF type (--to gguf)"]),
        (["--to", "onnx", "--quant", "q8_0"], ["--to onnx takes --quant int8, int4", "GGUF type"]),
        (["--to", "gguf", "--quant", "int4"], ["--quant int4 is for --to hf or onnx", "q4_k_m"]),
        (["--to", "jax", "--quant", "int8"], ["--to jax takes no --quant"]),
    ],
)
def test_quant_values_are_named_per_target(capsys, tiny_models, tmp_path, argv, words):
    line = _error(capsys, ["convert", str(tiny_models["gemma3-sharded-bf16"]), str(tmp_path / "out"), *argv])
    for w in words:
        assert w in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--group-size", "48"], "--group-size: '48' is not a group size: 32, 64, 128 or channel"),
        (["--method", "awq", "--grid", "0"], "--grid: 0 is not a positive integer"),
        (["--method", "gptq", "--calib-tokens", "-5"], "--calib-tokens: -5 is not a positive integer"),
        (["--asym", "--full-range"], "--full-range applies to symmetric quantization only"),
        (["--method", "gptq", "--damp", "2"], "--damp must be in (0, 1)"),
        (["--method", "gptq", "--calib-ctx", "1"], "--calib-ctx must be at least 2 tokens"),
    ],
)
def test_quantizer_options_are_refused_in_the_cli_words(capsys, tiny_models, tmp_path, argv, words):
    src = str(tiny_models["gemma3-sharded-bf16"])
    line = _error(capsys, ["quantize", src, str(tmp_path / "q"), "--bits", "4", *argv])
    assert words in line
    for internal in ("group_size", "None/-1", "full_range", "n_grid", "calibration context"):
        assert internal not in line


def test_destination_suffix_sets_or_contradicts_the_target(capsys, tiny_models, tmp_path):
    src = str(tiny_models["gemma3-sharded-bf16"])
    line = _error(capsys, ["convert", src, str(tmp_path / "m.onnx"), "--to", "gguf"])
    assert "m.onnx: DST ends in .onnx" in line and "--to onnx" in line
    line = _error(capsys, ["convert", src, str(tmp_path / "m.gguf"), "--to", "hf"])
    assert "DST ends in .gguf" in line
    line = _error(capsys, ["quantize", src, str(tmp_path / "q.gguf"), "--bits", "4", "--to", "onnx"])
    assert "DST ends in .gguf" in line
    line = _error(capsys, ["convert", src, str(tmp_path / "plain")])
    assert "--to is required unless DST ends in .gguf or .onnx" in line
    assert list(tmp_path.iterdir()) == []

    assert main(["convert", src, str(tmp_path / "m.gguf")]) == 0  # --to gguf from the suffix
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"


def test_validate_json_to_stdout_and_no_folders_made(capsys, tiny_models, tmp_path):
    src = str(tiny_models["gemma3-sharded-bf16"])
    argv = ["validate", src, "--reference", src, "--ctx", "32", "--windows", "1"]
    assert main([*argv, "--json", "-"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # standard output is the JSON alone
    assert data["passed"] is True and 0 <= data["metrics"]["kld"] < 1e-3
    assert "result" in captured.err and not (tmp_path / "-").exists()

    line = _error(capsys, [*argv, "--json", str(tmp_path / "no" / "such" / "r.json")])
    assert "no such folder for --json" in line and str(tmp_path / "no" / "such") in line
    assert not (tmp_path / "no").exists()


def test_formats_json_and_aligned_table(capsys):
    assert main(["formats", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"hf", "gguf", "onnx", "jax"} <= {r["name"] for r in rows}
    assert main(["formats"]) == 0
    lines = capsys.readouterr().out.splitlines()
    starts = {line.index(line.split()[2]) for line in lines}  # the descriptions start in one column
    assert len(starts) == 1


@pytest.mark.parametrize("command", ["formats", "inspect", "convert", "quantize", "imatrix", "validate", "demo-model"])
def test_help_text_is_clean(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "%%" not in text
    # placeholders are the command line's own: N, FILE, DIR, SRC, DST ..., never the option name in capitals
    for action in _commands()[command]._actions:
        for option in action.option_strings:
            assert f"{option} {option.lstrip('-').upper().replace('-', '_')}" not in text, option


def test_top_level_help_says_what_quantize_writes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "compressed-tensors HF folder, a GGUF file, an ONNX folder or a TensorRT-LLM checkpoint" in text


@pytest.mark.parametrize(
    ("value", "se", "fmt", "unit", "text"),
    [
        (1.3e-6, 2e-8, ".6f", "", "1.300e-06 +/- 2.000e-08"),
        (0.0123, 0.001, ".6f", "", "0.012300 +/- 0.001000"),
        (-1e-5, 2e-5, "+.4f", " %", "-1.000e-05 % +/- 2.000e-05 %"),
        (0.0, math.nan, ".6f", "", "0.000000"),
        (3.1e120, 2e118, ".4f", "", "3.100e+120 +/- 2.000e+118"),
        (123456.5, 2.0, ".4f", "", "123456.5000 +/- 2.0000"),
    ],
)
def test_small_and_huge_values_print_in_scientific_notation(value, se, fmt, unit, text):
    assert _pm(value, se, fmt, unit) == text


def test_convert_and_quantize_end_with_a_summary(capsys, tiny_models, tmp_path):
    src = str(tiny_models["gemma3-sharded-bf16"])
    assert main(["convert", src, str(tmp_path / "m.gguf"), "--quant", "q8_0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"wrote {tmp_path / 'm.gguf'}"
    assert out[1].startswith("types ") and "Q8_0" in out[1] and "F32" in out[1]
    assert out[2].startswith("size ") and " -> " in out[2] and "bits per weight" in out[2] and out[2].endswith(" s")
    assert main(["quantize", src, str(tmp_path / "ct"), "--bits", "4", "--group-size", "32", "-v"]) == 0
    out = capsys.readouterr().out
    assert "(rtn, " in out and "int4 pack-quantized g32 sym" in out
    assert "bpw" in out.splitlines()[3] and out.splitlines()[-1].startswith("total")  # -v: the table of types


def test_imatrix_without_the_lookup_table_is_not_warned(caplog):
    import numpy as np

    from converters.gguf_writer import _check_imatrix

    shapes = {"token_embd.weight": (8, 32), "blk.0.attn_q.weight": (8, 16), "blk.0.ffn_down.weight": (32, 16)}
    imatrix = {"blk.0.attn_q.weight": np.ones(8, np.float32)}
    with caplog.at_level("WARNING"):
        _check_imatrix(imatrix, shapes, "m.imatrix")
    assert "1 tensors have no importance matrix entry (unweighted), e.g. blk.0.ffn_down.weight" in caplog.text
    assert "token_embd" not in caplog.text  # a row lookup: no imatrix ever has it


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--bits", "8", "--quant", "q4_k_m"], "--bits 8 and --quant q4_k_m disagree"),
        (["--bits", "4", "--group-size", "64", "--asym"], "--group-size, --asym do not apply to --to gguf"),
        (["--quant", "f16"], "--quant f16 is not quantized"),
        ([], "--to gguf needs --bits 4 or 8"),
        (["--quant", "q4km"], "unknown GGUF type 'q4km'; did you mean q4_k_m?"),
    ],
)
def test_quantize_to_gguf_refuses_what_the_type_decides(capsys, tiny_models, tmp_path, argv, words):
    line = _error(capsys, ["quantize", str(tiny_models["gemma3-sharded-bf16"]), str(tmp_path / "q.gguf"), *argv])
    assert words in line and list(tmp_path.iterdir()) == []


def test_quantize_to_gguf_takes_the_bits_from_the_type(capsys, tiny_models, tmp_path):
    src = str(tiny_models["gemma3-sharded-bf16"])
    assert main(["quantize", src, str(tmp_path / "q.gguf"), "--quant", "q8_0"]) == 0
    assert "(rtn, q8_0)" in capsys.readouterr().out
    line = _error(capsys, ["quantize", src, str(tmp_path / "q")])
    assert "--bits 4 or 8 is required" in line


def test_convert_to_gguf_refuses_dtype_with_quant(capsys, tiny_models, tmp_path):
    src = str(tiny_models["gemma3-sharded-bf16"])
    line = _error(capsys, ["convert", src, str(tmp_path / "m.gguf"), "--quant", "q8_0", "--dtype", "f32"])
    assert "--dtype and --quant together" in line
    line = _error(capsys, ["convert", src, str(tmp_path / "m.gguf"), "--quant", "Q4_K_X"])
    assert "did you mean q4_k_m?" in line or "did you mean q4_k_s?" in line


@pytest.mark.parametrize(("text", "size"), [("100M", 10**8), ("2G", 2 * 10**9), ("2GB", 2 * 10**9), ("1GiB", 2**30)])
def test_sizes_in_llama_cpp_units(text, size):
    assert build_parser().parse_args(["convert", "a", "b.gguf", "--split-max-size", text]).max_shard_size == size


def test_a_bad_size_names_the_option_not_the_parser(capsys):
    line = _error(capsys, ["convert", "a", "b.gguf", "--split-max-size", "abc"])
    assert "'abc' is not a size (e.g. 2G, 500M" in line and "_size" not in line


def test_missing_destination_folder_is_not_created(capsys, tiny_models, tmp_path):
    line = _error(capsys, ["convert", str(tiny_models["gemma3-sharded-bf16"]), str(tmp_path / "no" / "m.gguf")])
    assert f"{tmp_path / 'no' / 'm.gguf'}: cannot write: its folder {tmp_path / 'no'} does not exist" in line
    assert list(tmp_path.iterdir()) == []


def test_dtype_spellings_of_other_tools():
    for text, dtype in (("fp32", "f32"), ("float16", "f16"), ("BF16", "bf16"), ("bfloat16", "bf16")):
        assert build_parser().parse_args(["convert", "a", "b", "--to", "hf", "--dtype", text]).dtype == dtype


def test_validate_refuses_a_window_past_the_model_context(capsys, tiny_models):
    src = str(tiny_models["gemma3-sharded-bf16"])
    line = _error(capsys, ["validate", src, "--reference", src, "--ctx", "100000000"])
    assert "--ctx 100000000 is longer than the reference's context, max_position_embeddings" in line


def test_onnx_of_a_quantized_source_gets_the_quantized_head(capsys, tiny_models, tmp_path):
    src = str(tiny_models["gemma3-sharded-bf16"])
    assert main(["quantize", src, str(tmp_path / "ct"), "--bits", "4", "--group-size", "32"]) == 0
    assert main(["convert", str(tmp_path / "ct"), str(tmp_path / "m.onnx")]) == 0
    manifest = json.loads((tmp_path / "m.onnx" / "gemport.json").read_text())
    assert manifest["onnx"]["head_bits"] == 8 and manifest["onnx"]["accuracy_level"] == 4
