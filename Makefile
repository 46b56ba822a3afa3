# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := build/models/gemma-3-270m
DEMO_OUT := build/demo/gemma-3-270m-f32
WINDOWS ?= 16

.PHONY: venv demo demo-model test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo-model: $(DEMO)/config.json

$(DEMO)/config.json: | $(STAMP)
	$(BIN)/gemport demo-model --out $(DEMO)

demo: demo-model
	rm -rf $(DEMO_OUT)
	$(BIN)/gemport convert $(DEMO) $(DEMO_OUT) --to hf --dtype f32
	$(BIN)/gemport validate $(DEMO_OUT) --reference $(DEMO) --windows $(WINDOWS) \
		--max-kld 1e-5 --max-ppl-delta 0.01 --json build/demo/validate.json

test: demo-model
	$(BIN)/ruff check gemport converters quantizers validation tests bench
	$(BIN)/python -m pytest -q -ra

bench: demo-model
	$(BIN)/python bench/convert_memory.py

clean:
	rm -rf build $(VENV)
