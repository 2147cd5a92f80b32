# Two entry points a new user needs (README): `make demo` and `make test`. Each creates the virtualenv and
# installs requirements.txt (pinned CPU torch) on first use; later calls reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= runs/demo

.PHONY: setup demo teacher test test-slurm bench clean-venv

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt 2> $(VENV)/pip.log || (cat $(VENV)/pip.log; exit 1)
	$(VENV)/bin/pip install -q --no-deps -e . 2>> $(VENV)/pip.log || (cat $(VENV)/pip.log; exit 1)
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded default: graft the shipped shapes teacher (50% of self-attention → Hyena-X, stage 1 →
# stage 2 on 2 CPU processes) and measure what the graft keeps: toy GenEval with baselines, fidelity to the teacher,
# speed. The last line printed is the report's path.
demo: $(STAMP)
	@$(PY) -m recipes.demo --out $(OUT)

# Reproduce models/shapes_teacher/ (about two hours on 2 CPU cores).
teacher: $(STAMP)
	$(PY) -m recipes.shapes_teacher

test: $(STAMP)
	$(PY) -m pytest -q tests

# The tests marked `slurm` on a real one-node Slurm cluster on localhost (Debian's slurm-wlm and munge, installed
# when missing if this is root), configured in a temporary folder and stopped at the end.
test-slurm: $(STAMP)
	GRAFTING_SLURM=local $(PY) -m pytest -q -m slurm tests/slurm

bench: $(STAMP)
	$(PY) -m eval.bench_operators

clean-venv:
	rm -rf $(VENV)
