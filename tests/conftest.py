"""Shared test set-up: fake CPU devices before JAX starts, paths to the test data."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

DATA = pathlib.Path(__file__).parent / "data"


# Identical computations (e.g. the smoke configs that differ only in their docstrings)
# compile once per test run.
import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(__file__).parent.parent / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
