# Two commands for a fresh machine: `make demo` trains the demo preset on CPU, `make test` runs the tests.
# Both create (or reuse) .venv and install what they need. torch is installed only when none is importable,
# as the CPU build 2.13.0, so an existing (e.g. Colab's CUDA) torch is kept.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test quick lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# One intra-op thread: the demo's tiny tensors gain nothing from more, and lose a lot when cores are shared.
demo: install
	OMP_NUM_THREADS=1 $(VENV)/bin/atheria fit --preset demo

# Two workers (pytest-xdist): most tests wait on one single-threaded training, so two cores run two at once.
TEST_WORKERS ?= 2

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# The inner loop: everything but the tests marked slow (subprocess trainings, DDP, the kill storm, the notebook).
quick: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

lint: install
	$(VENV)/bin/ruff check atheria_lightning tests benchmarks scripts notebooks
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs runs_mirror .pytest_cache
