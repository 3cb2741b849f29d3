"""Mesh, shardings and multi-host initialisation (data parallel over axis `data`)."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def maybe_initialize_distributed() -> None:
  """Start JAX's own distributed runtime on multi-process launches (TPU pods, SLURM).

  TPU pod slices and SLURM are auto-detected by `jax.distributed.initialize()`; a plain
  launch is told by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
  """
  if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
    return
  explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]
  if explicit:
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif slurm or tpu_pod:
    jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
  """1-D data-parallel mesh over `devices` (default: all), axis type Auto."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over `data`."""
  return NamedSharding(mesh, P(DATA))


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Assemble per-process host arrays into global jax Arrays sharded over `data`."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local)
