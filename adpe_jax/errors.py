"""Every error a user can act on: its message is one sentence naming what and where; and
the exit codes of every adpe_jax command (`ExitCode`).

`main.py` catches `AdpeError` and prints that sentence; anything else is a bug (a
traceback).  This module is a leaf: it imports nothing of adpe_jax (nor JAX: the
supervisor of a multi-process launch uses it).
"""

import enum


class ExitCode(enum.IntEnum):
  """How an adpe_jax process ends (README "Exit codes"); 128 + n stays the shell's code for
  a process ended by signal n."""

  OK = 0         # finished, stopped as asked, or preempted and saved
  BUG = 1        # a traceback (or a failure every process of a run shares)
  REFUSED = 2    # a refusal or stop of ours: one sentence says what to change
  LOST_PEER = 3  # a multi-process run lost a peer or its coordinator, or never gathered


def lost_peer_message(process: int, processes: int, heartbeat_timeout=None, *, lost: str = "",
                      ended: str = "", coordinator: str = "", resume: str = "") -> str:
  """The sentence for a multi-process run that lost a peer or its coordinator, written by
  the process that saw it (`lost`: who is gone, as the coordination service said; see
  `train/stop.lost_peer_exit`) or by its supervisor once JAX aborted it (`ended`: how it
  ended; who is gone is not known there; see `supervisor.exit_code`).  `resume`: what to
  re-run, naming the last checkpoint where known."""
  who = f"process {process if process >= 0 else '?'} of {processes if processes > 0 else '?'}"
  heartbeat = "?" if heartbeat_timeout is None else f"{heartbeat_timeout:g}"
  resume = resume or ("re-run the same command on every process to resume from the last "
                      "complete checkpoint")
  if lost:
    return (f"lost peer: {lost} of {processes} stopped responding (no heartbeat for "
            f"{heartbeat} s); process {process} stops too; {resume}.")
  return (f"{who} {ended}: a peer or the coordinator (process 0 at "
          f"{coordinator or '(auto-detected)'}) most likely died or froze, or sent no "
          f"heartbeat for distributed.heartbeat_timeout_seconds={heartbeat} s (the lines above "
          f"say which); {resume}.")


class AdpeError(Exception):
  """A problem the user can fix (a config field, a file, a checkpoint, a process)."""


class ConfigError(AdpeError, ValueError):
  """A config value a user must change; the message names the field."""


class MeshError(ConfigError):
  """The device mesh the config asks for does not fit the devices."""


class DataError(AdpeError, RuntimeError):
  """A dataset is missing, unreadable or misnamed."""


class CheckpointError(AdpeError, RuntimeError):
  """A checkpoint that cannot be restored into the configured run (nothing is changed)."""


class DivergenceError(AdpeError, FloatingPointError):
  """The loss went non-finite or far above the run's first loss: the run stopped before
  saving that state, the last good checkpoint is kept; `status` ("non-finite" or
  "diverged") and `step` (the first bad step) are also in summary.json."""

  def __init__(self, message: str, status: str = "diverged", step: int | None = None):
    super().__init__(message)
    self.status, self.step = status, step


class WorkdirLockError(AdpeError, RuntimeError):
  """The workdir's one-writer lock cannot be taken (an unwritable workdir, a missing
  package for gs://, no answer from process 0); nothing was written into the workdir."""


class WorkdirBusyError(WorkdirLockError):
  """Another run holds the workdir (`adpe_jax.workdir_lock`): the message names it (host,
  pid, start time) and what to do; nothing was written into the workdir."""


class InitError(ConfigError):
  """config.init (weights to start from) cannot initialise the configured model."""


class ConversionError(AdpeError, ValueError):
  """A state dict (PyTorch) that does not fit the model it is converted for."""


class WorkdirError(CheckpointError, ConfigError):
  """The workdir holds a run this command would not continue as it was started (another
  task, or changed fields that define the run's trajectory); nothing is changed."""


class BadImageError(DataError):
  """An image file of a dataset that does not decode (truncated, not an image): `path`
  (or the example's name), `index` (the source's example index), `reason` (the decoder's
  words).  The message says what to do: data.bad_images="skip", or the check command."""

  def __init__(self, path: str, index: int, reason: str, check: str = ""):
    self.path, self.index, self.reason, self.check = path, int(index), reason, check
    check = check or "python -m adpe_jax.tools.check --source=<data.source>"
    super().__init__(
        f"Image file {path} (example {index}) cannot be decoded ({reason}); remove or replace "
        f"it, or set config field data.bad_images='skip' to train on a deterministic "
        f"substitute, and list every bad file of the dataset with `{check}`.")

  def __reduce__(self):  # through pickle (input worker processes) with its fields
    return type(self), (self.path, self.index, self.reason, self.check)


class RunFileError(AdpeError, OSError):
  """A run file (metrics.jsonl, log.txt, TensorBoard events) could not be written (a full
  disk, a quota, a read-only mount): the message names the file, the cause and what
  became of the state at that step (`train.loop` saves it first where it can)."""


# What a run can lower when memory runs out (docs/running.md "Faults"): the first two may
# change on a resume; batch_size / accum_steps change the trajectory (a new workdir).
MEMORY_KNOBS = ("set config field model.remat='block' (recomputes activations) or lower "
                "data.num_workers (each input worker holds its own memory) and re-run the same "
                "command, which resumes from {kept}; or start a new workdir with a lower "
                "batch_size or a higher accum_steps (the same batch in smaller micro-batches: "
                "both change the run's trajectory, so this workdir's checkpoints cannot resume "
                "with them)")


def out_of_memory(error: BaseException) -> str | None:
  """What ran out, in words, when `error` (or an exception in its chain) is memory
  exhausted -- XLA's RESOURCE_EXHAUSTED / "Out of memory" (a JaxRuntimeError: device or
  host memory), a MemoryError, or "can't start new thread" (no memory for a thread's
  stack) -- else None.  Type names only: this module imports no JAX."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, AdpeError):  # ours (a failed save) quotes its cause: read that
      error = error.__cause__ or error.__context__
      continue
    text = str(error)
    first = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
    if isinstance(error, MemoryError):
      return f"host memory ran out ({type(error).__name__}{': ' + first if text.strip() else ''})"
    if isinstance(error, RuntimeError) and "can't start new thread" in text:
      return f"host memory ran out (a new thread could not be started: {first})"
    if type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and (
        "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()):
      return f"device or host memory ran out (XLA: {first})"
    error = error.__cause__ or error.__context__
  return None


def out_of_memory_message(what: str, phase: str, kept: str) -> str:
  """The sentence for memory exhausted in `phase` (`phase.describe`); `kept`: the last
  complete checkpoint in words ("the last complete checkpoint DIR/checkpoints/50")."""
  return f"out of memory during {phase}: {what}; {MEMORY_KNOBS.format(kept=kept)}."
