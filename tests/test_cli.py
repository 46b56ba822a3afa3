from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gemport import registry
from gemport.cli import build_parser, main


def test_formats_lists_every_registered_format(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list(registry.FORMATS)
    assert any(line.split()[1] == "read/write" for line in out)


def test_cli_choices_come_from_the_registry():
    convert = build_parser()._subparsers._group_actions[0].choices["convert"]
    to = next(a for a in convert._actions if a.dest == "dst_format")
    assert list(to.choices) == registry.writers()


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys\nfrom gemport.cli import build_parser\n"
        "try:\n    build_parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'gguf', 'safetensors') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


@pytest.mark.parametrize("command", ["convert", "validate", "inspect", "demo-model"])
def test_every_option_is_explained(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    for action in parser._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
    assert "usage: gemport " + command in text


def test_inspect(tiny_models, capsys):
    assert main(["inspect", str(tiny_models["gemma3-sharded-bf16"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "hf" and info["family"] == "gemma3"
    assert list(info["types"]) == ["BF16"] and info["types"]["BF16"]["tensors"] == info["tensors"]
    assert info["weight_bytes"] == 2 * info["parameters"] and info["bits_per_weight"] == 16
    assert info["spec"]["layer_types"] == ["sliding_attention", "full_attention"] * 2


def test_unknown_format_lists_known_ones():
    from gemport.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="known: .*hf.*gguf"):
        registry.get("tflite")
