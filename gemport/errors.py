"""Typed errors for users. Each maps to an exit code; the CLI prints one line, no traceback."""

from __future__ import annotations

from pathlib import Path


class GemportError(Exception):
    """Base class. ``exit_code`` is what the CLI returns; ``path`` names the file at fault."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(GemportError):
    """A source file is unreadable, truncated, malformed or of the wrong kind."""


class UnsupportedError(GemportError):
    """A valid file of an architecture, tensor type or option gemport does not handle."""


class CheckpointError(GemportError):
    """Tensors disagree with the spec: missing, unexpected, wrong shape, non-finite."""


class OutputError(GemportError):
    """The destination cannot be written (exists, unwritable, disk full)."""


class GateFailed(GemportError):
    """A validation gate failed: the artifact is not within the requested tolerance."""

    exit_code = 1
