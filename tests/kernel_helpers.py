"""What the kernel tests share: importing the kernels under Triton's interpreter, and edge-case weights."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def interpreted() -> Iterator[None]:
    """TRITON_INTERPRET=1 while the body imports triton and the kernels (quantizers.kernels reads it once, at
    import, so a test process runs them interpreted from then on), restored afterwards so that child
    processes of other tests are unaffected. Skips the module where triton is missing."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        # Triton 3.6 imports gluon at a kernel's first launch (when it mangles an 8-bit tensor argument), and
        # gluon's import asserts the interpreter is on: imported here, while it is.
        import triton.experimental.gluon  # noqa: F401

        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def edge_weights(rows: int, cols: int, dtype):
    """Random weights [rows, cols] (rows >= 6, cols >= 128) with the groups that decide edge cases in the
    first 128 columns: all zero, negative only, positive only, a constant, +a and -a, values far apart."""
    import torch

    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.05
    w[0, :128] = 0
    w[1, :128] = -w[1, :128].abs()
    w[2, :128] = w[2, :128].abs()
    w[3, :128] = 0.01
    w[4, :128] = 0
    w[4, 5], w[4, 9] = 0.2, -0.2
    w[5, :128] *= 1000
    return w.to(dtype)
