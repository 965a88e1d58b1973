# Every target installs what it needs: only `python3 -m venv` and pip are assumed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR := demo_out

.PHONY: install test demo lint bench bench-quick fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

# The whole suite on Keras' default backend (TensorFlow), then the tests marked `backend`
# (the Keras-side commands) again on JAX's CPU backend (JAX_PLATFORMS=cpu: no GPU probing).
test: $(STAMP)
	$(BIN)/python -m pytest -q
	KERAS_BACKEND=jax JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -m backend

lint: $(STAMP)
	$(BIN)/ruff check wavg tests bench scripts
	$(BIN)/ruff format --check wavg tests bench scripts
	$(BIN)/lint-imports --no-cache

demo: $(STAMP)
	bash scripts/demo.sh $(DEMO_DIR)

bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick

fuzz: $(STAMP)
	$(BIN)/python scripts/fuzz.py --cases 20000

clean:
	rm -rf $(DEMO_DIR) bench/out .pytest_cache .ruff_cache .hypothesis
