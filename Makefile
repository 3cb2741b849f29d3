# The set-up commands (README): `make demo`, `make test` and `make lint`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
STAMP := $(VENV)/.installed
# The exact tested versions (setup.cfg declares ranges): CI installs exactly these.
CONSTRAINTS := .ci/constraints.txt

.PHONY: test test-next test-cluster lint demo install data clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# pip byte-compiles every installed file (TensorFlow's thousands: 70 of the 131 s of a fresh
# install here), and that stays: with PYTHONDONTWRITEBYTECODE=1 (this CI image sets it)
# Python never writes what it compiles, so --no-compile made every process compile jax,
# flax, orbax... from source at each start.
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

# The tests start ~150 processes (python -m adpe_jax.main ...): our package's bytecode is
# written once before them (compileall writes it even under PYTHONDONTWRITEBYTECODE=1, which
# this CI image sets), instead of every process compiling adpe_jax from source (~1 s each).
test: install data
	$(PY) -m compileall -q adpe_jax >/dev/null
	XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
	  $(PY) -m pytest -q -n 2 --dist loadfile tests

# The second lane: Python 3.12 (pyenv's, next to the default), the newest jax of setup.cfg's
# range and the flax that goes with it, no TensorFlow, no torch -- the model, kernels, step,
# sharded kernel, fidelity and checkpoint tests, a TF-free run of every task, and a built
# tfds dataset read with tensorflow-datasets but no TensorFlow.
PYTHON_NEXT ?= $(shell for p in "$$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python $$(command -v python3.12); do "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)
VENV_NEXT := .venv-next
NEXT_TESTS := tests/test_kernels.py tests/test_sharded_kernel.py tests/test_fidelity.py \
  tests/test_train_step.py tests/test_model.py tests/test_checkpoint.py tests/test_tf_free.py

$(VENV_NEXT)/.installed: setup.cfg pyproject.toml .ci/constraints-next.txt
	@test -n "$(PYTHON_NEXT)" || { echo "make test-next needs Python 3.12 (pyenv install 3.12, or PYTHON_NEXT=...)"; exit 1; }
	$(PYTHON_NEXT) -m venv $(VENV_NEXT)
	$(VENV_NEXT)/bin/python -m pip install -q --upgrade pip
	$(VENV_NEXT)/bin/python -m pip install -q -c .ci/constraints-next.txt -e . pytest pytest-xdist safetensors \
	  tensorflow-datasets
	touch $@

test-next: $(VENV_NEXT)/.installed data
	$(VENV_NEXT)/bin/python -m compileall -q adpe_jax >/dev/null
	XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
	  $(VENV_NEXT)/bin/python -m pytest -q -n 2 --dist loadfile $(NEXT_TESTS)

# A real scheduler and a real network (tests/test_cluster.py; launch/README.md): a one-node
# SLURM (Debian's slurm-wlm and munge, installed here when missing, as root with apt) and two
# network namespaces joined by a veth pair, started and removed by the tests themselves.
CLUSTER_PACKAGES := slurm-wlm munge
test-cluster: install data
	@if ! command -v slurmd >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian packages $(CLUSTER_PACKAGES)"; \
	  (apt-get install -y -qq --no-install-recommends $(CLUSTER_PACKAGES) >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq --no-install-recommends $(CLUSTER_PACKAGES))); \
	fi
	XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
	  $(PY) -m pytest -q -p no:xdist tests/test_cluster.py

lint: install
	$(VENV)/bin/ruff check adpe_jax configs launch tests benchmarks

demo: install data
	$(PY) -m adpe_jax.main --config=configs/demo.py --workdir=runs/demo

clean:
	rm -rf $(VENV) $(VENV_NEXT) runs
