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

# The fast suite, with its 15 slowest tests, in TEST_WORKERS processes (pytest-xdist; each takes
# whole files, one thread each: tests/conftest.py); `make test-slow` runs the long checks (a wheel
# build, the budget benchmark end to end, DDP preemption) one at a time.
TEST_WORKERS ?= 2
test: $(STAMP) fashion-mnist
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=15

test-slow: $(STAMP) fashion-mnist
	$(PY) -m pytest -q -m slow --durations=15

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks notebooks
	$(PY) -m ruff format --check src tests benchmarks notebooks

format: $(STAMP)
	$(PY) -m ruff format src tests benchmarks notebooks
	$(PY) -m ruff check --fix src tests benchmarks notebooks

bench: $(STAMP)
	$(PY) benchmarks/throughput.py --model vit_b --target hog --batch 8 --steps 5

# Fashion-MNIST from Debian's dataset-fashion-mnist (root and apt needed). Without it the tests
# that use it are skipped, except under CI=true, where this target and those tests fail.
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
fashion-mnist:
	@test -d $(FMNIST_DIR) || { command -v apt-get >/dev/null && \
	  { apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; }; }; \
	test -d $(FMNIST_DIR) || case "$$(echo "$${CI:-}" | tr A-Z a-z)" in \
	  true|1|yes) echo "error: could not install dataset-fashion-mnist into $(FMNIST_DIR) (apt-get as root); under CI=true the Fashion-MNIST tests must run, not be skipped" >&2; exit 1;; \
	  *) echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped";; \
	esac

clean:
	rm -rf outputs multirun wandb .pytest_cache
