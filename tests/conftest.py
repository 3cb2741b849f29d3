"""Shared test set-up: fake CPU devices before JAX starts, paths to the test data."""

import os
import pathlib

from devices import CODEGEN, xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(4))
if CODEGEN and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + CODEGEN   # `make test` names only the device count
os.environ.setdefault("JAX_PLATFORMS", "cpu")

DATA = pathlib.Path(__file__).parent / "data"


# The runs tests start as subprocesses (python -m adpe_jax.main, compilation_cache=auto)
# share one persistent cache too: the smoke step many of them compile is compiled once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).parent.parent / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# Identical computations (e.g. the smoke configs that differ only in their docstrings)
# compile once per test run.
import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(__file__).parent.parent / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# The longest modules first (their time in a cold run, 2 cores): `make test` runs two
# pytest-xdist workers, one module each at a time (--dist loadfile: a module's fixtures
# compile once), and a long module started last would run alone at the end.  xdist's own
# order (modules with the most tests first) is switched off in `pytest_configure`.
_LONG_FIRST = ("test_adversary", "test_multihost", "test_finetune", "test_resume", "test_scan",
               "test_linprobe", "test_export", "test_kernels", "test_sharded_kernel",
               "test_fsdp", "test_fidelity", "test_refusals", "test_tf_free", "test_cli",
               "test_model")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):   # pytest-xdist's --no-loadscope-reorder
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_LONG_FIRST)}
  items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


# The scheduler and network tests start daemons and network namespaces as root and take
# minutes: `make test-cluster` runs them (pytest tests/test_cluster.py); `make test` does
# not collect them.
collect_ignore = ["test_cluster.py"]
