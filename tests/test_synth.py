"""gemport synth: random checkpoints of the official sizes, streamed, for tests and benchmarks."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from converters import hf
from converters.presets import PRESETS
from gemport.checkpoint import expected_shapes
from gemport.cli import main
from gemport.synth import SCALES, draw, synth_spec
from tests.conftest import ROOT
from tests.test_bad_input import assert_nothing_left, assert_one_line_error

# Parameters of the released models, as the safetensors totals on their HF model pages state them
# (google/gemma-2b, gemma-7b, gemma-2-2b, gemma-2-9b, gemma-2-27b, gemma-3-270m, gemma-3-1b-pt).
PUBLISHED_PARAMETERS = {
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "gemma2-2b": 2_614_341_888,
    "gemma2-9b": 9_241_705_984,
    "gemma2-27b": 27_227_128_320,
    "gemma3-270m": 268_098_176,
    "gemma3-1b": 999_885_952,
}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_shapes_are_the_released_models(name):
    spec = synth_spec(name)
    assert sum(math.prod(s) for s in expected_shapes(spec).values()) == PUBLISHED_PARAMETERS[name]


def test_every_preset_has_a_spec_and_layers_keep_the_widths():
    for name, preset in PRESETS.items():
        spec = synth_spec(name, layers=2)
        assert (spec.num_layers, spec.hidden_size, spec.intermediate_size) == (
            2,
            preset.hidden_size,
            preset.intermediate_size,
        )
    large = synth_spec("gemma3-27b", layers=7)
    assert large.vocab_size == 262208 and large.rope_scaling.factor == 8.0
    assert large.layer_types[5] == "full_attention" and large.layer_types[6] == "sliding_attention"


def test_draws_are_seeded_per_tensor_and_at_the_demo_models_scale():
    name, shape = "model.layers.0.mlp.down_proj.weight", (512, 8192)
    a, b = draw(name, shape, "f32", 0), draw(name, shape, "f32", 0)
    assert torch.equal(a, b) and not torch.equal(a, draw(name, shape, "f32", 1))
    assert not torch.equal(a, draw("model.layers.1.mlp.down_proj.weight", shape, "f32", 0))
    _, std, fan_in = SCALES["down_proj"]
    want = std * math.sqrt(fan_in / shape[1])
    assert abs(float(a.std()) / want - 1) < 0.03
    assert float(a.abs().max()) / float(a.std()) > 8  # heavy tails: outliers for the quantizers' scales
    norm = draw("model.layers.0.post_attention_layernorm.weight", (100000,), "f32", 0)
    assert abs(float(norm.mean()) - SCALES["post_attention_layernorm"][0]) < 1.0


def test_synth_writes_a_streamed_checkpoint_transformers_and_gemport_read(tmp_path):
    """gemma3-1b with one layer: the full 262144 x 1152 embedding, written in a child process whose peak
    RSS stays near its largest tensor (streamed, never the model), read by gemport and transformers."""
    dst = tmp_path / "g3"
    # VmHWM is the peak of this process's own memory map; ru_maxrss would also count the pytest process
    # forked from, whose pages a forked child holds until it execs (Linux keeps that maximum across exec).
    code = (
        "import re, sys; from gemport.cli import main; rc = main(sys.argv[1:]); "
        "status = open('/proc/self/status').read(); "
        "print('RSS', int(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1)) * 1024); sys.exit(rc)"
    )
    argv = [sys.executable, "-c", code, "synth", "gemma3-1b", str(dst), "--layers", "2", "--max-shard-size", "300MB"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rss = int(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("RSS")))
    embedding = 262144 * 1152 * 2
    assert rss < embedding + 700e6, rss  # the embedding and torch; the model is 0.7 GB, in 3 shards
    ckpt = hf.read(dst)
    assert ckpt.spec == synth_spec("gemma3-1b", layers=2)
    assert len(list(dst.glob("model-*-of-*.safetensors"))) >= 2
    config = json.loads((dst / "config.json").read_text())
    assert (config["vocab_size"], config["num_key_value_heads"], config["dtype"]) == (262144, 1, "bfloat16")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(dst)("Hello").input_ids[0] == 2
    assert torch.equal(ckpt.tensors["model.norm.weight"].load(), draw("model.norm.weight", (1152,), "bf16", 0))


def test_gemma1_and_2_get_the_tokenizer_cut_to_their_vocabulary():
    import sentencepiece as spm

    from gemport.synth import synth_checkpoint

    files = synth_checkpoint("gemma-2b", layers=1).tokenizer_files
    model = spm.SentencePieceProcessor(model_proto=files["tokenizer.model"])
    assert model.get_piece_size() == 256000 and model.bos_id() == 2
    assert len(json.loads(files["tokenizer.json"])["model"]["vocab"]) == 256000


@pytest.mark.parametrize(
    "argv,words",
    [
        (["gemma-5b"], "unknown model 'gemma-5b'"),
        (["gemma-2b", "--layers", "19"], "--layers must be 1..18"),
    ],
)
def test_bad_requests_are_one_line(tmp_path, capsys, argv, words):
    dst = tmp_path / "out"
    code = main(["synth", argv[0], str(dst), *argv[1:]])
    assert_one_line_error(code, capsys.readouterr().err, words)
    assert_nothing_left(dst)


def test_a_file_destination_is_refused(tmp_path, capsys):
    """synth writes a folder: a DST named like a single-file format, or an existing file even with
    --overwrite, is refused and nothing is written."""
    dst = tmp_path / "model.gguf"
    code = main(["synth", "gemma3-270m", str(dst), "--layers", "1"])
    assert_one_line_error(code, capsys.readouterr().err, "names a .gguf file", "gemport convert")
    assert_nothing_left(dst)
    plain = tmp_path / "notes"
    plain.write_text("keep me")
    code = main(["synth", "gemma3-270m", str(plain), "--layers", "1", "--overwrite"])
    assert_one_line_error(code, capsys.readouterr().err, "is a file")
    assert plain.read_text() == "keep me"


def test_the_folder_says_it_is_synthetic(tmp_path):
    from gemport.synth import synthetic_record, write_synth

    out = write_synth("gemma3-270m", tmp_path / "s", layers=1, seed=3)
    assert synthetic_record(out) == {"model": "gemma3-270m", "dtype": "bf16", "seed": 3, "layers": 1}
    assert synthetic_record(tmp_path) is None
    assert hf.read(out).spec.num_layers == 1  # gemport.json does not disturb the reader
