# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
# torch comes from pip's index: PyPI serves Linux the CUDA build (several GB). For the small CPU build
# set TORCH_INDEX=https://download.pytorch.org/whl/cpu; for another version, e.g. TORCH_SPEC="torch>=2.6".
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

# `make reproduce DATASET=Scientific` (Instrument, Office, or demo: synthetic data, no network);
# IMPORT=DIR uses the authors' stored hidden states; REPRODUCE_FLAGS passes more (e.g. --no-fetch).
DATASET ?= Scientific
IMPORT ?=
REPRODUCE_FLAGS ?=

.PHONY: install demo test lint clean reproduce

$(BIN)/iisan: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/iisan

install: $(BIN)/iisan

demo: install
	$(BIN)/iisan demo --out demo_data

reproduce: install
	$(BIN)/python scripts/reproduce.py --dataset $(DATASET) $(if $(IMPORT),--import-from $(IMPORT)) $(REPRODUCE_FLAGS)

# The suite runs on every CPU (at most 8 workers), each test module's tests in one worker (loadscope: the
# suite has no test classes) so that its fixtures are built once; `make test TEST_FLAGS=` runs it in one process, as `pytest` alone does.
TEST_FLAGS ?= -n logical --maxprocesses 8 --dist loadscope

test: install
	$(BIN)/python -m pytest -q $(TEST_FLAGS)

lint: install
	$(BIN)/ruff check iisan tests scripts Code_Cached Code_Uncached Dataset

clean:  # what make and the demo made; never runs/, where `iisan train` keeps a researcher's results
	rm -rf $(VENV) demo_data .pytest_cache
