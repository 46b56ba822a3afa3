"""One fuzz target in this process (atheris/libFuzzer); started by run.py, which reads its output.

``python -m tests.fuzz.worker TARGET [libFuzzer flags] CORPUS_DIR SEEDS_DIR``

The oracle: gemport's own errors (GemportError) are the expected answer to bad input; any other
exception escapes to atheris, which prints it and saves the input (a crash). Bounds:

- memory: RLIMIT_AS is set to the warmed-up process size plus ``FUZZ_MEMORY_MB`` (default 1024),
  so an allocation past it fails at once (MemoryError or torch's "can't allocate memory", both
  findings); libFuzzer's -rss_limit_mb catches slow growth of resident memory the same way;
- time: libFuzzer's -timeout (run.py passes 5 s) makes any slower input a finding.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
import random
import resource
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

from tests.fuzz import targets as _targets_uninstrumented  # noqa: F401  (the mutators need no coverage)

COMMON = ("gemport", "converters", "quantizers")


def _vm_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _rss_mb() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _instrument_module(module) -> None:
    """Coverage for every function and method defined in ``module`` (atheris patches code in place)."""
    for obj in vars(module).values():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            atheris.instrument_func(obj)
        elif inspect.isclass(obj):
            for member in vars(obj).values():
                if inspect.isfunction(member):
                    atheris.instrument_func(member)


def main(argv: list[str]) -> None:
    name, rest = argv[1], argv[2:]
    target = _targets_uninstrumented.TARGETS[name]
    # Third-party modules first, uninstrumented (instrumenting at import is slow for torch: 90 s);
    # then gemport's modules at import, and the named parser modules function by function.
    import gguf  # noqa: F401
    import numpy  # noqa: F401
    import onnx  # noqa: F401
    import torch  # noqa: F401

    with atheris.instrument_imports(include=list(COMMON)):
        import converters.compressed_tensors  # noqa: F401
        import converters.gemma_pytorch  # noqa: F401
        import converters.gguf  # noqa: F401
        import converters.hf  # noqa: F401
        import converters.jax  # noqa: F401
        import converters.onnx  # noqa: F401
        import gemport.spec  # noqa: F401
    for module in target.instrument:
        _instrument_module(importlib.import_module(module))
    from gemport.errors import GemportError
    from tests.fuzz.corpus import SEEDS, STAMP

    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")  # numpy's overflow warnings on hostile values, once per input
    models = {k: Path(v) for k, v in __import__("json").loads(STAMP.read_text()).items()}
    scratch = Path(os.environ.get("FUZZ_SCRATCH") or tempfile.mkdtemp(prefix=f"gemport-fuzz-{name}-"))
    scratch.mkdir(parents=True, exist_ok=True)
    state = target.setup(models, scratch)
    max_len = int(os.environ.get("FUZZ_MAX_LEN", 1 << 20))

    findings = Path(os.environ.get("FUZZ_FINDINGS", Path(__file__).parent / "findings"))

    def one_input(data: bytes) -> None:
        try:
            target.run(data, state)
        except GemportError:
            pass
        except BaseException:
            # Saved here as well as by libFuzzer: its crash path can be cut short by its own timer.
            findings.mkdir(parents=True, exist_ok=True)
            (findings / f"{name}-crash-{hashlib.sha1(data).hexdigest()}").write_bytes(data)
            raise

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        try:
            return target.mutate(data, max_size, random.Random(seed))[:max_size]
        except Exception:  # noqa: BLE001  (a mutator tripping on an odd input: use libFuzzer's own)
            return atheris.Mutate(data, max_size)

    # Warm up on the seeds (imports, thread pools, caches) before measuring the process size.
    seeds = sorted((SEEDS / name).iterdir())
    refused = []
    for seed in seeds:
        try:
            target.run(seed.read_bytes(), state)
        except GemportError as exc:
            refused.append(f"{seed.name[:8]}: {exc}")
    for line in refused:
        print(f"fuzz {name}: seed refused (expected for seeds made to be refused): {line}", file=sys.stderr)
    headroom = int(os.environ.get("FUZZ_MEMORY_MB", 1024))
    limit = _vm_bytes() + headroom * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    flags = [f"-rss_limit_mb={_rss_mb() + headroom}", f"-max_len={max_len}"]
    print(f"fuzz {name}: {len(seeds)} seeds ({len(refused)} refused), memory limit {limit >> 20} MB", file=sys.stderr)
    atheris.Setup([argv[0], *flags, *rest], one_input, custom_mutator=mutate)
    atheris.Fuzz()  # exits the process; run.py removes the scratch folder


if __name__ == "__main__":
    main(sys.argv)
