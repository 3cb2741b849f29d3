"""The refusals of a run's start, before anything is written and before the step compiles.

`prepare_workdir` then, under the workdir's lock, `check_saved_run` (called by
`run.run_task` before config.json is written; `check_workdir` does both) refuse, in one
sentence, and change nothing on disk:

  * a config value out of range (`config.validate.values`: rates, epoch counts, seed...);
  * an empty `--workdir` (an unset shell variable would train into the current directory),
    one that is an existing file, one that cannot be created or written (a temporary file
    is created and removed inside it; the errno text is named);
  * `config.init` that does not exist or is a file that is no PyTorch checkpoint;
  * a workdir holding another task's checkpoint (a fine-tune command pointed at a
    pretraining workdir is told to pass it as --config.init);
  * a workdir holding a checkpoint whose run this command would change: every config field
    not in `NON_TRAJECTORY` defines the run's trajectory and is compared with the saved
    config.json (written only once a start passed these checks, so it is the config of the
    checkpoints); the checkpoint's run metadata is compared too (the only comparison left
    when config.json is missing or unreadable);
  * (`check_saved_data`, once the run skeleton has opened the training data) a workdir
    whose checkpoint was trained on other data than this command reads: the checkpoint
    records its data's identity (`adpe_jax.data.identity`: example count, class names, a
    digest of the file list or of a prepared source's index), and a changed identity is
    refused naming what changed, unless config field data.allow_changed=True (then a
    warning).  Because the identity is compared, where the checkpoint records one the
    data's location (data.dir, and the path of a folder:/prepared: data.source) may change:
    the same data under another path continues the same run.  A checkpoint written before
    the record existed resumes with a warning that its data could not be compared (and
    its data location stays a trajectory field).

Reading the newest checkpoint's run metadata is cheap (a JSON item).  The restore-time
checks of `checkpoint.Checkpointer.restore` stay: they guard the arrays.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Callable, Optional

from absl import logging
from etils import epath

from adpe_jax import checkpoint as ckpt_lib
from adpe_jax import storage
from adpe_jax.checkpoint import rundir
from adpe_jax.config import validate as check
from adpe_jax.data import identity as data_identity
from adpe_jax.errors import CheckpointError, ConfigError, InitError, WorkdirError

# Fields a resumed run may change: they do not change its trajectory (the batches, masks and
# updates of every step).  Every other field does, so a new field is compared by default.
# A name ending in "." covers the block.
NON_TRAJECTORY = (
    # cadence of logs, checkpoints and evaluations, and the stops
    "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "max_steps_per_run",
    "divergence_factor",
    # where the records also go (a tracker)
    "log.",
    # evaluations: they read the weights and change no step (a resumed run may add a k-NN)
    "eval.",
    # caches, processes and devices (the same global batch on any mesh; `auto` picks the
    # attention kernel by backend anyway; remat recomputes the same function)
    "compilation_cache", "distributed.", "mesh.", "model.attention_impl", "model.remat",
    # input speed: the same pixels (data.decoder: simplejpeg decodes as Pillow,
    # adpe_jax/data/jpeg.py; normalize_on_device: the same float32 values; not data.draft)
    "data.num_threads", "data.num_workers", "data.decoder", "data.normalize_on_device",
    # what happens to files that do not decode (a run stopped by one resumes with "skip";
    # the batches of a run that met none are unchanged)
    "data.bad_images", "data.max_bad_fraction", "data.skip_list",
    # the deliberate resume on changed data (`check_saved_data`: a warning says so)
    "data.allow_changed",
)

# After a non-finite / divergence stop the message says "start again with a lower learning
# rate (config field blr)": from the kept checkpoint these may change then (with a warning).
RESTART_FIELDS = ("blr", "min_lr", "warmup_epochs", "adversary.lr")

_SCHEDULE = ("total_steps", "total_epochs")
_UNCHANGED = "nothing on disk was changed"
_TASK_RUN = {"pretrain": "pretraining", "finetune": "fine-tuning", "linprobe": "linear-probe",
             "knn": "k-NN"}
_TASK_VERB = {"pretrain": "pretrain", "finetune": "fine-tune", "linprobe": "probe",
              "knn": "evaluate"}


def free(field: str) -> bool:
  """Whether a resumed run may change `field` (a dotted config field)."""
  return any(field == f or (f.endswith(".") and field.startswith(f)) for f in NON_TRAJECTORY)


def trajectory_changes(saved: dict, config, allowed=()) -> tuple[list[str], list[str]]:
  """(trajectory fields changed, free fields changed) between the saved config.json (a
  dict) and `config`, as "field (old -> new)".  A field one side lacks (a config of another
  version) is not compared."""
  changed, loose = [], []
  for c in rundir.diff(rundir.config_fields(saved), rundir.config_fields(config)):
    if c.on_both_sides:
      (loose if free(c.field) or c.field in allowed else changed).append(c.arrow())
  return changed, loose


def data_location_fields(saved_config: dict, config) -> tuple:
  """The fields that say only where the data lies: data.dir, and data.source when both name
  a folder:/prepared: source (its path).  A resume may change them where the checkpoint
  records its data's identity, which `check_saved_data` then compares."""
  old = str((saved_config.get("data") or {}).get("source", ""))
  new = str(config.data.get("source", ""))
  kind = old.partition(":")[0]
  same_kind = kind == new.partition(":")[0] and kind in ("folder", "prepared")
  return ("data.dir", "data.source") if same_kind else ("data.dir",)


def workdir_path(workdir) -> epath.Path:
  """The workdir as an epath.Path; refuses an empty one and an existing file."""
  text = "" if workdir is None else os.fspath(workdir)
  if not text.strip():
    raise ConfigError("--workdir is empty (an unset shell variable?); a run would write into "
                      "the current directory; pass the run's directory, e.g. "
                      "--workdir=runs/NAME.")
  path = storage.resolve(text)
  if path.exists() and not path.is_dir():
    raise ConfigError(f"--workdir={text} is an existing file, not a directory; pass a "
                      f"directory (a new one for a new run).")
  return path


def _writable(path: epath.Path, text: str) -> epath.Path:
  """Creates the workdir (if new) and a temporary file inside it, then removes that file."""
  try:
    path = storage.makedirs(path)
  except OSError as e:
    raise ConfigError(f"--workdir={text} cannot be created ({e.strerror or e}"
                      + (f": {e.filename}" if e.filename else "")
                      + "); choose a directory you can write.") from e
  probe = path / f".write_probe.{socket.gethostname()}.{os.getpid()}"
  try:
    storage.write_text(probe, "")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"--workdir={text} is not writable ({e.strerror or e}); choose a "
                      f"directory you can write, or fix its permissions or mount.") from e
  return path


def check_init(config, resuming: bool) -> None:
  """config.init exists and is a directory or a PyTorch file, where the run reads it (a
  fine-tune that resumes does not read it again)."""
  init = config.get("init", "") if hasattr(config, "get") else ""
  if not init or (resuming and check.task_of(config) == "finetune"):
    return
  from adpe_jax.weights import TORCH_SUFFIXES, is_torch_file  # noqa: PLC0415
  path = storage.resolve(init)
  if not path.exists():
    raise InitError(f"config field init={init!r} does not exist.")
  if not path.is_dir() and not is_torch_file(init):
    raise InitError(f"config field init={init!r} is a file but not a PyTorch checkpoint "
                    f"({', '.join(TORCH_SUFFIXES)}); pass a workdir of ours, one of its "
                    f"checkpoints/<step> directories, or a .pth file.")


def _task_message(text: str, where, saved_task: str, task: str) -> str:
  head = (f"--workdir={text} holds a {_TASK_RUN[saved_task]} checkpoint ({where}), not a "
          f"{_TASK_RUN[task]} run")
  if task != "pretrain" and saved_task in ("pretrain", "finetune"):
    return (f"{head}; {_TASK_VERB[task]} with --config.init={text} and another --workdir, "
            f"{_UNCHANGED}.")
  return f"{head}; {_TASK_VERB[task]} in another --workdir, {_UNCHANGED}."


def compare_with_saved_run(config, path: epath.Path, text: str,
                           run_metadata: Optional[Callable] = None,
                           upgrade: Optional[Callable] = None) -> bool:
  """Refuses a command that would not continue the run saved in the workdir; returns
  whether the workdir holds a checkpoint (the run resumes)."""
  where = rundir.newest_checkpoint(path)  # nothing is created
  if where is None:
    return False
  meta = ckpt_lib.read_meta(where)
  run = meta.get("run") or {}
  task = check.task_of(config)
  saved_config = rundir.read_config(path)
  saved_task = run.get("task") or (saved_config or {}).get("task") or "pretrain"
  if saved_task != task and saved_task in _TASK_RUN:
    raise WorkdirError(_task_message(text, where, saved_task, task))
  if saved_config is None:
    logging.warning("%s has no readable config.json: this command is compared with the run "
                    "metadata of checkpoint %s only", text, where)
  else:
    status = (rundir.read_summary(path).get("status") or "")
    allowed = RESTART_FIELDS if status in ("diverged", "non-finite") else ()
    moves = data_location_fields(saved_config, config) if isinstance(meta.get("data"),
                                                                      dict) else ()
    changed, loose = trajectory_changes(saved_config, config, allowed + moves)
    if changed:
      schedule = any(c.split(" ")[0] in _SCHEDULE for c in changed)
      note = ("; total_steps and total_epochs shape the cosine schedule, so a new value "
              "would change the remaining steps too (max_steps_per_run ends a run early)"
              if schedule else "")
      raise WorkdirError(
          f"--workdir={text} holds a run (checkpoint {where}) that this command would not "
          f"continue exactly: it changes config field(s) that define the run's trajectory: "
          f"{', '.join(changed)}{note}; set them back to resume the run, or start a new run "
          f"with another --workdir, {_UNCHANGED}.")
    restarted = [c for c in loose if c.split(" ")[0] in allowed]
    if restarted:
      logging.warning("resuming the %s run in %s from its last good checkpoint with "
                      "changed %s", status, text, ", ".join(restarted))
    moved = [c for c in loose if c.split(" ")[0] in moves]
    if moved:
      logging.info("the data's location changed since the saved run (%s): its identity is "
                   "compared with the one checkpoint %s records", ", ".join(moved), where)
    loose = [c for c in loose if c not in moved]
    if loose:
      logging.info("config fields changed since the saved run (they do not change its "
                   "trajectory): %s", ", ".join(loose))
  if run_metadata is not None:
    diff = rundir.metadata_changes((upgrade or (lambda r: r))(run),
                                   json.loads(json.dumps(run_metadata(config))))
    if diff:
      raise WorkdirError(
          f"checkpoint {where} comes from a run whose metadata differs in {', '.join(diff)}: "
          f"it does not belong to this configuration (use another workdir or move that "
          f"checkpoint away), {_UNCHANGED}.")
  return True


def check_saved_data(config, path: epath.Path, workdir, data: dict) -> None:
  """Refuses a resume on other data than the newest checkpoint was trained on (module
  docstring).  `data`: the identity of the data this command reads
  (`adpe_jax.data.identity.of`); `workdir`: the text the user passed."""
  text = "" if workdir is None else os.fspath(workdir)
  where = rundir.newest_checkpoint(path)
  if where is None:
    return
  saved = ckpt_lib.read_meta(where).get("data")
  if not isinstance(saved, dict):
    logging.warning("checkpoint %s records no identity of its training data (it was written "
                    "before runs recorded one): the data this run reads (%s examples) could "
                    "not be compared with the data it was trained on", where,
                    data.get("examples"))
    return
  changes = data_identity.changes(saved, data)
  if not changes:
    return
  if config.data.get("allow_changed", False):
    logging.warning("data.allow_changed=True: resuming the run of checkpoint %s on changed "
                    "data (%s); from here on it is not the run an uninterrupted start would "
                    "have trained", where, "; ".join(changes))
    return
  raise WorkdirError(
      f"--workdir={text} holds a run (checkpoint {where}) trained on other data than this "
      f"command reads: {'; '.join(changes)}; to go on with this data deliberately pass "
      f"--config.data.allow_changed=True (the rest of the run then differs from an "
      f"uninterrupted one), or start a new run with another --workdir, {_UNCHANGED}.")


def prepare_workdir(config, workdir) -> epath.Path:
  """The refusals before the workdir's lock: config values, an empty / file / unwritable
  workdir (created if new).  Returns it (an epath.Path: local and absolute, or gs://...)."""
  check.values(config)
  text = "" if workdir is None else os.fspath(workdir)
  return _writable(workdir_path(workdir), text)


def check_saved_run(config, path: epath.Path, workdir, run_metadata: Optional[Callable] = None,
                    upgrade: Optional[Callable] = None) -> bool:
  """The refusals under the workdir's lock (taken before the saved run is read, so a second
  run on a live workdir is told that, not how its config differs): the saved run, then
  config.init.  `workdir`: the text the user passed (for the messages).  Returns whether
  the workdir holds a checkpoint (the run resumes)."""
  text = "" if workdir is None else os.fspath(workdir)
  try:
    resuming = compare_with_saved_run(config, path, text, run_metadata, upgrade)
  except CheckpointError:
    ckpt_lib.quiet_orbax_teardown()
    raise
  check_init(config, resuming)
  return resuming


def check_workdir(config, workdir, run_metadata: Optional[Callable] = None,
                  upgrade: Optional[Callable] = None) -> epath.Path:
  """Every refusal of the module docstring, in that order, without the lock (`run.run_task`
  holds it between `prepare_workdir` and `check_saved_run`).  Returns the workdir."""
  path = prepare_workdir(config, workdir)
  check_saved_run(config, path, workdir, run_metadata, upgrade)
  return path
