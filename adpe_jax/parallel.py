"""Processes, the (data, fsdp) mesh and the shardings of state and batch.

* `initialize_distributed(config)`: joins a multi-process run (what the launch is:
  `supervisor.detect_launch`, decided without JAX).  A peer that stops sending heartbeats
  for `distributed.heartbeat_timeout_seconds` makes JAX stop the others.
* `decide_on_process0(key, decide, timeout_s)`: process 0 decides, every process hears
  the verdict (the config agreement below, the workdir lock), through JAX's coordination
  service (`adpe_jax.jax_compat`: the package's one use of private jax).
* `agree_on_config(config)`: right after joining, every process's config is compared with
  process 0's; a difference is refused (ConfigError) by every process before anything
  compiles or is written.
* `make_mesh(devices, data=-1, fsdp=1)`: a 2-axis mesh (`jax.make_mesh`, which lays the
  devices out for the interconnect); -1 = the rest of the devices.
* `batch_sharding(mesh)`: the leading (example) axis over both axes.
* `under_mesh(fn, mesh)`: `fn` traced with `mesh` in context, so that the Pallas attention
  inside runs under shard_map over the batch (`adpe_jax.kernels.attention`).
* `state_shardings(mesh, tree)`: FSDP -- the largest axis (divisible by the fsdp size) of
  every tensor of at least `min_size` elements and 2 dimensions over `fsdp`, everything
  else replicated; the rule is shape-based, so optimizer moments follow their params.
  A scanned model's stacked block tensors (`adpe_jax.layout`) get the rule of one
  block's tensor, with the leading depth axis never sharded.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Callable

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from adpe_jax import errors, jax_compat, layout, supervisor
from adpe_jax.checkpoint import rundir
from adpe_jax.errors import AdpeError, ConfigError, MeshError

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
FSDP_MIN_SIZE = 2 ** 14   # tensors smaller than this stay replicated


def initialize_distributed(config=None) -> bool:
  """Starts JAX's distributed runtime when this is a multi-process launch
  (`supervisor.detect_launch`); True if so.

  Explicit: config.distributed.coordinator_address (+ num_processes, process_id) or the
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment.  Otherwise
  SLURM (> 1 task), a multi-host TPU slice or GKE (JOBSET / indexed jobs) are detected by
  `jax.distributed.initialize()` itself.  CPU collectives use gloo, so the same code runs
  as several processes on one machine (the tests do).
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  launch = supervisor.detect_launch(config)
  address, num, pid = launch.coordinator, launch.num_processes, launch.process_id
  if address and (num < 1 or pid < 0):
    raise MeshError(
        f"config field distributed.coordinator_address={address!r} needs "
        f"distributed.num_processes (got {num}) and distributed.process_id (got {pid}), or "
        f"JAX_NUM_PROCESSES / JAX_PROCESS_ID.")
  if not launch.multi_process:
    return False
  d = getattr(config, "distributed", None)
  timeouts = {}
  if d is not None:
    timeouts = dict(heartbeat_timeout_seconds=int(d.heartbeat_timeout_seconds),
                    initialization_timeout=int(d.initialization_timeout_seconds))
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  init_timeout = int(d.initialization_timeout_seconds) if d is not None else 300
  supervisor.report("joining", process=pid, processes=num, coordinator=address,
                    initialization_timeout=init_timeout,
                    heartbeat_timeout=timeouts.get("heartbeat_timeout_seconds", 100))
  try:
    if address:
      jax.distributed.initialize(coordinator_address=address, num_processes=num,
                                 process_id=pid, **timeouts)
    else:
      jax.distributed.initialize(**timeouts)
  except Exception as e:  # a failure JAX raises rather than aborts on
    where = f"the coordinator at {address}" if address else "the auto-detected coordinator"
    first = " ".join(str(e).split())[:300]
    raise MeshError(
        f"process {pid if pid >= 0 else '?'} could not join the run of "
        f"{num if num > 0 else '?'} processes at {where} within "
        f"distributed.initialization_timeout_seconds={init_timeout} s ({type(e).__name__}: "
        f"{first}); start the same command on every host, check that the coordinator is "
        f"reachable, or raise distributed.initialization_timeout_seconds.") from e
  supervisor.report("joined", process=jax.process_index(), processes=jax.process_count(),
                    coordinator=address or jax_compat.coordinator_address())
  logging.info("process %d of %d joined (%d local / %d global devices)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def decide_on_process0(key: str, decide: Callable[[dict[int, str]], str], timeout_s: float, *,
                       what: str, error: type[AdpeError] = AdpeError,
                       share: str | None = None, client=None, process_index: int | None = None,
                       process_count: int | None = None) -> str:
  """Process 0 decides, every process hears: process 0 calls `decide(shared)`, and the
  string it returns reaches every process under `key` of JAX's coordination service and is
  returned on each.  `share`: this process's own text; process 0's `decide` gets every
  process's as {index: text} (else {}).

  The coordination service's key-value store, not a collective
  (`multihost_utils.broadcast_one_to_all`): strings of any length, no compiled computation
  (the processes agree before the mesh, a compile or a write), and a process that waits
  gives up after `timeout_s` rather than hanging.  If `decide` raises on process 0, it
  re-raises there and every other process raises too: an adpe_jax error with process 0's
  own sentence (and class), anything else as `error` "process 0 failed to <what>"; no word
  within `timeout_s`: `error` naming the waiting process.  `client`, `process_index`,
  `process_count` default to this process's (tests pass their own).
  """
  client = jax_compat.coordination_client() if client is None else client
  me = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  timeout_ms = int(timeout_s * 1000)
  if share is not None:
    client.key_value_set(f"{key}/share/{me}", share)
  if me == 0:
    try:
      shared = {} if share is None else {
          i: share if i == 0 else client.blocking_key_value_get(f"{key}/share/{i}", timeout_ms)
          for i in range(n)}
      verdict = decide(shared)
    except BaseException as e:
      told = e if isinstance(e, AdpeError) else error(
          f"process 0 failed to {what} ({type(e).__name__}: {e}); see its log, then re-run.")
      client.key_value_set(key, json.dumps({"error": type(told).__name__,
                                            "message": str(told)}))
      raise
    client.key_value_set(key, json.dumps({"verdict": verdict}))
    return verdict
  try:
    answer = json.loads(client.blocking_key_value_get(key, timeout_ms))
  except Exception as e:  # a deadline, a lost coordinator
    raise error(
        f"process {me} of {n} had no word from process 0 within {timeout_s:.0f} s "
        f"({type(e).__name__}) when it was to {what}; see process 0's log, then re-run the "
        f"same command on every process.") from e
  if "verdict" in answer:
    return answer["verdict"]
  message = answer.get("message") or f"process 0 failed to {what}; see its log, then re-run."
  cls = getattr(errors, str(answer.get("error")), None)
  try:
    told = cls(message) if isinstance(cls, type) and issubclass(cls, AdpeError) else None
  except TypeError:  # an error whose fields are not a sentence (BadImageError)
    told = None
  raise told or error(message)


# Fields that may differ between the processes of one run: who it is, how it names the
# coordinator, and host-local tuning (threads, the compilation cache directory).
PER_PROCESS_FIELDS = ("distributed.process_id", "distributed.coordinator_address",
                      "data.num_threads", "compilation_cache")
_KEY = "adpe_jax/config"


def _flat_config(config, workdir=None) -> dict:
  fields = rundir.config_fields(config)  # the one flattening (config.json, the saved run)
  if workdir is not None:
    fields["--workdir"] = str(workdir)
  return {k: v for k, v in fields.items() if k not in PER_PROCESS_FIELDS}


def config_mismatch(mine: dict, theirs: dict[int, dict], limit: int = 4) -> str | None:
  """The sentence naming the processes whose fields differ from process 0's (`mine`), or
  None.  `theirs`: process index -> its flat config (`rundir.diff`, the one config diff)."""
  parts = []
  for i, other in sorted(theirs.items()):
    changes = rundir.diff(mine, other)
    if changes:
      shown = ", ".join(f"{c.field}={c.new!r} (process 0: {c.old!r})" for c in changes[:limit])
      more = f" and {len(changes) - limit} more fields" if len(changes) > limit else ""
      parts.append(f"process {i} has {shown}{more}")
  if not parts:
    return None
  n = len(theirs) + 1
  return (f"the {n} processes of this run were started with different configs: "
          f"{'; '.join(parts)}; start every process with the same --config, overrides and "
          f"--workdir (only {', '.join(PER_PROCESS_FIELDS)} may differ); nothing on disk "
          f"was changed.")


def agree_on_config(config, workdir=None) -> None:
  """Several processes: every process shares its config (less `PER_PROCESS_FIELDS`);
  process 0 compares each with its own and every process hears the verdict
  (`decide_on_process0`).  A mismatch raises ConfigError on every process (the same
  sentence, naming the processes and fields), before the mesh, the compile or any write.
  Before raising, the processes leave the service together (`jax.distributed.shutdown`),
  so that process 0's exit does not abort the others."""
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return
  text = json.dumps(_flat_config(config, workdir), sort_keys=True, default=str)

  def compare(shared: dict[int, str]) -> str:
    theirs = {i: json.loads(t) for i, t in shared.items() if i and t != text}
    return config_mismatch(json.loads(text), theirs) or ""

  d = getattr(config, "distributed", None)
  verdict = decide_on_process0(
      _KEY, compare, float(d.initialization_timeout_seconds if d is not None else 300),
      what="compare the configs of the processes", error=ConfigError, share=text)
  if verdict:
    jax.distributed.shutdown()
    raise ConfigError(verdict)


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
