# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := build/models/gemma-3-270m
OFFGRID := build/models/gemma-3-270m-offgrid
# llama.cpp's own converter (a test oracle and bench peer) comes from the sdist of the
# llama-cpp-python version pyproject.toml pins; only extracted here, never copied into the project.
LLAMACPP_VERSION := 0.3.36
LLAMACPP_SRC := build/llama.cpp/llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp
# Google's gemma library, the runtime that validates JAX checkpoints, in its own venv: it pins an older
# jax than gemport and imports TensorFlow. The pins (the whole installed set) are in GEMMA_REQS.
GEMMA_VENV := build/gemma-venv
GEMMA_STAMP := $(GEMMA_VENV)/.installed
GEMMA_REQS := requirements/gemma-runtime.txt
# NVIDIA ModelOpt, the oracle for TensorRT-LLM checkpoints (tests/modelopt_export.py), in its own venv: it
# pins an older transformers than gemport. The pins (the whole installed set) are in MODELOPT_REQS.
MODELOPT_VENV := build/modelopt-venv
MODELOPT_STAMP := $(MODELOPT_VENV)/.installed
MODELOPT_REQS := requirements/modelopt-runtime.txt
# keras-hub (Keras 3, JAX backend), the runtime that validates Keras presets, in its own venv: it pins its own
# jax and keras. The pins (the whole installed set, without TensorFlow) are in KERAS_REQS.
KERAS_VENV := build/keras-venv
KERAS_STAMP := $(KERAS_VENV)/.installed
KERAS_REQS := requirements/keras-runtime.txt

.PHONY: venv demo artifacts demo-model llamacpp-src gemma-venv modelopt-venv keras-venv test test-gpu lint bench bench-gpu fuzz clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,ray,gpu]'
	touch $(STAMP)

demo-model: $(DEMO)/config.json $(OFFGRID)/config.json

$(DEMO)/config.json: | $(STAMP)
	$(BIN)/gemport demo-model --out $(DEMO)

$(OFFGRID)/config.json: | $(STAMP)
	$(BIN)/gemport demo-model --offgrid --out $(OFFGRID)

llamacpp-src: $(LLAMACPP_SRC)/convert_hf_to_gguf.py

$(LLAMACPP_SRC)/convert_hf_to_gguf.py: | $(STAMP)
	$(BIN)/pip download --quiet --no-binary :all: --no-deps llama-cpp-python==$(LLAMACPP_VERSION) -d build/llama.cpp
	tar -xzf build/llama.cpp/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz -C build/llama.cpp
	touch $@

gemma-venv: $(GEMMA_STAMP)

# --no-deps: the requirements file is the complete set; pip's resolver never runs (see the file's header).
# --prefer-binary: wheels throughout, but for promise (a tensorflow-datasets dependency), an sdist only.
$(GEMMA_STAMP): $(GEMMA_REQS)
	rm -rf $(GEMMA_VENV)
	$(PYTHON) -m venv $(GEMMA_VENV)
	$(GEMMA_VENV)/bin/pip install --quiet --no-deps --prefer-binary -r $(GEMMA_REQS)
	$(GEMMA_VENV)/bin/python -I -c "from gemma import gm; gm.ckpts.load_params; gm.nn.Gemma3_270M"
	touch $@

modelopt-venv: $(MODELOPT_STAMP)

# --no-deps: the requirements file is the complete set; pip's resolver never runs (see the file's header).
# The check also proves torch is the CPU build.
$(MODELOPT_STAMP): $(MODELOPT_REQS)
	rm -rf $(MODELOPT_VENV)
	$(PYTHON) -m venv $(MODELOPT_VENV)
	$(MODELOPT_VENV)/bin/pip install --quiet --no-deps --prefer-binary -r $(MODELOPT_REQS)
	$(MODELOPT_VENV)/bin/python -I -W ignore -c "import modelopt.torch.export as e, modelopt.torch.quantization as q, torch, transformers; e.export_tensorrt_llm_checkpoint; q.INT4_AWQ_CFG; transformers.GemmaForCausalLM; assert torch.version.cuda is None, torch.__version__"
	touch $@

keras-venv: $(KERAS_STAMP)

# --no-deps: the requirements file is the complete set (no tensorflow-text, no TensorFlow; see its header).
$(KERAS_STAMP): $(KERAS_REQS)
	rm -rf $(KERAS_VENV)
	$(PYTHON) -m venv $(KERAS_VENV)
	$(KERAS_VENV)/bin/pip install --quiet --no-deps --prefer-binary -r $(KERAS_REQS)
	KERAS_BACKEND=jax JAX_PLATFORMS=cpu $(KERAS_VENV)/bin/python -I -c "import keras, keras_hub; assert keras.backend.backend() == 'jax'; keras_hub.models.GemmaCausalLM; keras_hub.models.Gemma3CausalLM; import sentencepiece, h5py"
	touch $@

# Four artifacts of the demo model, each validated in its runtime: the table, then build/demo/report.png.
demo: demo-model
	$(BIN)/gemport build recipes/demo.toml --out build/demo

# Every writer gemport has (README, Artifact builds): make artifacts [RECIPE=...] [OUT=...]
RECIPE ?= recipes/gemma-3-270m.toml
artifacts: demo-model gemma-venv keras-venv
	$(BIN)/gemport build $(RECIPE) $(if $(OUT),--out $(OUT))

test: demo-model llamacpp-src gemma-venv modelopt-venv keras-venv
	$(BIN)/ruff check gemport converters quantizers validation tests bench
	$(BIN)/python -m pytest -q -ra

# Coverage-guided fuzzing of every reader (tests/fuzz; atheris). `make test` runs each target briefly
# (tests/fuzz/test_fuzz.py); this runs FUZZ_RUNS executions per target, or FUZZ_SECONDS each when set.
# jax-orbax goes through Orbax's own metadata parse (about 120 runs a second): FUZZ_ORBAX_RUNS.
# Findings are saved under tests/fuzz/findings/; figures in build/fuzz/results/ (bench/RESULTS.md, Fuzzing).
FUZZ_RUNS ?= 200000
FUZZ_ORBAX_RUNS ?= 20000
FUZZ_SECONDS ?=
FUZZ_TARGETS ?= gguf safetensors hf-folder config compressed-tensors jax gemma-pytorch onnx
FUZZ_BUDGET = $(if $(FUZZ_SECONDS),--seconds $(FUZZ_SECONDS),--runs $(FUZZ_RUNS))

fuzz: venv
	$(BIN)/python -m tests.fuzz.run $(FUZZ_TARGETS) $(FUZZ_BUDGET)
	$(BIN)/python -m tests.fuzz.run jax-orbax $(if $(FUZZ_SECONDS),--seconds $(FUZZ_SECONDS),--runs $(FUZZ_ORBAX_RUNS))

bench: demo-model
	$(BIN)/python bench/convert_memory.py

# The GPU tier (issue 17): the gpu-marked tests (each skipped with its reason where no GPU is visible):
# the Triton kernels compiled and run on CUDA against their CPU references (tests/test_gpu.py) and
# `gemport validate --device cuda` against the CPU runtimes (tests/test_kernel_runtime.py), each file in
# a pytest process of its own (the kernels are compiled or interpreted as chosen at their first import);
# and the prepared GPU check (bench/gpu_check.sh: those tests + bench/kernels.py inside 8 minutes, a
# Markdown report in $$OUT or build/bench/gpu). Neither builds the venv: a GPU machine has its own torch
# and triton, and its python3 runs them when there is no .venv.
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_TESTS := tests/test_gpu.py tests/test_kernel_runtime.py

test-gpu:
	rc=0; for f in $(GPU_TESTS); do $(GPU_PYTHON) -m pytest -q -ra -m gpu $$f || rc=1; done; exit $$rc

bench-gpu:
	PYTHON=$(GPU_PYTHON) bash bench/gpu_check.sh

clean:
	rm -rf build $(VENV)
