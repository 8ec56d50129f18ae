# Every target sets itself up on a fresh machine: it creates .venv when missing and installs
# the project with the extras it needs. torch is installed first, pinned, so that the extras'
# own requirements never pull another torch; where pip is set up with a local CPU wheel (as on
# our CI machines) that is the quick CPU build, elsewhere it is PyPI's default build.
# Override the requirement with `make test TORCH=...`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# The examples read SST-2 from MINIPEFT_DATA_DIR, else download GLUE's copy once. CI has a
# shared copy next to the checkout: used when it is there and the variable is not set.
SHARED_SST2 := $(abspath ../shared/data/sst2)
ifneq ($(wildcard $(SHARED_SST2)/train.tsv),)
export MINIPEFT_DATA_DIR ?= $(SHARED_SST2)
endif

.PHONY: demo test test-slow bench bench-gpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,bench,examples]"
	touch $@

# runs/demo is the demo's own folder: --overwrite replaces the previous demo run there, so
# `make demo` can run again (the example refuses a folder with a run in it otherwise)
demo: $(VENV)/.installed
	$(PY) examples/lora_text_classification.py --output-dir runs/demo --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_mixed_batch.py

bench-gpu: $(VENV)/.installed
	$(PY) benchmarks/bench_lora_linear.py
	$(PY) benchmarks/bench_train_step.py --device cuda
	$(PY) benchmarks/bench_inference.py --device cuda
	$(PY) benchmarks/bench_mixed_batch.py --device cuda

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
