# Two entry points a new user needs (README): `make demo` and `make test`. Each creates the virtualenv and
# installs requirements.txt (pinned CPU torch) on first use; later calls reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= runs/demo

.PHONY: setup demo test bench clean-venv

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt 2> $(VENV)/pip.log || (cat $(VENV)/pip.log; exit 1)
	$(VENV)/bin/pip install -q --no-deps -e . 2>> $(VENV)/pip.log || (cat $(VENV)/pip.log; exit 1)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m eval.sample pixart --tiny --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m eval.bench_operators

clean-venv:
	rm -rf $(VENV)
