"""Shared test set-up: fake CPU devices before JAX starts, paths to the test data."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

DATA = pathlib.Path(__file__).parent / "data"
