# Two commands for a fresh machine: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup demo demo-gan demo-t2i test test-t2i test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/privdiff compare -c configs/compare/quickstart.yaml

demo-gan: setup
	$(VENV)/bin/privdiff compare -c configs/compare/gan.yaml

demo-t2i: setup
	$(VENV)/bin/privdiff compare -c configs/compare/t2i_demo.yaml

test: setup
	$(PY) -m pytest -q --durations=15

test-t2i: setup
	PRIVDIFF_T2I_ACCEPTANCE=1 $(PY) -m pytest -q -s tests/eval/test_t2i_audit.py

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	$(PY) scripts/bench_knn.py
	$(PY) scripts/bench_dp.py
	$(PY) scripts/bench_dp_lora.py
	$(PY) scripts/bench_sampling.py
	$(PY) scripts/bench_audit.py

clean:
	rm -rf $(VENV) runs .pytest_cache
