"""Resources running out: memory (an XLA RESOURCE_EXHAUSTED error, no thread for a save, a
C++ abort under the supervisor) and a full disk between saves.  Each ends in one sentence
naming the phase (or the file) and what to do, and the last complete checkpoint is kept;
a run file that cannot be written still lets the state of that step be saved.
docs/running.md's fault list is what these pin down."""

import errno
import fcntl
import json
import os
import pathlib
import re
import resource
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from orbax.checkpoint import CheckpointManager

from adpe_jax import errors, main, phase, storage, supervisor
from adpe_jax.checkpoint import rundir
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.train.pretrain import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOKE = ["--config=configs/vitb_ape.py:smoke", "--config.compilation_cache=none"]
# XLA's own words when a device (or the CPU client) cannot allocate a buffer.
XLA_OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes."


def smoke_config(**kw):
  c = pretrain_config.apply_smoke(pretrain_config.base_config())
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 6, 1, 2
  for k, v in kw.items():
    c[k] = v
  return c


def losses(workdir) -> dict:
  return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").open())
          if "loss" in r}


def leaves(state):
  return jax.tree.leaves(jax.device_get(state))


# -- memory: what the supervisor says of a child that aborted ---------------------------------

ABORTING_CHILD = """
import os, signal
from adpe_jax import phase
phase.enter({stage!r}, {step!r})
os.kill(os.getpid(), signal.{signal})
"""


@pytest.mark.parametrize("stage,step,sig,words", [
    ("compile", None, "SIGABRT", "the run aborted (SIGABRT) during the compile"),
    ("training", 7, "SIGSEGV", "the run aborted (SIGSEGV) during training step 7"),
    ("save", 50, "SIGKILL", "the run was killed (SIGKILL) during the save at step 50"),
])
def test_a_child_dying_of_memory_gets_a_sentence_naming_its_phase(tmp_path, capfd, stage, step,
                                                                  sig, words):
  (tmp_path / "checkpoints" / "40").mkdir(parents=True)   # a complete one, and a newer tmp
  (tmp_path / "checkpoints" / f"50{rundir.TMP_SUFFIX}").mkdir()
  code = ABORTING_CHILD.format(stage=stage, step=step, signal=sig)
  rc = supervisor.supervise(str(tmp_path), [sys.executable, "-c", code], multi_process=False)
  assert rc == 128 + getattr(signal, sig)   # the shell's code for that signal
  last = capfd.readouterr().err.strip().splitlines()[-1]
  assert last.startswith(f"error: {words}"), last
  assert "model.remat='block'" in last and "batch_size" in last and "data.num_workers" in last
  assert f"resumes from the last complete checkpoint {tmp_path}/checkpoints/40" in last, last


def test_an_address_space_limit_aborts_the_run_and_the_supervisor_says_where(tmp_path):
  """The issue's trial: `ulimit -v 1600000` aborted the first jit in C++ (rc 134, "Fatal
  Python error: Aborted").  Measured on the smoke run: 1.2, 1.6 and 2.0 GB abort in the
  compile, 2.4 GB runs; 1.5 GB is taken (a machine with more cores may abort earlier)."""
  limit = 1_500_000 * 1024

  def limited():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  w = tmp_path / "run"
  r = subprocess.run([sys.executable, "-m", "adpe_jax.main", *SMOKE, f"--workdir={w}",
                      "--config.total_steps=2"], cwd=ROOT, capture_output=True, text=True,
                     timeout=300, preexec_fn=limited)
  assert r.returncode in (128 + signal.SIGABRT, 128 + signal.SIGSEGV), r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert re.match(r"error: the run aborted \(SIG(ABRT|SEGV)\) during (the start|the compile|"
                  r"the first training step).*, most likely because host or device memory ran "
                  r"out \(an address-space limit such as `ulimit -v` ends a run this way", last), last
  assert f"resumes from step 0 (no complete checkpoint yet in {w}/checkpoints)" in last
  assert not w.exists(), sorted(p.name for p in w.iterdir())  # left as found (issue 28 #11)


# A child that starts a run in WORKDIR as run.py does (the lock file, held; checkpoints/;
# with "config", config.json too; with "worker", a forked process -- an input worker -- that
# inherits the held lock and outlives it by 3 s), then aborts in C++ before anything else.
STARTING_CHILD = """
import fcntl, os, pathlib, signal, sys, time
w = pathlib.Path(sys.argv[1])
w.mkdir(exist_ok=True)
fd = os.open(w / ".adpe_lock", os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
(w / "checkpoints").mkdir(exist_ok=True)
if sys.argv[2] == "config":
  (w / "config.json").write_text("{}")
if sys.argv[2] == "worker" and os.fork() == 0:
  time.sleep(3)
  os._exit(0)
os.kill(os.getpid(), signal.SIGABRT)
"""


@pytest.mark.parametrize("case", ["fresh", "made_by_user", "earlier_run", "config_written",
                                  "lock_still_held"])
def test_a_child_aborting_before_config_json_leaves_the_workdir_as_it_found_it(tmp_path, case):
  """What an abort at the first jit (no Python handler) leaves: nothing this start made,
  like a refused start (tests/test_refusals.py), checked against the listing before."""
  w = tmp_path / "w"
  if case != "fresh":
    w.mkdir()
  if case == "earlier_run":
    (w / "config.json").write_text('{"earlier": 1}')
    (w / "checkpoints" / "5").mkdir(parents=True)

  def listing():
    return {str(p.relative_to(tmp_path)): p.read_bytes() if p.is_file() else None
            for p in tmp_path.rglob("*")}
  before = listing()
  arg = {"config_written": "config", "lock_still_held": "worker"}.get(case, "-")
  rc = supervisor.supervise(str(w), [sys.executable, "-c", STARTING_CHILD, str(w), arg],
                            multi_process=False)
  assert rc == 128 + signal.SIGABRT
  after = listing()
  if case == "config_written":  # past its refusals: a run's files, kept
    assert set(after) == {"w", "w/.adpe_lock", "w/checkpoints", "w/config.json"}
  elif case == "lock_still_held":  # a process of the run holds the lock: it stays
    assert after == {**before, "w/.adpe_lock": b""}
    fd = os.open(w / ".adpe_lock", os.O_RDONLY)  # (held: the worker is alive)
    with pytest.raises(BlockingIOError):
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
  else:
    assert after == before


# -- memory: errors a handler sees ------------------------------------------------------------

# Runs adpe_jax.main with the train step raising XLA's out-of-memory error at step 3.
OOM_HOOK = f"""
import runpy, sys
import jax
from adpe_jax.train import loop
real = loop.train
def train(*args, step_fn, **kwargs):
  def step(state, i, batch):
    if i == 2:
      raise jax.errors.JaxRuntimeError({XLA_OOM!r})
    return step_fn(state, i, batch)
  return real(*args, step_fn=step, **kwargs)
loop.train = train
sys.argv = ["adpe_jax.main"] + sys.argv[1:]
runpy.run_module("adpe_jax.main", run_name="__main__", alter_sys=True)
"""


def test_out_of_memory_in_a_training_step_names_it_and_keeps_the_checkpoint(tmp_path):
  hook = tmp_path / "hook.py"
  hook.write_text(OOM_HOOK)
  w = tmp_path / "run"
  r = subprocess.run([sys.executable, str(hook), *SMOKE, f"--workdir={w}",
                      "--config.total_steps=6", "--config.log_every_steps=1",
                      "--config.checkpoint_every_steps=2"], cwd=ROOT, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == errors.ExitCode.REFUSED, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: out of memory during training step 3: device or host memory "
                         f"ran out (XLA: {XLA_OOM})"), last
  assert "Traceback" not in r.stderr
  assert f"resumes from the last complete checkpoint {w}/checkpoints/2;" in last, last
  assert rundir.complete_steps(w / "checkpoints") == [2]
  assert rundir.unfinished(w / "checkpoints") == []


def test_no_thread_for_a_save_names_the_save_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch):
  real_save = CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step != 4:
      return real_save(self, step, *args, **kwargs)
    start = threading.Thread.start

    def no_thread(thread):
      raise RuntimeError("can't start new thread")
    monkeypatch.setattr(threading.Thread, "start", no_thread)
    try:
      return real_save(self, step, *args, **kwargs)
    finally:
      monkeypatch.setattr(threading.Thread, "start", start)
  monkeypatch.setattr(CheckpointManager, "save", save)
  w = tmp_path / "run"
  with pytest.raises(errors.CheckpointError) as e:
    train_and_evaluate(smoke_config(), str(w))
  said = main._out_of_memory(e.value, str(w))
  assert said is not None and said.startswith(
      "out of memory during the save at step 4: host memory ran out (a new thread could not "
      "be started: can't start new thread)"), said
  assert f"resumes from the last complete checkpoint {w}/checkpoints/2;" in said, said
  assert rundir.complete_steps(w / "checkpoints") == [2]


def test_a_memory_error_of_the_compile_is_named_as_such():
  phase.enter("compile")
  assert main._out_of_memory(MemoryError(), None).startswith(
      "out of memory during the compile (building the model, its initial state and the train "
      "step): host memory ran out (MemoryError)")
  assert main._out_of_memory(RuntimeError("INTERNAL: something else"), None) is None


# -- a full disk between saves ----------------------------------------------------------------

def test_a_run_file_that_cannot_be_written_saves_that_step_and_the_resume_is_exact(
    tmp_path, monkeypatch):
  a, b = tmp_path / "a", tmp_path / "b"
  out_a = train_and_evaluate(smoke_config(), str(a))
  path_type = type(storage.as_path(str(b)))
  real_open = path_type.open

  class Full:
    """metrics.jsonl opened for appending on a disk that fills at the record of step 5."""

    def __init__(self, f):
      self.f = f

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def write(self, text):
      if text.startswith('{"step": 5,'):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))   # (a write names no file)
      return self.f.write(text)

  def open_(self, mode="r", *args, **kwargs):
    f = real_open(self, mode, *args, **kwargs)
    return Full(f) if self.name == "metrics.jsonl" and "a" in mode else f
  monkeypatch.setattr(path_type, "open", open_)
  with pytest.raises(errors.RunFileError) as e:
    train_and_evaluate(smoke_config(), str(b))
  assert isinstance(e.value, errors.AdpeError)   # main: one sentence, ExitCode.REFUSED
  assert str(e.value) == (
      f"writing {b}/metrics.jsonl failed: the device holding it is full (No space left on "
      f"device); the state at step 5 is saved in {b}/checkpoints/5; free space there (or give "
      f"the run a workdir with room) and re-run the same command to resume.")
  assert rundir.complete_steps(b / "checkpoints")[-1] == 5   # not a checkpoint step (2, 4, 6)
  monkeypatch.setattr(path_type, "open", real_open)
  out_b = train_and_evaluate(smoke_config(), str(b))   # the same command: resumes at 5
  assert losses(b)[6] == losses(a)[6]
  for x, y in zip(leaves(out_a["state"]), leaves(out_b["state"])):
    np.testing.assert_array_equal(x, y)


# Runs adpe_jax.main with the disk of its workdir filled when the record of step 5 is
# appended to metrics.jsonl (an append into a page the file already has still fits on a
# full tmpfs: the error is raised as the append of a longer record would raise it).
FULL_DISK_HOOK = """
import errno, os, runpy, sys
from adpe_jax import storage
real = storage.append_text
def append_text(path, text):
  if str(path).endswith("metrics.jsonl") and text.startswith('{"step": 5,'):
    with open(os.path.join(os.path.dirname(str(path)), "filler"), "wb", buffering=0) as f:
      try:
        while True:
          f.write(b"x" * 65536)
          f.flush()
      except OSError:
        pass
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
  return real(path, text)
storage.append_text = append_text
sys.argv = ["adpe_jax.main"] + sys.argv[1:]
runpy.run_module("adpe_jax.main", run_name="__main__", alter_sys=True)
"""


@pytest.fixture
def tmpfs(tmp_path):
  """A 16 MiB tmpfs (mounted here; root only), unmounted after."""
  d = tmp_path / "fs"
  d.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(d)],
                     capture_output=True, text=True)
  if r.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
  try:
    yield d
  finally:
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_a_full_disk_where_the_save_fails_too_keeps_the_last_checkpoint(tmp_path, tmpfs):
  hook = tmp_path / "hook.py"
  hook.write_text(FULL_DISK_HOOK)
  w = tmpfs / "run"
  args = [*SMOKE, f"--workdir={w}", "--config.total_steps=6", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=1"]
  r = subprocess.run([sys.executable, str(hook), *args], cwd=ROOT, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == errors.ExitCode.REFUSED, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  # The disk fills at step 5, while the save of step 4 may still be in flight: then that
  # save fails (and step 2 is kept), else the save of step 5 fails (and step 4 is kept).
  said = re.match(
      rf"error: writing {re.escape(str(w))}/metrics.jsonl failed: the device holding it is "
      rf"full \(No space left on device\); saving the state at step ([45]) in "
      rf"{re.escape(str(w))}/checkpoints/\1 failed as well \(No space left on device.*\), so "
      rf"the last complete checkpoint {re.escape(str(w))}/checkpoints/([24]) is kept; free space "
      rf"there \(or give the run a workdir with room\) and re-run the same command to "
      rf"resume\.$", last)
  assert said, last
  kept = int(said.group(2))
  failed, kept = int(said.group(1)), int(said.group(2))
  assert kept == failed - 2 and rundir.complete_steps(w / "checkpoints") == [kept]
  left = rundir.unfinished(w / "checkpoints")   # the failed save's folder, where it began
  assert [p.name for p in left] in ([], [f"{failed}{rundir.TMP_SUFFIX}"]), left
  (w / "filler").unlink()   # space again: the same command resumes from step 4
  r = subprocess.run([sys.executable, "-m", "adpe_jax.main", *args], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"from step {kept}" in r.stderr, r.stderr[-3000:]
  assert rundir.unfinished(w / "checkpoints") == []   # removed by the first save, saying so
  assert all(f"removing unfinished checkpoint {p}" in r.stderr for p in left), r.stderr[-3000:]
  assert json.loads((w / "summary.json").read_text())["status"] == "finished"
