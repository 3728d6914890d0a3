# The two commands of the README: `make demo` and `make test`. Each builds its own venv.
PYTHON ?= python3
VENV   ?= .venv
# The torch build the project is tested with; override for another CUDA/CPU build.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
BIN    := $(VENV)/bin

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/biodino demo --out demo

test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV)
