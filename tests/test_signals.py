"""Signals at any phase: a stop request kept until it is honoured (Ctrl-C during the
restore), SIGHUP as a preemption (save, `preempted`, exit 0; forwarded as SIGTERM to a
multi-process child), an ignored SIGHUP (`nohup`) left ignored, and no run that ended
exiting 128 + n.  docs/running.md's signals table is what these pin down."""

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time


from adpe_jax import supervisor
from adpe_jax.train import stop
from adpe_jax.train.stop import AgreedStop, PreemptedError, PreemptionGuard
from watched import Watched, default_hangup

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOKE = ["--config=configs/vitb_ape.py:smoke", "--config.compilation_cache=none"]


@contextlib.contextmanager
def handlers(**signals):
  """Sets the named signals' handlers (SIGTERM=...) inside, restores them after."""
  saved = {getattr(signal, n): signal.getsignal(getattr(signal, n)) for n in signals}
  try:
    for n, h in signals.items():
      signal.signal(getattr(signal, n), h)
    yield
  finally:
    for s, h in saved.items():
      signal.signal(s, h)


# -- in-process: the guards ---------------------------------------------------------------------

def test_a_request_whose_exception_was_lost_reaches_the_loops_guard():
  # main's guard got SIGINT (its PreemptedError swallowed, as orbax's asyncio callbacks
  # drop it during the restore); the loop's guard, entered inside, starts with it.
  with handlers(SIGINT=signal.default_int_handler, SIGTERM=signal.SIG_DFL):
    with PreemptionGuard() as outer:
      with contextlib.suppress(PreemptedError), outer.interrupting(), contextlib.suppress(
          PreemptedError):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
      assert outer.requested and outer.signum == signal.SIGINT
      with AgreedStop(multi_process=False) as agreed:
        assert agreed.requested_before_start() == signal.SIGINT
        assert agreed.should_stop(1)
    # Once both are gone, a new guard starts clean (a request is not global for ever).
    with AgreedStop(multi_process=False) as agreed:
      assert agreed.requested_before_start() is None and not agreed.should_stop(1)
    # Several processes: JAX's preemption manager decides; nothing is inherited.
    assert AgreedStop(multi_process=True).requested_before_start() is None


def test_sighup_is_a_stop_signal_unless_ignored():
  with handlers(SIGHUP=signal.SIG_DFL):
    assert signal.SIGHUP in stop.stop_signals()
    with PreemptionGuard() as guard:
      os.kill(os.getpid(), signal.SIGHUP)
      assert guard.requested and guard.signum == signal.SIGHUP   # and we are alive
      os.kill(os.getpid(), signal.SIGHUP)                        # a second one: no abort
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
  with handlers(SIGHUP=signal.SIG_IGN):   # nohup: the run asked to outlive its terminal
    assert signal.SIGHUP not in stop.stop_signals()
    with PreemptionGuard():
      assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    with stop.interruptible(multi_process=True):
      assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


def test_sighup_of_a_multi_process_child_becomes_sigterm():
  # JAX's preemption manager acts on SIGTERM only: a hang-up is handed to it as one.
  got = []
  with handlers(SIGHUP=signal.SIG_DFL, SIGTERM=lambda s, f: got.append(s)):
    with stop.interruptible(multi_process=True) as guard:
      assert guard is None
      os.kill(os.getpid(), signal.SIGHUP)
      deadline = time.time() + 5
      while not got and time.time() < deadline:
        time.sleep(0.01)
    assert got == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


def test_the_supervisor_forwards_sighup_as_sigterm(tmp_path):
  ready = tmp_path / "ready"
  child = ("import pathlib, signal, sys, time; "
           "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
           "signal.signal(signal.SIGHUP, lambda *a: sys.exit(5)); "
           f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60); sys.exit(9)")

  def send():
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGHUP)

  with handlers(SIGHUP=signal.SIG_DFL):
    threading.Thread(target=send, daemon=True).start()
    t0 = time.time()
    rc = supervisor.supervise(str(tmp_path), [sys.executable, "-c", child])
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL   # the supervisor's is gone
  assert rc == 0 and time.time() - t0 < 30   # the child got SIGTERM (5: it got SIGHUP)


# -- command lines --------------------------------------------------------------------------------

def saved_steps(workdir) -> list:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def loss_steps(workdir) -> list:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def test_sigterm_while_compiling_leaves_no_trace_of_the_start(tmp_path):
  # The start is undone as a refusal's is: a new workdir interrupted before config.json
  # (here in the compile, XLA's cache off) is removed again, lock file and all.
  w = tmp_path / "new"
  run = Watched([*SMOKE, f"--workdir={w}", "--config.total_steps=4"])
  run.wait_for("mesh {")
  run.proc.send_signal(signal.SIGTERM)
  rc, err = run.finish()
  assert rc == 128 + signal.SIGTERM, err[-3000:]
  assert err.splitlines()[-1].startswith(
      "error: interrupted by SIGTERM outside the training steps"), err[-3000:]
  assert not w.exists(), sorted(p.name for p in w.rglob("*"))


def test_sighup_saves_the_current_step_like_sigterm_and_the_rerun_resumes(tmp_path):
  args = [*SMOKE, f"--workdir={tmp_path}", "--config.total_steps=100000",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=0"]
  run = Watched(args)
  run.wait_for("step 3 loss")
  run.proc.send_signal(signal.SIGHUP)
  rc, err = run.finish()
  assert rc == 0, err[-3000:]   # as SIGTERM: saved, preempted, exit 0
  assert "got SIGHUP" in err, err[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == "preempted"
  saved = saved_steps(tmp_path)
  assert saved and saved[-1] == summary["steps"] >= 3
  # The same command (two more steps of it): it resumes at the saved step.
  r = subprocess.run([sys.executable, "-m", "adpe_jax.main", *args,
                      "--config.max_steps_per_run=2"], cwd=ROOT, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"from step {saved[-1]}" in r.stderr, r.stderr[-3000:]
  again = json.loads((tmp_path / "summary.json").read_text())
  assert (again["status"], again["steps"]) == ("stopped", saved[-1] + 2)
  assert loss_steps(tmp_path)[-2:] == [saved[-1] + 1, saved[-1] + 2]


# Runs adpe_jax.main with Checkpointer.restore sending this process SIGINT and swallowing
# what the handler raises -- what orbax's asyncio callbacks do with a BaseException other
# than KeyboardInterrupt (logged as "Exception in callback", dropped) -- then restoring.
SWALLOWING_RESTORE = """
import os, runpy, signal, sys, time
from adpe_jax import checkpoint
real = checkpoint.Checkpointer.restore
def restore(self, *args, **kwargs):
  try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1.0)
  except BaseException as e:
    print(f"hook: swallowed {type(e).__name__}", file=sys.stderr, flush=True)
  return real(self, *args, **kwargs)
checkpoint.Checkpointer.restore = restore
sys.argv = ["adpe_jax.main"] + sys.argv[1:]
runpy.run_module("adpe_jax.main", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_during_the_restore_is_kept_and_a_run_that_ended_never_exits_130(tmp_path):
  hook = tmp_path / "hook.py"
  hook.write_text(SWALLOWING_RESTORE)
  w = tmp_path / "run"
  args = [*SMOKE, f"--workdir={w}", "--config.total_steps=4", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=2"]
  hooked = lambda: subprocess.run(  # noqa: E731
      [sys.executable, str(hook), *args], cwd=ROOT, capture_output=True, text=True,
      timeout=300, preexec_fn=default_hangup)
  # 1. Ctrl-C during the restore, its exception lost: the run stops before training, with
  #    the sentence and code of an interrupt outside the training steps.
  r = hooked()
  assert "hook: swallowed PreemptedError" in r.stderr, r.stderr[-3000:]
  assert r.returncode == 130, r.stderr[-3000:]
  assert r.stderr.splitlines()[-1].startswith(
      "error: interrupted by SIGINT outside the training steps"), r.stderr[-3000:]
  assert loss_steps(w) == [] and not (w / "summary.json").exists()
  assert not (w / "checkpoints").exists() or saved_steps(w) == []
  # 2. The same command, uninterrupted: it trains and finishes.
  r = subprocess.run([sys.executable, "-m", "adpe_jax.main", *args], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  finished = (w / "summary.json").read_text()
  assert json.loads(finished)["status"] == "finished"
  # 3. Ctrl-C lost during the restore of the finished run: it ended (nothing to do), so it
  #    exits 0, not 130, and its summary stays as it was.
  r = hooked()
  assert "hook: swallowed PreemptedError" in r.stderr, r.stderr[-3000:]
  assert r.returncode == 0, r.stderr[-3000:]
  assert (w / "summary.json").read_text() == finished
  assert "outside the training steps" not in r.stderr
