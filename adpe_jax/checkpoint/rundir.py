"""The run on disk, without JAX: the checkpoint listing, summary.json, config.json, and
the one diff of configs and run metadata.

A run's workdir holds

  config.json          the config of its checkpoints (written once a start passed preflight);
  summary.json         how the last start ended (finished, stopped, diverged, ...);
  checkpoints/<step>/  one orbax checkpoint: STATE_ITEM (the arrays) and META_ITEM (JSON);
                       `adpe_jax.checkpoint.checkpointer` reads and writes them.

A checkpoint is complete when orbax has finalized it: locally orbax writes a step into
`<step>.orbax-checkpoint-tmp` and renames it to `<step>` only once everything is written;
on gs:// (no atomic rename) it writes `<step>` directly and `commit_success.txt` last.
`complete_steps` is that one definition, for every reader (preflight, the params-only
read of `weights.load`, the supervisor's last sentence); it matches
`Checkpointer.all_steps` once no save of this process is in flight (tests/test_checkpoint.py).

This module imports nothing of JAX, numpy or orbax: the supervisor of a multi-process
launch uses it (tests/test_imports.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from typing import Any, Mapping

from etils import epath

from adpe_jax import storage

# The two orbax items of a step directory.
STATE_ITEM = "state"
META_ITEM = "meta"

CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"
CONFIG = "config.json"
# orbax-checkpoint 0.12.8: `atomicity_types.TMP_DIR_SUFFIX` (private there) and
# `COMMIT_SUCCESS_FILE`; tests/test_checkpoint.py checks both against orbax.
TMP_SUFFIX = ".orbax-checkpoint-tmp"
COMMIT_FILE = "commit_success.txt"


LOCK = ".adpe_lock"  # adpe_jax/workdir_lock.py LOCK_NAME (tests/test_refusals.py checks)
# What a start makes in a workdir before it writes config.json (adpe_jax/train/run.py).
STARTED = (LOCK, CHECKPOINTS)


# -- a start that ends before config.json ------------------------------------------------------

def before_start(workdir):
  """(the workdir, whether it exists, those of STARTED and config.json that exist) before a
  start writes anything; None where that cannot be told (then `undo_start` removes
  nothing)."""
  try:
    path = storage.resolve(workdir)
    if not path.is_dir():
      return path, False, ()
    return path, True, tuple(n for n in (*STARTED, CONFIG) if (path / n).exists())
  except Exception:  # noqa: BLE001 (an unreadable or empty --workdir: prepare_workdir says)
    return None


def _lock_free(lock) -> bool:
  """Whether no process holds the local lock file `lock` (a gs:// lease: False, kept)."""
  if storage.is_remote(lock):
    return False
  try:
    fd = os.open(os.fspath(lock), os.O_RDONLY)
  except OSError:
    return not lock.exists()
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except OSError:
    return False
  finally:
    os.close(fd)


def undo_start(before, lock_ours: bool = True) -> None:
  """Removes what a start that ended before writing config.json created in its workdir: the
  lock file, an empty checkpoints/, and the workdir itself if it was new and is then empty.
  Files of an earlier run, a non-empty checkpoints/, and everything once this start wrote
  config.json stay.  `lock_ours` False (the supervisor, after its child died): the lock
  file stays while another process holds it."""
  if before is None:
    return
  path, existed, had = before
  if CONFIG not in had and (path / CONFIG).exists():
    return  # this start got past its refusals: what it wrote is a run's
  for name in STARTED:
    if name in had:
      continue
    with contextlib.suppress(OSError):  # not there, not empty, or held by another run: kept
      if name == LOCK:
        if lock_ours or _lock_free(path / name):
          (path / name).unlink()
      else:
        (path / name).rmdir()
  if not existed:
    with contextlib.suppress(OSError):
      path.rmdir()

# -- checkpoints -----------------------------------------------------------------------------

def checkpoints_dir(workdir) -> epath.Path:
  """`workdir/checkpoints` (local made absolute, gs://... kept)."""
  return storage.resolve(workdir) / CHECKPOINTS


def complete_steps(directory) -> list[int]:
  """The steps of the complete checkpoints in a `checkpoints/` directory, oldest first
  ([] when it does not exist).  An unfinished save is never counted (module docstring)."""
  directory = storage.as_path(directory)
  if not directory.is_dir():
    return []
  remote = storage.is_remote(directory)
  return sorted(int(d.name) for d in directory.iterdir()
                if d.name.isdigit() and d.is_dir()
                and (not remote or (d / COMMIT_FILE).exists()))


def newest_step(directory) -> int | None:
  """The newest complete checkpoint's step in a `checkpoints/` directory, or None."""
  steps = complete_steps(directory)
  return steps[-1] if steps else None


def newest_checkpoint(workdir) -> epath.Path | None:
  """`workdir/checkpoints/<newest complete step>`, or None.  Creates nothing."""
  directory = checkpoints_dir(workdir)
  step = newest_step(directory)
  return None if step is None else directory / str(step)


def unfinished(directory) -> list[epath.Path]:
  """The `<step>.orbax-checkpoint-tmp` directories a killed save left in `directory`."""
  directory = storage.as_path(directory)
  if not directory.is_dir():
    return []
  return [p for p in directory.iterdir() if TMP_SUFFIX in p.name and p.is_dir()]


def step_dir(path) -> epath.Path | None:
  """The checkpoint `path` names: a step directory itself (it holds STATE_ITEM), or the
  newest complete one of a workdir or of its `checkpoints/` directory; None if none."""
  p = storage.resolve(path)
  if (p / CHECKPOINTS).is_dir():
    p = p / CHECKPOINTS
  if (p / STATE_ITEM).is_dir():
    return p
  step = newest_step(p)
  return None if step is None else p / str(step)


# -- summary.json and config.json ------------------------------------------------------------

def _read_object(path) -> dict | None:
  """The JSON object in a file; None if it is missing, unreadable or not an object."""
  try:
    out = json.loads(storage.read_text(path) or "null")
  except (OSError, ValueError):  # ValueError includes UnicodeDecodeError
    return None
  return out if isinstance(out, dict) else None


def read_summary(workdir) -> dict:
  """summary.json of the run ({} when missing or unreadable)."""
  return _read_object(storage.resolve(workdir) / SUMMARY) or {}


def write_summary(workdir, summary: dict) -> None:
  """Writes summary.json (the caller writes from process 0 only)."""
  storage.write_text(storage.resolve(workdir) / SUMMARY, json.dumps(summary, indent=2))


def read_config(workdir) -> dict | None:
  """config.json of the run (the config of its checkpoints), or None when missing or
  unreadable."""
  return _read_object(storage.resolve(workdir) / CONFIG)


def write_config(workdir, config) -> None:
  """Writes config.json (the caller writes from process 0 only, once preflight passed)."""
  storage.write_text(storage.resolve(workdir) / CONFIG, config.to_json_best_effort(indent=2))


# -- the one diff of configs and run metadata ------------------------------------------------

class _Absent:
  def __repr__(self) -> str:
    return "<absent>"


ABSENT: Any = _Absent()  # the side of a `Change` that lacks the field


def flat(tree: Mapping, prefix: str = "") -> dict:
  """{"a.b.c": leaf} of nested dicts; an empty dict is a leaf ({})."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(flat(v, key + "."))
    else:
      out[key] = v
  return out


def config_fields(config) -> dict:
  """{dotted field: value} of a config (or of a dict) as config.json holds it (JSON types)."""
  data = (json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort")
          else config)
  return flat(data)


@dataclasses.dataclass(frozen=True)
class Change:
  """One field that differs: `old` / `new` is ABSENT on the side that lacks it."""
  field: str
  old: Any
  new: Any

  @property
  def on_both_sides(self) -> bool:
    return self.old is not ABSENT and self.new is not ABSENT

  def there_now(self) -> str:
    """'field (old there, new now)': a saved run against this command."""
    old = "absent" if self.old is ABSENT else repr(self.old)
    new = "absent" if self.new is ABSENT else repr(self.new)
    return f"{self.field} ({old} there, {new} now)"

  def arrow(self) -> str:
    """'field (old -> new)'."""
    return f"{self.field} ({self.old!r} -> {self.new!r})"


def diff(old: Mapping, new: Mapping) -> list[Change]:
  """The fields (flattened, `flat`) whose values differ between two nested dicts, sorted by
  name; a field one side lacks is a Change with ABSENT on that side."""
  a, b = flat(old or {}), flat(new or {})
  return [Change(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
          if a.get(k, ABSENT) != b.get(k, ABSENT)]


def metadata_changes(saved: Mapping, current: Mapping) -> list[str]:
  """The run metadata fields that differ between a checkpoint's (`saved`) and this run's,
  as 'field (old there, new now)'."""
  return [c.there_now() for c in diff(saved, current)]
