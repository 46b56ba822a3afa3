"""llama.cpp's own tools as bench peers, built from the llama-cpp-python sdist that gemport pins.

The sdist of ``llama-cpp-python`` (the version installed in the venv, 0.3.36) vendors a complete
llama.cpp tree. This module downloads that sdist with pip, extracts it and cmake-builds only the
tools the benches call (llama-quantize, llama-perplexity, llama-imatrix; Release, CPU only) into the
git-ignored folder ``build/llama.cpp/``. Nothing from llama.cpp is copied into the project.

    .venv/bin/python bench/llamacpp_tools.py            # build if missing, print the paths
    .venv/bin/python bench/llamacpp_tools.py --sdist llama_cpp_python-0.3.36.tar.gz   # no download

As a module: ``tools = ensure_tools()`` returns a :class:`LlamaCppTools` with the binaries' paths
and ``convert_command(...)`` for the sdist's ``convert_hf_to_gguf.py``. The build is skipped when
all binaries exist; a file lock keeps two concurrent callers from building at once.

``convert_hf_to_gguf.py`` runs with the venv's python and imports the sdist's own ``gguf-py``
(the script puts it first on ``sys.path`` unless ``NO_LOCAL_GGUF`` is set), so the writer always
matches the converter; its version is 0.19.0, the same as the venv's ``gguf``.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench.llamacpp_tools")

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_ROOT = REPO_ROOT / "build" / "llama.cpp"
PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"  # pinned in pyproject.toml; the tools must match the binding gemport validates with
TARGETS = ("llama-quantize", "llama-perplexity", "llama-imatrix")
JOBS = 2

# Pass to every tool that computes (llama-perplexity, llama-imatrix). With GGML_NATIVE on a CPU with
# AMX-INT8, llama.cpp 0.3.36's tools put Q8_0 weights (token_embd included) into the AMX buffer type and
# segfault in ggml_backend_amx_mul_mat on the first batch (seen with llama-perplexity on a Gemma 3 270M
# Q8_0). --no-repack (no extra buffer types) keeps weights in plain CPU buffers; figures are unchanged
# (Q8_0 ppl equal to 1e-6 to llama-cpp-python's, which keeps token_embd out of AMX).
SAFE_CPU_ARGS = ("--no-repack",)

# ref: vendor/llama.cpp/CMakeLists.txt options; everything not needed for TARGETS is switched off.
CMAKE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",
    "GGML_NATIVE": "ON",
    "GGML_CUDA": "OFF",
    "GGML_METAL": "OFF",
    "GGML_VULKAN": "OFF",
    "LLAMA_BUILD_TOOLS": "ON",
    "LLAMA_BUILD_COMMON": "ON",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_SERVER": "OFF",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_CURL": "OFF",
}


class ToolError(RuntimeError):
    """A llama.cpp tool is missing or could not be fetched or built; the message says which and why."""


@dataclass(frozen=True)
class LlamaCppTools:
    """Paths of the built llama.cpp tools and of the sdist's converter script."""

    source: Path  # vendor/llama.cpp inside the extracted sdist
    quantize: Path
    perplexity: Path
    imatrix: Path
    convert_hf_to_gguf: Path
    build_seconds: float | None  # wall time of the cmake build that made the binaries, if recorded

    def convert_command(self, model_dir: Path, outfile: Path, outtype: str = "bf16") -> list[str]:
        """argv that converts an HF folder to one GGUF file with the venv's python."""
        script = str(self.convert_hf_to_gguf)
        return [sys.executable, script, str(model_dir), "--outfile", str(outfile), "--outtype", outtype]

    def convert_env(self) -> dict[str, str]:
        """Environment for convert_hf_to_gguf.py: the sdist's gguf-py wins over the venv's gguf."""
        env = dict(os.environ)
        env.pop("NO_LOCAL_GGUF", None)
        gguf_py = str(self.source / "gguf-py")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (gguf_py, env.get("PYTHONPATH", "")) if p)
        return env

    def as_dict(self) -> dict[str, str | float | None]:
        return {
            "source": str(self.source),
            "llama-quantize": str(self.quantize),
            "llama-perplexity": str(self.perplexity),
            "llama-imatrix": str(self.imatrix),
            "convert_hf_to_gguf.py": str(self.convert_hf_to_gguf),
            "build_seconds": self.build_seconds,
        }


def sdist_name(version: str = VERSION) -> str:
    return f"llama_cpp_python-{version}.tar.gz"


def source_dir(root: Path = BUILD_ROOT, version: str = VERSION) -> Path:
    return root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def cmake_dir(root: Path = BUILD_ROOT) -> Path:
    return root / "cmake-build"


def binary_path(target: str, root: Path = BUILD_ROOT) -> Path:
    return cmake_dir(root) / "bin" / target


def check_installed_version(version: str = VERSION) -> None:
    try:
        installed = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        log.warning("%s is not installed in this venv; building llama.cpp from %s %s", PACKAGE, PACKAGE, version)
        return
    if installed != version:
        log.warning("venv has %s %s but the tools are built from %s", PACKAGE, installed, version)


def require_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolError(f"'{name}' not found on PATH; it is needed to build llama.cpp's tools (install {name})")
    return path


def run_logged(argv: list[str], logfile: Path, what: str, cwd: Path | None = None) -> None:
    """Run ``argv`` with its output appended to ``logfile``; ToolError with the log's tail on failure."""
    log.info("%s: %s", what, " ".join(argv))
    with logfile.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    if proc.returncode:
        tail = "".join(logfile.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise ToolError(f"{what} failed (exit {proc.returncode}); last lines of {logfile}:\n{tail}")


def fetch_sdist(root: Path, version: str, sdist: Path | None, logfile: Path) -> Path:
    """The sdist tarball in ``root``: already there, copied from ``sdist``, or fetched by pip download."""
    target = root / sdist_name(version)
    if target.is_file():
        return target
    if sdist is not None:
        if not sdist.is_file():
            raise ToolError(f"sdist not found: {sdist}")
        log.info("copying %s to %s", sdist, target)
        shutil.copyfile(sdist, target.with_suffix(".part"))
        target.with_suffix(".part").rename(target)
        return target
    argv = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    run_logged([*argv, f"{PACKAGE}=={version}", "-d", str(root)], logfile, "pip download")
    if not target.is_file():
        raise ToolError(f"pip download did not produce {target}; see {logfile}")
    return target


def extract_sdist(tarball: Path, root: Path, version: str) -> Path:
    """Extract the sdist next to itself (via a temporary folder, so a partial tree never looks complete)."""
    top = root / f"llama_cpp_python-{version}"
    if source_dir(root, version).joinpath("CMakeLists.txt").is_file():
        return source_dir(root, version)
    log.info("extracting %s", tarball.name)
    with tempfile.TemporaryDirectory(dir=root) as tmp, tarfile.open(tarball) as tar:
        tar.extractall(tmp, filter="data")
        shutil.rmtree(top, ignore_errors=True)
        (Path(tmp) / top.name).rename(top)
    src = source_dir(root, version)
    if not (src / "CMakeLists.txt").is_file():
        raise ToolError(f"{tarball} has no vendor/llama.cpp/CMakeLists.txt; is it the llama-cpp-python sdist?")
    return src


def cmake_build(src: Path, root: Path, logfile: Path, jobs: int = JOBS) -> float:
    """Configure and build TARGETS; returns the wall seconds of configure + build."""
    cmake = require_program("cmake")
    require_program("c++")
    build = cmake_dir(root)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    defines = [f"-D{k}={v}" for k, v in CMAKE_OPTIONS.items()]
    start = time.perf_counter()
    run_logged([cmake, "-S", str(src), "-B", str(build), *generator, *defines], logfile, "cmake configure")
    log.info("building %s with -j%d (log: %s)", ", ".join(TARGETS), jobs, logfile)
    run_logged([cmake, "--build", str(build), "--target", *TARGETS, "-j", str(jobs)], logfile, "cmake build")
    seconds = time.perf_counter() - start
    missing = [t for t in TARGETS if not binary_path(t, root).is_file()]
    if missing:
        raise ToolError(f"cmake build finished but {', '.join(missing)} is missing under {build / 'bin'}")
    return seconds


@contextmanager
def build_lock(root: Path) -> Iterator[None]:
    with (root / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tools(root: Path, version: str, build_seconds: float | None) -> LlamaCppTools:
    src = source_dir(root, version)
    return LlamaCppTools(
        source=src,
        quantize=binary_path("llama-quantize", root),
        perplexity=binary_path("llama-perplexity", root),
        imatrix=binary_path("llama-imatrix", root),
        convert_hf_to_gguf=src / "convert_hf_to_gguf.py",
        build_seconds=build_seconds,
    )


def _recorded_build_seconds(root: Path) -> float | None:
    info = root / "build-info.json"
    try:
        return float(json.loads(info.read_text())["build_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure_tools(
    root: Path = BUILD_ROOT, version: str = VERSION, sdist: Path | None = None, jobs: int = JOBS
) -> LlamaCppTools:
    """Fetch, extract and build as needed; the paths of the tools. Idempotent and safe to call concurrently."""
    root.mkdir(parents=True, exist_ok=True)
    with build_lock(root):
        src = source_dir(root, version)
        if all(binary_path(t, root).is_file() for t in TARGETS) and (src / "convert_hf_to_gguf.py").is_file():
            log.debug("llama.cpp tools already built in %s", cmake_dir(root))
            return _tools(root, version, _recorded_build_seconds(root))
        check_installed_version(version)
        logfile = root / "build.log"
        tarball = fetch_sdist(root, version, sdist, logfile)
        src = extract_sdist(tarball, root, version)
        seconds = cmake_build(src, root, logfile, jobs)
        info = {"version": version, "targets": list(TARGETS), "cmake": CMAKE_OPTIONS, "jobs": jobs}
        (root / "build-info.json").write_text(json.dumps({**info, "build_seconds": seconds}, indent=2) + "\n")
        log.info("built llama.cpp tools in %.0f s", seconds)
        return _tools(root, version, seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", type=Path, help="use this llama-cpp-python sdist tarball instead of pip download")
    ap.add_argument("--jobs", type=int, default=JOBS, help=f"parallel compile jobs (default {JOBS})")
    ap.add_argument("--json", action="store_true", help="print the paths as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        tools = ensure_tools(sdist=args.sdist, jobs=args.jobs)
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = tools.as_dict()
    if args.json:
        print(json.dumps(paths, indent=2))
    else:
        for key, value in paths.items():
            print(f"{key:24} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
