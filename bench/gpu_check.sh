#!/usr/bin/env bash
# The GPU check of issue 17, in one command on one GPU, inside 8 minutes:
#   1. the GPU tests, each file in its own pytest process (the kernels are compiled or interpreted as
#      chosen at their first import in a process): tests/test_gpu.py (every Triton kernel on CUDA against
#      its CPU reference), at most PYTEST_LIMIT seconds, and the gpu-marked tests of
#      tests/test_kernel_runtime.py (gemport validate --device cuda against the CPU runtimes), at most
#      RUNTIME_LIMIT seconds;
#   2. bench/kernels.py (correctness at 7B widths, W4A16/W8A16 beside torch at Gemma 2B/7B/27B shapes,
#      GPTQ of one 7B layer), at most BENCH_LIMIT seconds (it starts no timing after BENCH_BUDGET);
# then writes gpu_check.md (a Markdown report: environment, test summary, the kernels' tables) with
# kernels.md, kernels.json and the logs into $OUT when set, else build/bench/gpu, and prints it.
#
#   bash bench/gpu_check.sh               # on the GPU machine (make bench-gpu)
#   bash bench/gpu_check.sh --dry-run     # anywhere: the deps, the shapes and the commands; runs nothing
#   bash bench/gpu_check.sh --fetch-wheels  # here, with network: the packages the GPU image lacks
#
# Python: $PYTHON, else .venv/bin/python, else python3. It needs torch with CUDA, triton, numpy and
# pytest (exit 3 naming what is missing); the bit-exact references also need gguf and compressed-tensors,
# which the GPU image lacks: --fetch-wheels downloads them (Python 3.12 manylinux wheels, the versions
# of this venv) into build/gpu-wheels (or $GEMPORT_WHEELS); carried to the GPU machine there, they are
# installed into a temporary folder on PYTHONPATH before the run. Without them the checks that need
# them are skipped and said so; everything else runs. Exit 0 when tests and bench passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DRY=0
FETCH=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $arg (known: --dry-run, --fetch-wheels, --help)" >&2; exit 2 ;;
  esac
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
OUTDIR=${OUT:-build/bench/gpu}
WHEELS=${GEMPORT_WHEELS:-build/gpu-wheels}
SITE=${TMPDIR:-/tmp}/gemport-gpu-site
PYTEST_LIMIT=${PYTEST_LIMIT:-120}
RUNTIME_LIMIT=${RUNTIME_LIMIT:-90}
BENCH_LIMIT=${BENCH_LIMIT:-250}  # 120 + 90 + 250 s, and the package check: under 8 minutes
BENCH_BUDGET=${BENCH_BUDGET:-150}
# the packages the GPU image lacks (/work/.library/device/KINDS.md): gguf, and compressed-tensors with
# what it needs there (pydantic and its parts, loguru; typing-extensions for pydantic's minimum)
CARRIED="gguf compressed-tensors pydantic pydantic-core annotated-types typing-inspection typing-extensions loguru"

PYTEST_CMD=("$PY" -m pytest -q -ra -p no:cacheprovider -m gpu tests/test_gpu.py)
# pytest-xdist, where installed (the GPU image has it): Triton compiles each kernel variant on one CPU
# core, and the tests compile about a hundred
if "$PY" -c "import xdist" 2>/dev/null; then PYTEST_CMD+=(-n 4); fi
RUNTIME_CMD=("$PY" -m pytest -q -ra -p no:cacheprovider -m gpu tests/test_kernel_runtime.py)
BENCH_CMD=("$PY" bench/kernels.py --out "$OUTDIR" --budget-s "$BENCH_BUDGET")

deps() {
  # one line per module: ok NAME VERSION | MISSING NAME (what needs it); exit 1 if a required one is missing
  "$PY" - "$1" <<'EOF'
import importlib, sys
need_cuda = sys.argv[1] == "cuda"
required = {"torch": "everything", "triton": "the kernels", "numpy": "the references", "pytest": "the GPU tests"}
optional = {"gguf": "the GGUF byte checks", "compressed_tensors": "the packing and matmul references",
            "scipy": "GPTQ's CPU pass (its comparison with the GPU's)"}
bad = False
for group, mods in (("required", required), ("optional", optional)):
    for name, why in mods.items():
        try:
            mod = importlib.import_module(name)
            try:
                from importlib.metadata import version
                found = version(name.replace("_", "-"))
            except Exception:  # not installed as a distribution (found on the path): the module's own
                found = getattr(mod, "__version__", "")
            print(f"ok {name} {found}")
        except Exception as exc:  # an installed package that fails to import is as missing
            print(f"MISSING {name} ({group}: {why}): {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            bad = bad or group == "required"
try:
    import torch
    cuda = torch.cuda.is_available()
    print(f"{'ok' if cuda else 'MISSING'} cuda {torch.cuda.get_device_name(0) if cuda else '(torch.cuda.is_available() is False)'}")
    bad = bad or (need_cuda and not cuda)
except ImportError:
    pass
sys.exit(1 if bad else 0)
EOF
}

if [ "$FETCH" = 1 ]; then
  mkdir -p "$WHEELS"
  specs=()
  for name in $CARRIED; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") || exit 2
    specs+=("$name==$version")
  done
  echo "gpu_check.sh: downloading ${specs[*]} into $WHEELS"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "${specs[@]}" || exit 2
  echo "gpu_check.sh: carry $WHEELS to the GPU machine (an ignored path); bench/gpu_check.sh installs it there"
  exit 0
fi

if [ "$DRY" = 1 ]; then
  echo "gpu_check.sh --dry-run: nothing is run"
  echo "python: $PY; output: $OUTDIR (gpu_check.md, kernels.md, kernels.json, pytest.log, runtime_tests.log, kernels.log, deps.txt)"
  echo "deps (checked first; required ones missing stop a real run with exit 3):"
  deps any | sed 's/^/  /'
  echo "wheels to install first when optional ones are missing: $WHEELS ($(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) wheels here)"
  echo "shapes:"
  "$PY" bench/kernels.py --list | sed 's/^/  /'
  echo "commands:"
  echo "  timeout $PYTEST_LIMIT ${PYTEST_CMD[*]}"
  echo "  timeout $RUNTIME_LIMIT ${RUNTIME_CMD[*]}"
  echo "  timeout $BENCH_LIMIT ${BENCH_CMD[*]}"
  exit 0
fi

unset TRITON_INTERPRET  # the kernels compiled for the GPU, not interpreted
export PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
rm -f "$OUTDIR/kernels.md" "$OUTDIR/kernels.json"  # never a table of an earlier run
START=$SECONDS
deps cuda >"$OUTDIR/deps.txt" 2>&1
if grep -v '^MISSING cuda' "$OUTDIR/deps.txt" | grep -q '^MISSING'; then  # packages, not the GPU
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: installing the carried wheels of $WHEELS into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || echo "gpu_check.sh: installing the wheels failed" >&2
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
deps cuda >"$OUTDIR/deps.txt" 2>&1
DEPS_RC=$?
cat "$OUTDIR/deps.txt"
if [ "$DEPS_RC" != 0 ]; then
  if grep -q '^MISSING cuda' "$OUTDIR/deps.txt"; then
    echo "gpu_check.sh: no CUDA GPU visible (torch.cuda.is_available() is False): this runs on a GPU machine;" \
      "--dry-run shows what it would run" >&2
  fi
  if grep -v '^MISSING cuda' "$OUTDIR/deps.txt" | grep -q '^MISSING.*(required'; then
    echo "gpu_check.sh: required Python packages are missing (MISSING lines above)" >&2
  fi
  echo "gpu_check.sh: nothing run" >&2
  exit 3
fi
if grep -q '^MISSING' "$OUTDIR/deps.txt"; then
  echo "gpu_check.sh: optional packages missing: the checks that need them are skipped (bash bench/gpu_check.sh" \
    "--fetch-wheels where there is network, then carry $WHEELS)" >&2
fi

run_step() {  # LIMIT LOG CMD...: the command under timeout, its output in LOG; sets RC and SECS
  local limit=$1 log=$2 t0=$SECONDS
  shift 2
  timeout -k 10 "$limit" "$@" >"$log" 2>&1
  RC=$?
  SECS=$((SECONDS - t0))
}
status() {  # RC LIMIT
  case "$1" in
    0) echo "passed" ;;
    124 | 137) echo "stopped at the ${2} s limit (rc $1)" ;;
    *) echo "failed (rc $1)" ;;
  esac
}

report_tests() {  # COMMAND RC LIMIT SECONDS LOG: a section of the report
  echo "## GPU tests: \`$1\`"
  echo
  echo "$(status "$2" "$3") in $4 s: $(grep -E '(passed|failed|skipped|error|no tests ran|nothing run)' "$5" | tail -1)"
  grep -E '^(FAILED|ERROR|SKIPPED)' "$5" | head -20 | sed 's/^/    /'
  echo
}

run_step "$PYTEST_LIMIT" "$OUTDIR/pytest.log" "${PYTEST_CMD[@]}"
PYTEST_RC=$RC PYTEST_S=$SECS
if [ -f tests/test_kernel_runtime.py ]; then
  run_step "$RUNTIME_LIMIT" "$OUTDIR/runtime_tests.log" "${RUNTIME_CMD[@]}"
else
  RC=0 SECS=0
  echo "tests/test_kernel_runtime.py is not there: nothing run" >"$OUTDIR/runtime_tests.log"
fi
RUNTIME_RC=$RC RUNTIME_S=$SECS
run_step "$BENCH_LIMIT" "$OUTDIR/kernels.log" "${BENCH_CMD[@]}"
BENCH_RC=$RC BENCH_S=$SECS

{
  echo "# GPU check (bench/gpu_check.sh)"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown);" \
    "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi');" \
    "$("$PY" --version 2>&1); $((SECONDS - START)) s in all."
  echo
  echo "Packages: $(grep -v '^ok cuda' "$OUTDIR/deps.txt" | tr '\n' ';' | sed 's/;$//; s/;/; /g')"
  echo
  report_tests "${PYTEST_CMD[*]}" "$PYTEST_RC" "$PYTEST_LIMIT" "$PYTEST_S" "$OUTDIR/pytest.log"
  report_tests "${RUNTIME_CMD[*]}" "$RUNTIME_RC" "$RUNTIME_LIMIT" "$RUNTIME_S" "$OUTDIR/runtime_tests.log"
  echo "## Kernels: \`${BENCH_CMD[*]}\`"
  echo
  echo "$(status "$BENCH_RC" "$BENCH_LIMIT") in $BENCH_S s."
  echo
  if [ "$BENCH_RC" != 0 ] || [ ! -f "$OUTDIR/kernels.md" ]; then
    echo '```'
    grep -v '^|' "$OUTDIR/kernels.log" | tail -15
    echo '```'
    echo
  fi
  [ -f "$OUTDIR/kernels.md" ] && cat "$OUTDIR/kernels.md"
} >"$OUTDIR/gpu_check.md"
cat "$OUTDIR/gpu_check.md"
[ "$PYTEST_RC" = 0 ] && [ "$RUNTIME_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
