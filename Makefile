# The set-up commands (README): `make demo`, `make test` and `make lint`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
STAMP := $(VENV)/.installed
# The exact tested versions (setup.cfg declares ranges): CI installs exactly these.
CONSTRAINTS := .ci/constraints.txt

.PHONY: test lint demo install data clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test,lint]'
	touch $(STAMP)

install: $(STAMP)

# Debian's dataset-fashion-mnist (the real upstream images) when missing and apt is here.
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian package dataset-fashion-mnist"; \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) ; \
	  else echo "Fashion-MNIST missing and apt-get unavailable: install dataset-fashion-mnist"; fi; \
	fi

test: install data
	XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
	  $(PY) -m pytest -q -n 2 --dist loadfile tests

lint: install
	$(VENV)/bin/ruff check adpe_jax configs launch tests benchmarks

demo: install data
	$(PY) -m adpe_jax.main --config=configs/demo.py --workdir=runs/demo

clean:
	rm -rf $(VENV) runs
