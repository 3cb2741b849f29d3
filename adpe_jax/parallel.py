"""Processes, the (data, fsdp) mesh and the shardings of state and batch.

* `initialize_distributed(config)`: joins a multi-process run (TPU pod slices, SLURM,
  GKE auto-detected by `jax.distributed.initialize()`; otherwise config.distributed.* or
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).  A peer that stops
  sending heartbeats for `distributed.heartbeat_timeout_seconds` makes JAX stop the others.
* `make_mesh(devices, data=-1, fsdp=1)`: a 2-axis mesh (`jax.make_mesh`, which lays the
  devices out for the interconnect); -1 = the rest of the devices.
* `batch_sharding(mesh)`: the leading (example) axis over both axes.
* `under_mesh(fn, mesh)`: `fn` traced with `mesh` in context, so that the Pallas attention
  inside runs under shard_map over the batch (`adpe_jax.kernels.attention`).
* `state_shardings(mesh, tree)`: FSDP -- the largest axis (divisible by the fsdp size) of
  every tensor of at least `min_size` elements and 2 dimensions over `fsdp`, everything
  else replicated; the rule is shape-based, so optimizer moments follow their params.
  A scanned model's stacked block tensors (`adpe_jax.models.layout`) get the rule of one
  block's tensor, with the leading depth axis never sharded.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from adpe_jax.errors import MeshError
from adpe_jax.models import layout  # flax-free: adpe_jax.models re-exports nothing

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
FSDP_MIN_SIZE = 2 ** 14   # tensors smaller than this stay replicated


def _distributed_initialized() -> bool:
  is_init = getattr(jax.distributed, "is_initialized", None)
  if is_init is not None:
    return bool(is_init())
  from jax._src import distributed  # noqa: PLC0415 (older jax)
  return distributed.global_state.client is not None


def multi_process_launch(config=None) -> bool:
  """Whether this process is one of several (what `initialize_distributed` will join),
  decided without starting JAX's backend (which must not start before it joins)."""
  d = getattr(config, "distributed", None)
  address = (d.coordinator_address if d is not None else "") or os.environ.get(
      "JAX_COORDINATOR_ADDRESS", "")
  num = (d.num_processes if d is not None else 0) or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
  if address:
    return num != 1
  return (int(os.environ.get("SLURM_NTASKS", "1")) > 1
          or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
          or "JOBSET_NAME" in os.environ or "JOB_COMPLETION_INDEX" in os.environ)


def initialize_distributed(config=None) -> bool:
  """Starts JAX's distributed runtime when this is a multi-process launch; True if so.

  Explicit: config.distributed.coordinator_address (+ num_processes, process_id) or the
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment.  Otherwise
  SLURM (> 1 task), a multi-host TPU slice or GKE (JOBSET / indexed jobs) are detected by
  `jax.distributed.initialize()` itself.  CPU collectives use gloo, so the same code runs
  as several processes on one machine (the tests do).
  """
  if _distributed_initialized():
    return jax.process_count() > 1
  d = getattr(config, "distributed", None)
  address = (d.coordinator_address if d is not None else "") or os.environ.get(
      "JAX_COORDINATOR_ADDRESS", "")
  num = (d.num_processes if d is not None else 0) or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
  pid = d.process_id if d is not None and d.process_id >= 0 else int(
      os.environ.get("JAX_PROCESS_ID", "-1"))
  timeouts = {}
  if d is not None:
    timeouts = dict(heartbeat_timeout_seconds=int(d.heartbeat_timeout_seconds),
                    initialization_timeout=int(d.initialization_timeout_seconds))
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  gke = "JOBSET_NAME" in os.environ or "JOB_COMPLETION_INDEX" in os.environ
  if address:
    if num < 1 or pid < 0:
      raise MeshError(
          f"config field distributed.coordinator_address={address!r} needs "
          f"distributed.num_processes (got {num}) and distributed.process_id (got {pid}), or "
          f"JAX_NUM_PROCESSES / JAX_PROCESS_ID.")
    if num == 1:
      return False
  elif not (slurm or tpu_pod or gke):
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if address:
    jax.distributed.initialize(coordinator_address=address, num_processes=num,
                               process_id=pid, **timeouts)
  else:
    jax.distributed.initialize(**timeouts)
  logging.info("process %d of %d joined (%d local / %d global devices)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


# Kept for callers of the first version.
maybe_initialize_distributed = initialize_distributed


def mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
  """(data, fsdp) sizes; -1 = the rest of the devices.  Raises MeshError naming the field."""
  if fsdp == -1 and data == -1:
    raise MeshError("config fields mesh.data and mesh.fsdp are both -1; set one of them.")
  for name, v in (("mesh.data", data), ("mesh.fsdp", fsdp)):
    if v == 0 or v < -1:
      raise MeshError(f"config field {name}={v} must be a positive integer or -1.")
  given = f"mesh.data={data} x mesh.fsdp={fsdp}"
  if fsdp == -1:
    fsdp, rest = num_devices // data, num_devices % data
  elif data == -1:
    data, rest = num_devices // fsdp, num_devices % fsdp
  else:
    rest = 0
  if rest or data * fsdp != num_devices or data < 1 or fsdp < 1:
    raise MeshError(f"config fields {given} do not make the {num_devices} devices of this "
                    f"run; use sizes whose product is {num_devices}, or -1 for one of them.")
  return data, fsdp


def make_mesh(devices=None, data: int = -1, fsdp: int = 1) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: all), axis types Auto."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(len(devices), data, fsdp)
  try:
    return jax.make_mesh(shape, BATCH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)
  except Exception:  # noqa: BLE001 (a device subset make_mesh cannot lay out: keep order)
    return Mesh(np.asarray(devices).reshape(shape), BATCH_AXES,
                axis_types=(AxisType.Auto,) * 2)


def mesh_from_config(config, devices=None) -> Mesh:
  return make_mesh(devices, config.mesh.data, config.mesh.fsdp)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over data and fsdp together."""
  return NamedSharding(mesh, P(BATCH_AXES))


def under_mesh(fn, mesh):
  """`fn` with `mesh`'s abstract mesh in context while it is traced (wrap it before
  `jax.jit`).  The Pallas attention reads the mesh from the context to shard_map itself
  over the batch (a pallas_call is opaque to GSPMD); nothing else changes, since the
  axes are Auto.  Trace-time only: no global state, so one process can trace steps for
  different meshes (the tests do).  `jax.set_mesh(mesh)` around the jit call does the
  same for code outside this package."""
  abstract = mesh.abstract_mesh

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(abstract):
      return fn(*args, **kwargs)

  return traced


def batch_divisor(mesh: Mesh) -> int:
  return mesh.shape[DATA] * mesh.shape[FSDP]


def leaf_spec(shape, fsdp_size: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """The FSDP rule for one tensor: its largest axis divisible by fsdp_size, or replicated."""
  if fsdp_size <= 1 or len(shape) < 2 or math.prod(shape) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda i: (-shape[i], i))
  for axis in order:
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = FSDP
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, tree, min_size: int = FSDP_MIN_SIZE):
  """NamedShardings for every leaf of `tree` (shapes: arrays or ShapeDtypeStructs).

  Leaves under a scanned `blocks` / `decoder_blocks` entry are (depth, *block shape): the
  block shape decides as unrolled, and the depth axis stays unsharded.
  """
  size = mesh.shape[FSDP]

  def one(path, x):
    shape = tuple(getattr(x, "shape", ()))
    if shape and layout.is_stacked(path):
      return NamedSharding(mesh, P(None, *leaf_spec(shape[1:], size, min_size)))
    return NamedSharding(mesh, leaf_spec(shape, size, min_size))

  return jax.tree_util.tree_map_with_path(one, tree)


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Assemble per-process host arrays into global jax Arrays sharded over (data, fsdp)."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def sharding_overview(tree, shardings, title: str = "state") -> str:
  """A one-screen table: the largest tensors with shape, spec and bytes per device; totals."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  rows, total, per_device = [], 0, 0
  for (path, x), s in zip(leaves, specs):
    shape = tuple(getattr(x, "shape", ()))
    nbytes = math.prod(shape) * np.dtype(x.dtype).itemsize
    shard = s.shard_shape(shape) if shape else ()
    local = math.prod(shard) * np.dtype(x.dtype).itemsize
    total += nbytes
    per_device += local
    rows.append((nbytes, jax.tree_util.keystr(path), shape, s.spec, local))
  rows.sort(key=lambda r: -r[0])
  lines = [f"{title}: {len(rows)} arrays, {total / 2**20:.1f} MiB in all, "
           f"{per_device / 2**20:.1f} MiB per device"]
  for nbytes, name, shape, spec, local in rows[:12]:
    lines.append(f"  {name[:60]:60s} {str(shape):18s} {str(spec):26s} {local / 2**20:8.2f} MiB/dev")
  if len(rows) > 12:
    rest = sum(r[4] for r in rows[12:])
    lines.append(f"  ... {len(rows) - 12} smaller arrays, {rest / 2**20:.2f} MiB per device")
  return "\n".join(lines)
