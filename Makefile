# `make test` and `make demo` work from a fresh clone with only Python 3.9+ on the PATH.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: test test-slow test-all check-install demo serve clean-demo venv

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml scripts/install_torch.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	bash scripts/install_torch.sh $(BIN)/pip
	# the serve and ui extras too: the test suite runs the server and its web page; demo: the CJK font
	$(BIN)/pip install -q -e '.[serve,ui,test,demo]'
	# taming-transformers is the parity reference; its declared deps (lightning, torchvision) are not needed.
	$(BIN)/pip install -q --no-deps taming-transformers==0.0.1
	touch $@

# Tests use tiny models and spawn worker processes: one thread each avoids oversubscribing the cores.
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# The fast suite (a few minutes on 2 CPU cores).
test: venv
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Only the checks marked slow (the full-size parity checks): CI runs `make test`, then these.
test-slow: venv
	$(TEST_ENV) $(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# Everything, the full-size parity checks included.
test-all: venv
	$(TEST_ENV) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# A plain `pip install .` (not editable) into a fresh venv: the demo and the shipped configs work from it.
check-install: venv
	bash scripts/check_install.sh $(BIN)/python

demo: venv
	$(BIN)/python -m tokenpaint.demo --out demo

# Serve the model `make demo` trained (the masked transformer; MODEL=demo/gpt for the GPT) on 127.0.0.1:7860.
MODEL ?= demo/mim
SERVE_ARGS ?=
serve: venv
	@test -f $(MODEL)/config.json || { echo "no model in $(MODEL): run 'make demo' first (or make serve MODEL=RUN_DIR)"; exit 1; }
	$(BIN)/python -m tokenpaint.serve --model $(MODEL) $(SERVE_ARGS)

clean-demo:
	rm -rf demo
