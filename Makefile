# The two commands of README.md. Both create (or reuse) the venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/default
export JAX_COMPILATION_CACHE_DIR ?= $(HOME)/.cache/drt_jax/jax
# XLA:CPU's large buffers in transparent huge pages (glibc >= 2.35; ignored elsewhere): elementwise
# passes over the stacked agents run up to 3x faster (docs/performance.md, "Host memory in
# huge pages").
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: run test lint bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml drt_jax/install_data.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m drt_jax.install_data
	touch $(STAMP)

run: $(STAMP)
	$(PY) experiments/train.py --config=experiments/configs/default.py --workdir=$(RUN_DIR)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q --durations=15 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check drt_jax experiments tests benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks.train_step --host_devices 8
	$(PY) -m benchmarks.combine --host_devices 8
	$(PY) -m benchmarks.data_memory --host_devices 8

clean:
	rm -rf $(VENV) runs
