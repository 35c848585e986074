# lmim: two commands on a fresh machine.
#   make demo   LocalMIM pre-training of a small ViT on the photos bundled with scikit-image
#   make test   the test suite (what CI runs)
# Both create the virtual environment (.venv) when it is missing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo test test-slow lint format bench clean fashion-mnist

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lmim.train experiment=demo

test: $(STAMP) fashion-mnist
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks notebooks
	$(PY) -m ruff format --check src tests benchmarks notebooks

format: $(STAMP)
	$(PY) -m ruff format src tests benchmarks notebooks
	$(PY) -m ruff check --fix src tests benchmarks notebooks

bench: $(STAMP)
	$(PY) benchmarks/throughput.py --model vit_b --target hog --batch 8 --steps 5

# Fashion-MNIST from Debian's dataset-fashion-mnist (root and apt needed; the tests that use it
# are skipped without it).
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || { command -v apt-get >/dev/null && \
	  { apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; }; } || \
	  echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"

clean:
	rm -rf outputs multirun wandb .pytest_cache
