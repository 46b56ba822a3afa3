"""GGUF (llama.cpp) checkpoints of arch gemma, gemma2 and gemma3: reading."""

from __future__ import annotations

from pathlib import Path

from gemport.errors import UnsupportedError

MAGIC = b"GGUF"


def sniff(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def read(path):
    raise UnsupportedError("GGUF reading is not implemented yet", path)
