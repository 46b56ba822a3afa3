"""``gemport inspect``: what a checkpoint holds, read from its headers (nothing is dequantized)."""

from __future__ import annotations

import json
from collections import Counter


def cmd_inspect(args) -> int:
    from gemport.cli import _read

    fmt, ckpt = _read(args.path, args.src_format, args)
    dtypes = Counter(t.dtype for t in ckpt)
    info = {
        "path": str(args.path),
        "format": fmt,
        "family": ckpt.spec.family,
        "tensors": len(ckpt.tensors),
        "parameters": sum(_numel(t.shape) for t in ckpt),
        "dtypes": dict(dtypes),
        "bytes": sum(t.nbytes for t in ckpt),
        "spec": ckpt.spec.to_json(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("path", "format", "family", "tensors", "parameters", "bytes"):
        print(f"{key:11} {info[key]}")
    print(f"{'dtypes':11} " + ", ".join(f"{d}: {n}" for d, n in dtypes.most_common()))
    print("spec")
    for key, value in info["spec"].items():
        print(f"  {key:22} {value}")
    return 0


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
