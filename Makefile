# Two entry points, each sets everything up on a fresh machine first:
#   make demo   -> the main job (`sinai demo` on the embedded MNIST default)
#   make test   -> the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/sinai demo

test: $(VENV)/.installed
	$(BIN)/pytest -q

bench: $(VENV)/.installed
	$(BIN)/sinai bench defenses
