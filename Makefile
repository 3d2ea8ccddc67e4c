# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
# The CPU build keeps installs small; on a GPU machine use e.g. TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test lint clean

$(BIN)/iisan: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/iisan

install: $(BIN)/iisan

demo: install
	$(BIN)/iisan demo --out demo_data

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check iisan tests scripts Code_Cached Code_Uncached Dataset

clean:
	rm -rf $(VENV) demo_data runs .pytest_cache
