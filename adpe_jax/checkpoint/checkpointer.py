"""Checkpoints of the train state (orbax): the Checkpointer, and the reads without one.

Layout: `WORKDIR/checkpoints/<step>/` with two orbax items (`rundir` names and lists them),

  state/  the TrainState (StandardCheckpointHandler, OCDBT/zarr, restored straight into
          the shardings of the abstract state it is given);
  meta/   JSON: the run metadata given to `Checkpointer` (model variant, pe, adversary...),
          the step and the data position (the input pipeline is a pure function of the
          step, so both are the same number), the identity of the training data
          (`adpe_jax.data.identity`; compared by the run's preflight, not by `restore`)
          and a checksum of every array leaf.

Saves are asynchronous: `maybe_save` returns once the arrays are copied off the devices
(so the caller may donate / overwrite the state at once) and the files are written by
a background thread. Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames
it to `<step>` only once everything (and `commit_success.txt`) is written, so a process
killed mid-save leaves at most a tmp directory, which `latest_step` / `restore` ignore
and the first save of the next run removes. Only the last `keep` checkpoints are kept;
older ones are removed after a newer one is complete.

`restore` never changes anything on disk: a checkpoint whose tree, shapes or dtypes differ
from the configured state, whose run metadata differs, whose files cannot be read, or
whose arrays do not match the checksums written with them raises `CheckpointError`.
A checkpoint of the other block layout (model.scan_blocks) is refused in one sentence
naming that field.

Without a Checkpointer (nothing created, no orbax manager): `read_meta(step_dir)` reads a
checkpoint's meta item (preflight, `weights.metadata`), `read_params(step_dir)` only its
`params` (to fine-tune, probe or export an encoder: `adpe_jax.weights.load`), and
`verify_checksums` is the one check of arrays against the checksums written with them.
`read_checkpoint(path)` is the readers' one read of both (export, config.init): beside a
live trainer that deletes the checkpoint being read, it reads the newest complete one.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from adpe_jax import phase, storage
from adpe_jax.checkpoint import rundir
from adpe_jax.checkpoint.rundir import META_ITEM, STATE_ITEM
from adpe_jax.errors import CheckpointError
from adpe_jax.layout import PREFIXES

_FORMAT = 1


# ---------------------------------------------------------------------------------------
# Trees: flat "a/b/0/c" paths, shapes/dtypes and checksums.


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path_str(path) -> str:
  return "/".join(_key_name(k) for k in path)


def _flat(tree) -> list[tuple[str, Any]]:
  return [(_path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def abstract_of(tree):
  """ShapeDtypeStructs (with the shardings) of a tree of arrays, e.g. a live TrainState."""
  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(one, tree)


def _summable(dtype) -> bool:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return True
  dt = np.dtype(dtype)
  return dt == np.bool_ or (dt.kind in "fiu" and dt.itemsize in (1, 2, 4, 8))


def _words(x):
  """The bits of `x` as uint32 (only for `_summable` dtypes)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  dt = np.dtype(x.dtype)
  if dt == np.bool_:
    return x.astype(jnp.uint32)
  if dt.itemsize == 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if dt.itemsize == 2:
    return lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if dt.itemsize == 1:
    return lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  return lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: a trailing axis of 2


def _sums(xs):
  """Per-leaf checksums: the sum of the leaf's bits as uint32 words, mod 2**32 (exact and
  independent of the reduction order, so equal on every backend and sharding)."""
  return jnp.stack([jnp.sum(_words(x).reshape(-1), dtype=jnp.uint32) for x in xs])


_SUMS_JIT: dict = {}


def checksums(tree) -> dict[str, int]:
  flat = [(p, x) for p, x in _flat(tree) if _summable(x.dtype)]
  if not flat:
    return {}
  leaves = [x for _, x in flat]
  sharding = getattr(leaves[0], "sharding", None)
  mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
  if mesh not in _SUMS_JIT:  # a replicated result is readable on every host
    _SUMS_JIT[mesh] = jax.jit(_sums) if mesh is None else jax.jit(
        _sums, out_shardings=NamedSharding(mesh, PartitionSpec()))
  try:
    sums = np.asarray(jax.device_get(_SUMS_JIT[mesh](leaves)))
  except Exception as e:  # noqa: BLE001 (e.g. leaves on several meshes): no checksums
    logging.warning("checkpoint checksums skipped: %s", short_error(e))
    return {}
  return {p: int(v) for (p, _), v in zip(flat, sums)}


def _shape(x) -> tuple:
  return tuple(int(s) for s in getattr(x, "shape", ()) or ())


def _dtype(x) -> str:
  dt = getattr(x, "dtype", None)
  try:
    return str(np.dtype(dt)) if dt is not None else "?"
  except TypeError:
    return str(dt)


def _tree_mismatches(saved: dict, wanted: dict) -> list[str]:
  """Differences between {path: leaf} of the checkpoint and of the configured state."""
  out = []
  for p, w in wanted.items():
    if p not in saved:
      out.append(f"lacks {p} (shape {_shape(w)}), which the configured state needs")
    elif _shape(saved[p]) != _shape(w):
      out.append(f"holds {p} of shape {_shape(saved[p])} but the configured state needs "
                 f"{_shape(w)}")
    elif _dtype(saved[p]) != _dtype(w):
      out.append(f"holds {p} as {_dtype(saved[p])} but the configured state needs "
                 f"{_dtype(w)}")
  for p, s in saved.items():
    if p not in wanted:
      out.append(f"holds {p} (shape {_shape(s)}), which the configured state does not have")
  return out


def _block_layout(flat: dict) -> str | None:
  """"scanned" (params/blocks/..., model.scan_blocks) or "unrolled" (params/blocks_0/...),
  from the flat keys of a state tree; the stack names are `layout.PREFIXES`."""
  if any(k.startswith(tuple(f"params/{p}/" for p in PREFIXES)) for k in flat):
    return "scanned"
  if any(k.startswith(tuple(f"params/{p}_" for p in PREFIXES)) for k in flat):
    return "unrolled"
  return None


_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")   # tensorstore's
_QUOTED = re.compile(r'"([^"]*/[^"]*)"')


def os_cause(e: BaseException) -> tuple[str, str] | None:
  """(the errno text, the file) of an OS failure somewhere in `e`'s chain -- an OSError,
  or tensorstore's message ("...: "<file>": ...: No space left on device
  [os_error_code='28']") -- or None.  The file may be ""."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and (e.errno or e.strerror):
      strerror = e.strerror or os.strerror(e.errno)
      return strerror, str(e.filename or "")
    text = str(e)
    m = _OS_ERROR_CODE.search(text)
    if m:
      files = _QUOTED.findall(text[:m.start()])
      return os.strerror(int(m.group(1))), (files[-1] if files else "")
    e = e.__cause__ or e.__context__
  return None


def short_error(e: BaseException, limit: int = 400) -> str:
  """The innermost cause's message, on one line (tensorstore wraps it in a long spec).

  An OS failure (disk full, read-only, permission) leads the text with its errno text and
  file (`os_cause`), so cutting the rest at `limit` never loses it.
  """
  cause = os_cause(e)
  seen = set()
  while id(e) not in seen and (e.__cause__ or e.__context__) is not None:
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  text = " ".join(str(e).split(" See full TensorStore details")[0].split())
  text = text if len(text) <= limit else text[:limit] + "..."
  text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  if cause is None:
    return text
  strerror, filename = cause
  return f"{strerror}" + (f" at {filename}" if filename else "") + f"; {text}"


_UNCHANGED = "nothing on disk was changed"


_QUIET_INSTALLED = False


def quiet_orbax_teardown() -> None:
  """Silence orbax's leftover reads after a refused checkpoint (orbax-checkpoint 0.12.8).

  When a corrupt checkpoint fails to restore, tensorstore callbacks still in flight try
  to reach orbax's already-closed asyncio loop and print 'Event loop is closed'
  tracebacks (through sys.excepthook / threading.excepthook / sys.unraisablehook) around
  our one-sentence error.  Only that exact error is dropped; installed once, when
  `restore` starts (the reads of a refused checkpoint fail while it is being refused).
  """
  global _QUIET_INSTALLED
  if _QUIET_INSTALLED:
    return
  _QUIET_INSTALLED = True

  def noise(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)

  prev_except, prev_thread, prev_unraisable = (sys.excepthook, threading.excepthook,
                                               sys.unraisablehook)
  sys.excepthook = lambda t, v, tb: None if noise(v) else prev_except(t, v, tb)
  threading.excepthook = lambda a: None if noise(a.exc_value) else prev_thread(a)
  sys.unraisablehook = lambda u: None if noise(u.exc_value) else prev_unraisable(u)


# ---------------------------------------------------------------------------------------
# Reads of one step directory without a Checkpointer (no orbax manager: nothing created,
# no barrier between processes).


def read_meta(step_dir) -> dict:
  """The meta item of the checkpoint in `step_dir` (run metadata, step, data_step,
  checksums).  Raises CheckpointError naming the directory."""
  path = storage.as_path(step_dir)
  try:
    meta = ocp.JsonCheckpointHandler().restore(path / META_ITEM)
  except Exception as e:
    raise CheckpointError(
        f"checkpoint {path} has no readable run metadata ({path / META_ITEM}: "
        f"{short_error(e)}); its files may be truncated or corrupt, {_UNCHANGED}.") from e
  if not isinstance(meta, dict):
    raise CheckpointError(f"checkpoint {path} holds run metadata of type "
                          f"{type(meta).__name__} instead of a JSON object, {_UNCHANGED}.")
  return meta


def verify_checksums(step_dir, tree, meta: dict) -> None:
  """Raises CheckpointError when a leaf of `tree` (read from the checkpoint in
  `step_dir`, all of it or a part such as {"params": ...}) does not match the checksum
  written with it in `meta` (silent corruption).  Leaves without a checksum, and a tree
  whose checksums cannot be computed, are not checked."""
  want = meta.get("checksums") or {}
  if not want:
    return
  got = checksums(tree)  # {} if they cannot be computed: then unchecked
  bad = [p for p, v in want.items() if p in got and got[p] != v]
  if bad:
    more = f" (and {len(bad) - 1} more leaves)" if len(bad) > 1 else ""
    raise CheckpointError(
        f"checkpoint {step_dir} holds {bad[0]}{more} whose data does not match the checksum "
        f"written at save time; its files are corrupt, {_UNCHANGED}.")


def read_params(step_dir, meta: dict | None = None) -> dict:
  """Only the `params` of the checkpoint in `step_dir` (orbax partial restore: no optimizer
  state, no adversary), onto the default device, in the block layout they were saved in,
  checked against the checksums of `meta` (read here when not given).  Raises
  CheckpointError naming the directory."""
  path = storage.as_path(step_dir)
  meta = read_meta(path) if meta is None else meta
  try:
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path / STATE_ITEM)
    tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
    if not isinstance(tree, dict) or "params" not in tree:
      raise CheckpointError(f"checkpoint {path} holds no readable 'params' tree; its files "
                            f"may be truncated or corrupt, {_UNCHANGED}.")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                            tree["params"])
    args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=device), tree["params"])
    params = checkpointer.restore(path / STATE_ITEM, args=ocp.args.PyTreeRestore(
        item={"params": abstract}, restore_args={"params": args},
        partial_restore=True))["params"]
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(f"checkpoint {path} could not be read ({short_error(e)}); its files "
                          f"may be truncated or corrupt, {_UNCHANGED}.") from e
  verify_checksums(path, {"params": params}, meta)
  return params



# ---------------------------------------------------------------------------------------
# The reader beside a live trainer: the checkpoint a path names, read again from the newest
# complete one when a trainer's keep_checkpoints deletes it during the read.

READ_TRIES = 5  # checkpoints deleted under the reader before it gives up


def _identity(step_dir):
  """What tells a local step directory from a later one of the same name (its inode);
  None on an object store, where the listing alone decides."""
  if storage.is_remote(step_dir):
    return None
  try:
    return os.stat(os.fspath(step_dir)).st_ino
  except OSError:
    return None


def _moved_on(step_dir, identity) -> bool:
  """Whether the checkpoint in `step_dir` was deleted or replaced since it was chosen, or
  overtaken by a newer complete one (a live trainer then deletes it: keep_checkpoints)."""
  steps = rundir.complete_steps(step_dir.parent)
  return (not steps or steps[-1] != int(step_dir.name)
          or _identity(step_dir) != identity)


def read_checkpoint(path, params: bool = True):
  """(step directory, meta, params or None) of the checkpoint `path` names
  (`rundir.step_dir`: a step directory, or the newest complete one of a workdir or of its
  `checkpoints/`); None when it names none.  The one read of `weights.load` /
  `weights.metadata` (export, config.init, the probes).

  Beside a live trainer (saving often, keep_checkpoints small) the newest checkpoint may be
  deleted while it is read: its files then fail half way.  A read that fails while its
  checkpoint was deleted, replaced or overtaken by a newer one is retried from the newest
  complete checkpoint, with a warning naming that step, up to READ_TRIES times; then
  CheckpointError says the trainer keeps deleting them and what to do.  A failed read
  of a checkpoint still present and newest is its own CheckpointError (damaged files).
  A step directory named by the user is not replaced by another: its deletion is said.
  """
  given = storage.resolve(path)
  step_dir = rundir.step_dir(path)
  if step_dir is None:
    return None
  named = step_dir == given  # the user named this step directory
  tried = []
  for _ in range(READ_TRIES):
    identity = _identity(step_dir)
    try:
      meta = read_meta(step_dir)
      return step_dir, meta, (read_params(step_dir, meta) if params else None)
    except CheckpointError:
      if named:
        if not (step_dir / STATE_ITEM).is_dir():
          raise CheckpointError(
              f"checkpoint {step_dir} was deleted while it was read (the run saving into "
              f"{step_dir.parent.parent} removes old checkpoints: keep_checkpoints); pass "
              f"that workdir to read its newest complete checkpoint, or read once the run "
              f"has stopped.") from None
        raise
      if not _moved_on(step_dir, identity):
        raise  # present, newest and unreadable: damaged
    tried.append(int(step_dir.name))
    newest = rundir.newest_step(step_dir.parent)
    if newest is None:
      break
    logging.warning("checkpoint %s was deleted while it was read (the run in %s is still "
                    "saving and removing old checkpoints); reading the newest complete "
                    "checkpoint instead, step %d", step_dir, step_dir.parent.parent, newest)
    step_dir = step_dir.parent / str(newest)
  workdir = step_dir.parent.parent
  raise CheckpointError(
      f"the checkpoints of {workdir} were deleted while they were read, {len(tried)} "
      f"time(s) in a row (steps {', '.join(map(str, tried))}): the run training in that "
      f"workdir keeps deleting them (config field keep_checkpoints); read it once that run "
      f"has stopped, or start that run with a larger keep_checkpoints, or pass a copy of "
      f"one of its checkpoints/<step> directories; {_UNCHANGED}.")

# ---------------------------------------------------------------------------------------


def _one_replica_writes() -> None:
  """Each array is written by one replica of it, as orbax does on GPUs (and the original's
  rank 0 does), not split across its replicas ("replica-parallel", orbax's default on CPU
  and TPU): the split slices every replicated array on the devices, one small XLA program
  per array shape and slice, compiled at the first save of every start -- 4.4 s of a
  smoke run's 14 (113 arrays on 4 CPU devices) for no gain at this project's sizes.
  Restores read either kind of checkpoint; a sharded (FSDP) array is still written by each
  shard's owner.  Registered once, for every orbax save of this process."""
  default = ocp.type_handlers.get_type_handler(jax.Array)
  if isinstance(default, _OneReplicaArrayHandler):
    return
  handler = _OneReplicaArrayHandler(
      array_metadata_store=getattr(default, "_array_metadata_store", None),
      use_replica_parallel=False)
  ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class _OneReplicaArrayHandler(ocp.type_handlers.ArrayHandler):
  """orbax's ArrayHandler, registered by `_one_replica_writes` (a type to recognise it)."""


class Checkpointer:
  """Asynchronous, keep-last-N checkpoints of the train state under WORKDIR/checkpoints.

  Args:
    workdir: the run's directory; checkpoints go to `workdir/checkpoints/<step>`.
    every_steps: `maybe_save` saves at positive multiples of this (<= 0: only forced).
    keep: how many of the newest checkpoints to keep.
    metadata: JSON-able dict describing the run (model variant, pe, adversary kind,
      image_size, patch_size, ...), written with every checkpoint; `restore` refuses a
      checkpoint whose metadata differs in any field, so put only what must match in it.
    upgrade: optional `run metadata -> run metadata` applied to a checkpoint's before the
      comparison (a task's earlier field names in today's, so old workdirs resume).
    data: the identity of the training data (`adpe_jax.data.identity.of`), written with
      every checkpoint as its `data` entry (none when None).
  """

  def __init__(self, workdir: str, every_steps: int, keep: int = 3,
               metadata: dict | None = None, upgrade=None, data: dict | None = None):
    if keep < 1:
      raise ValueError(f"Checkpointer keep={keep} must be >= 1.")
    # An epath.Path: a local workdir made absolute (orbax needs that), gs://... kept.
    self.directory = storage.resolve(workdir) / "checkpoints"
    try:
      storage.require_checkpoint_support(self.directory)
    except ImportError as e:
      raise CheckpointError(str(e)) from e
    self.every_steps = int(every_steps)
    self.keep = int(keep)
    try:  # normalised as it will be read back (tuples -> lists ...)
      self.metadata = json.loads(json.dumps(dict(metadata or {})))
    except (TypeError, ValueError) as e:
      raise ValueError(f"Checkpointer metadata is not JSON-able: {e}") from e
    self._upgrade = upgrade or (lambda run: run)
    self.data = None if data is None else json.loads(json.dumps(dict(data)))
    self._pending_step: int | None = None
    self._cleaned_tmp = False
    _one_replica_writes()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler, meta_handler = ocp.StandardCheckpointHandler(), ocp.JsonCheckpointHandler()
    registry.add(STATE_ITEM, ocp.args.StandardSave, state_handler)
    registry.add(STATE_ITEM, ocp.args.StandardRestore, state_handler)
    registry.add(META_ITEM, ocp.args.JsonSave, meta_handler)
    registry.add(META_ITEM, ocp.args.JsonRestore, meta_handler)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.keep,
        enable_async_checkpointing=True,
        create=True,
        cleanup_tmp_directories=False,  # done at the first save: restoring deletes nothing
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)

  # -- queries ---------------------------------------------------------------------------

  def step_path(self, step: int):
    """`directory/<step>` (an epath.Path; str() of it for messages)."""
    return self.directory / str(step)

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints (and of a save of this process still in flight)."""
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest checkpoint's step; tmp (unfinished) directories are never counted.

    A save of this process still in flight counts; `wait()` makes it durable.
    """
    return self._manager.latest_step()

  def read_metadata(self, step: int | None = None) -> dict | None:
    """The meta item of a checkpoint (run metadata, step, data_step, checksums)."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    self.wait()
    return read_meta(self.step_path(step))

  # -- restore ---------------------------------------------------------------------------

  def restore(self, abstract_state, step: int | None = None):
    """The newest (or the given) checkpoint, restored into `abstract_state`'s shardings.

    `abstract_state`: `jax.eval_shape` of the state with `.sharding` on every leaf (or a
    live state; see `abstract_of`). Returns None when there is no checkpoint. Raises
    CheckpointError, and deletes / overwrites nothing, when the checkpoint does not fit.
    """
    # Before the reads start: a refused checkpoint's reads fail in tensorstore threads
    # while the refusal is still being raised, not only after it.
    quiet_orbax_teardown()
    return self._restore(abstract_state, step)

  def _restore(self, abstract_state, step: int | None):
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    if step not in self.all_steps():
      raise CheckpointError(f"checkpoint {self.step_path(step)} does not exist (complete "
                            f"checkpoints: {self.all_steps()}).")
    path = self.step_path(step)
    abstract_state = abstract_of(abstract_state)
    meta = self.read_metadata(step)

    # 1. Tree, shapes and dtypes against what the checkpoint says it holds (orbax alone
    #    casts dtypes silently and names no leaf on a shape mismatch).
    try:
      item = self._manager.item_metadata(step)[STATE_ITEM]
    except Exception as e:
      raise CheckpointError(
          f"checkpoint {path} has unreadable array metadata ({short_error(e)}); its files may "
          f"be truncated or corrupt, {_UNCHANGED}.") from e
    tree = getattr(item, "tree", None)
    if tree is None:
      raise CheckpointError(
          f"checkpoint {path} has no array metadata ({path / STATE_ITEM}/_METADATA "
          f"missing or unreadable); its files may be truncated or corrupt, {_UNCHANGED}.")
    saved_flat, wanted_flat = dict(_flat(tree)), dict(_flat(abstract_state))
    saved_layout, wanted_layout = _block_layout(saved_flat), _block_layout(wanted_flat)
    if None not in (saved_layout, wanted_layout) and saved_layout != wanted_layout:
      raise CheckpointError(
          f"checkpoint {path} holds the {saved_layout} block layout (model.scan_blocks="
          f"{saved_layout == 'scanned'}) but this run is configured with config field "
          f"model.scan_blocks={wanted_layout == 'scanned'}; set model.scan_blocks="
          f"{saved_layout == 'scanned'} to resume it (or convert the checkpoint with "
          f"adpe_jax.layout), {_UNCHANGED}.")
    problems = _tree_mismatches(saved_flat, wanted_flat)
    meta_diff = rundir.metadata_changes(self._upgrade(meta.get("run", {}) or {}), self.metadata)
    if problems or meta_diff:
      parts = []
      if problems:
        more = f" ({len(problems) - 1} more leaves differ)" if len(problems) > 1 else ""
        parts.append(problems[0] + more)
      if meta_diff:
        parts.append("comes from a run whose metadata differs in "
                     + ", ".join(meta_diff))
      raise CheckpointError(
          f"checkpoint {path} " + "; it also ".join(parts)
          + f": it does not belong to this configuration (use another workdir or move "
          f"that checkpoint away), {_UNCHANGED}.")

    # 2. The arrays, straight into the requested shardings.
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          **{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))[STATE_ITEM]
      restored = jax.block_until_ready(restored)
    except Exception as e:
      raise CheckpointError(
          f"checkpoint {path} could not be read ({short_error(e)}); its files may be truncated "
          f"or corrupt, {_UNCHANGED}.") from e
    if jax.tree.structure(restored) != jax.tree.structure(abstract_state):
      raise CheckpointError(f"checkpoint {path} restored into a tree other than the "
                            f"configured state's, {_UNCHANGED}.")

    # 3. Contents against the checksums written at save time (silent corruption).
    verify_checksums(path, restored, meta)
    logging.info("restored checkpoint %s (data step %s)", path, meta.get("data_step"))
    return restored

  # -- save ------------------------------------------------------------------------------

  def _cleanup_tmp(self) -> None:
    """Remove unfinished `<step>.orbax-checkpoint-tmp` dirs of a killed earlier run."""
    self._cleaned_tmp = True
    if jax.process_index() != 0:
      return
    for p in rundir.unfinished(self.directory):
      logging.warning("removing unfinished checkpoint %s", p)
      try:  # a symlink is refused (shutil.rmtree locally) and left alone
        storage.rmtree(p)
      except Exception as e:  # noqa: BLE001 (as ignore_errors: the save goes on)
        logging.warning("could not remove %s: %s", p, short_error(e))

  def maybe_save(self, step: int, state, force: bool = False) -> bool:
    """Start an asynchronous save when step % every_steps == 0 (step > 0) or `force`.

    Returns whether a save was started (False also when `step` is already saved). The
    state may be donated / changed as soon as this returns.
    """
    step = int(step)
    due = self.every_steps > 0 and step > 0 and step % self.every_steps == 0
    if not (due or force):
      return False
    if step in self.all_steps():
      return False
    self.wait()  # surfaces a failure of the previous save here, naming it
    phase.enter("save", step)
    if not self._cleaned_tmp:
      self._cleanup_tmp()
    meta = {"format": _FORMAT, "step": step, "data_step": step, "run": self.metadata,
            "checksums": checksums(state)}
    if self.data is not None:
      meta["data"] = self.data
    try:
      self._manager.save(step, args=ocp.args.Composite(
          **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}),
          force=True)
    except Exception as e:  # (_failed raises: no thread, no memory...)
      if jax.process_count() > 1:
        raise  # most likely a lost peer (a collective of the save): main says so
      self._failed(step, e)
    self._pending_step = step
    logging.info("saving checkpoint %s (asynchronously)", self.step_path(step))
    return True

  def check(self) -> None:
    """Raises CheckpointError, at once, if the asynchronous save in flight has failed
    (the loop calls it at every log step: a full disk is reported there, not at the next
    save); a no-op while it is still running or when it succeeded."""
    if self._pending_step is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Block until the save in flight (if any) is complete on disk."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 (raised by _failed)
      step, self._pending_step = self._pending_step, None
      self._failed(step, e)
    self._pending_step = None

  def _failed(self, step: int | None, e: Exception) -> None:
    """Raises the CheckpointError of the failed save of `step`, naming the last complete
    checkpoint.  Its unfinished folder stays (writes of its other items may still be in
    flight); the next start's first save removes it (`_cleanup_tmp`), saying so."""
    phase.enter("save", step)  # (the phase of its failure, reported later)
    where = self.step_path(step) if step is not None else self.directory
    try:  # on disk, not orbax's list (which may hold the step whose save failed)
      last = rundir.newest_step(self.directory)
    except Exception:  # noqa: BLE001 (the message still names the failed save)
      last = None
    kept = (f"the last complete checkpoint is {self.step_path(last)}" if last is not None
            else "no complete checkpoint was saved yet")
    error = CheckpointError(
        f"saving checkpoint {where} failed ({short_error(e)}); {kept}; fix the cause (free "
        f"disk space, permissions) and re-run the same command to resume.")
    error.step = step  # (which save: `train.loop` names it)
    raise error from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---------------------------------------------------------------------------------------


