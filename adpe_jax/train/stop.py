"""When a run stops early: SIGTERM / SIGINT / SIGHUP / preemption agreed by every process,
and the exit of a multi-process run whose peer is gone.

The stop policy of the training loop (`loop.train` polls `AgreedStop.should_stop` every
step); `lost_peer_exit` is what `main.py` calls when a multi-process run fails.

A stop request is kept until it is honoured: a guard entered inside another (the loop's
inside `main`'s) starts with the request the outer one got, so a signal whose exception
was swallowed before training (inside orbax's restore: its asyncio callbacks log and drop
a BaseException other than KeyboardInterrupt) still stops the run before its first step.
SIGHUP (an ssh session dropping, a terminal closed) is a preemption notice, as SIGTERM,
unless it is ignored (`nohup`): then it stays ignored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import jax
from absl import logging
from jax.experimental import multihost_utils

from adpe_jax import jax_compat
from adpe_jax.errors import ExitCode, lost_peer_message


# The signals that stop a single-process run (SIGHUP: see `stop_signals`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# The guards entered and not yet exited, outermost first (main thread only): a guard
# entered inside another starts with the request that one got.
_active: list = []


def hangup_ignored() -> bool:
  """Whether SIGHUP is ignored here (`nohup`, or a parent that set SIG_IGN): a run started
  that way asked to outlive its terminal, so no handler of ours replaces that."""
  return signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


def stop_signals() -> tuple:
  """SIGTERM, SIGINT and, unless it is ignored (`hangup_ignored`), SIGHUP."""
  return tuple(s for s in STOP_SIGNALS if s != signal.SIGHUP or not hangup_ignored())


class PreemptedError(BaseException):
  """SIGTERM / SIGINT / SIGHUP arrived where waiting is not an option
  (`PreemptionGuard.interrupting`): during an evaluation it is abandoned, the trained state
  is (or gets) saved, and the run ends as "preempted" so that re-running the same command
  does it; before the loop (compiling, restoring) `main` exits naming the signal, nothing
  being lost.  A BaseException (as KeyboardInterrupt), so that no `except Exception` takes
  it for the failure of what it interrupted."""

  def __init__(self, signum: int | None):
    self.signum = signum
    super().__init__(f"interrupted by {signal_name(signum)}")


def signal_name(signum: int | None) -> str:
  return signal.Signals(signum).name if signum is not None else "a request"


class PreemptionGuard:
  """Turns SIGTERM / SIGINT / SIGHUP into a flag the training loop polls (`guard.requested`).

  Inside `with PreemptionGuard() as guard:` the signals only set the flag; the loop then
  force-saves at the current step, waits and exits. Inside `guard.interrupting()` (an
  evaluation, which may take minutes: longer than a preemption notice lasts) they also
  raise `PreemptedError` at once. A second SIGINT raises KeyboardInterrupt (to abort for
  real). The previous handlers come back on exit. A guard entered while another is active
  starts with its request (`pending_at_start`: the outer one's exception may have been
  swallowed). From a thread other than the main one no handler can be installed;
  `request()` still works.
  """

  def __init__(self, signals=None):
    self.signals = stop_signals() if signals is None else tuple(signals)
    self.pending_at_start = False  # a request an enclosing guard got before this one began
    self.signum: int | None = None
    self._requested = False
    self._raise = False
    self._logged = False
    self._previous: dict = {}

  def _handle(self, signum, frame) -> None:  # noqa: ARG002
    if self._requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    self._requested = True
    if self._raise:
      self._raise = False  # once
      raise PreemptedError(signum)

  @contextlib.contextmanager
  def interrupting(self):
    """Inside: a signal (or one already received) raises `PreemptedError`."""
    if self._requested:
      raise PreemptedError(self.signum)
    self._raise = True
    try:
      yield self
    finally:
      self._raise = False
    if self._requested:
      # The handler's exception was swallowed: it ran inside a gc callback or a __del__
      # ("Exception ignored in ..."), and the evaluation went on.  It still stops here.
      raise PreemptedError(self.signum)

  def request(self) -> None:
    self._requested = True

  @property
  def signalled(self) -> bool:
    """Whether a stop was requested (`requested`, without its log line)."""
    return self._requested

  @property
  def requested(self) -> bool:
    if self._requested and not self._logged:
      self._logged = True
      logging.warning("preemption: got %s; saving a checkpoint and stopping",
                      signal_name(self.signum))
    return self._requested

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("PreemptionGuard outside the main thread: no signal handlers installed")
      return self
    outer = next((g for g in reversed(_active) if g.signalled), None)
    if outer is not None:  # kept until honoured: this guard's owner stops for it
      self.signum, self._requested, self.pending_at_start = outer.signum, True, True
    _active.append(self)
    for s in self.signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h if h is not None else signal.SIG_DFL)
    self._previous = {}
    if self in _active:
      _active.remove(self)


class AgreedStop:
  """One stop step for every process: `agreed.should_stop(step)` on every host, every step.

  One process: the `PreemptionGuard` flag (SIGTERM / SIGINT / SIGHUP handled here).
  Several processes: JAX's preemption sync manager (started by `jax.distributed.initialize`)
  owns SIGTERM -- a notice reaching any host is propagated to all and
  `multihost_utils.reached_preemption_sync_point(step)` turns True on every host at the same
  step -- so no Python handler is installed (one would hide the signal from JAX; SIGHUP is
  turned into SIGTERM by `interruptible`), and a SIGINT ends that process (its peers then
  stop after the heartbeat timeout).
  """

  def __init__(self, multi_process: bool | None = None):
    self.multi = jax.process_count() > 1 if multi_process is None else multi_process
    self.guard = PreemptionGuard(() if self.multi else None)
    self.stopped_by: str | None = None

  def requested_before_start(self) -> int | None:
    """One process: the signal an enclosing guard got before the loop began (its exception
    lost, e.g. inside orbax's restore), or None.  The loop stops for it before its first
    step, as the exception would have stopped the run."""
    if self.multi or not self.guard.pending_at_start:
      return None
    return self.guard.signum if self.guard.signum is not None else signal.SIGTERM

  def should_stop(self, step: int) -> bool:
    if self.multi:
      if multihost_utils.reached_preemption_sync_point(int(step)):
        self.stopped_by = "SIGTERM (agreed by all processes)"
        logging.warning("preemption: all processes stop at step %d; saving", step)
        return True
      return False
    if self.guard.requested:
      self.stopped_by = "signal"
      return True
    return False

  def evaluating(self):
    """The context of an evaluation: one process -- a signal raises `PreemptedError` (the
    loop abandons the evaluation, saves and ends "preempted"); several -- nothing (JAX
    holds SIGTERM until the next agreed sync point, after the evaluation)."""
    return contextlib.nullcontext() if self.multi else self.guard.interrupting()

  def __enter__(self) -> "AgreedStop":
    self.guard.__enter__()
    return self

  def __exit__(self, *exc) -> None:
    self.guard.__exit__(*exc)


@contextlib.contextmanager
def interruptible(multi_process: bool | None = None):
  """SIGTERM / SIGINT / SIGHUP raise `PreemptedError` inside (one process: before the loop,
  and the end-of-run evaluations after it, whose state is already saved); several
  processes: JAX's preemption manager owns SIGTERM, so only SIGHUP gets a handler, which
  sends this process SIGTERM (the same preemption: every process stops at one agreed step
  and saves).  Before JAX has started, pass `multi_process` (`supervisor.detect_launch`):
  asking jax.process_count() would start the backend before the processes join."""
  if jax.process_count() > 1 if multi_process is None else multi_process:
    with hangup_as_sigterm():
      yield None
    return
  with PreemptionGuard() as guard, guard.interrupting():
    yield guard


@contextlib.contextmanager
def hangup_as_sigterm():
  """Inside: SIGHUP sends this process SIGTERM (what JAX's preemption manager, or the
  default action before it starts, acts on); nothing when SIGHUP is ignored (`nohup`) or
  outside the main thread."""
  if hangup_ignored() or threading.current_thread() is not threading.main_thread():
    yield
    return

  def resend(signum, frame):  # noqa: ARG001
    logging.warning("got SIGHUP: treated as a preemption notice (SIGTERM)")
    os.kill(os.getpid(), signal.SIGTERM)

  previous = signal.signal(signal.SIGHUP, resend)
  try:
    yield
  finally:
    signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)


def lost_peer_exit(error: BaseException, heartbeat_timeout: float) -> None:
  """A failure in a multi-process run: name the process that is gone, exit LOST_PEER (BUG
  if none is: a failure every process shares, e.g. a bug).

  A dead peer first shows up as a failed collective (e.g. gloo's 'Connection reset by
  peer'); JAX's coordination service declares it dead after the heartbeat timeout.  Wait
  (bounded) for that verdict and name it; if the service aborts this process first, its
  own message names the task ('Task N heartbeat timeout').  Never hangs.
  """
  n, me = jax.process_count(), jax.process_index()
  first = " ".join(str(error).split())[:300]
  print(f"error: process {me} of {n}: {type(error).__name__}: {first}", file=sys.stderr)
  sys.stderr.flush()
  if isinstance(error, FloatingPointError):  # agreed by all processes (a global value)
    os._exit(ExitCode.BUG)
  dead: list[int] = []
  answers = {"ok": 0, "failed": 0}
  deadline = time.time() + float(heartbeat_timeout) + 15
  client = jax_compat.coordination_client()

  def ask() -> None:  # get_live_nodes may block: asked from a daemon thread
    while client is not None and time.time() < deadline and not dead:
      try:
        live = client.get_live_nodes(list(range(n)))
        answers["ok"] += 1
        dead.extend(i for i in range(n) if i not in live)
      except Exception:  # noqa: BLE001
        answers["failed"] += 1
      if not dead:
        time.sleep(1.0)

  asker = threading.Thread(target=ask, daemon=True)
  asker.start()
  asker.join(timeout=max(0.0, deadline - time.time()))
  if dead or (me != 0 and answers["failed"] and not answers["ok"]):
    # No answer at all: the coordination service, in process 0, is gone.
    who = ", ".join(f"process {i}" for i in dead) if dead else "process 0 (the coordinator)"
    print(f"error: {lost_peer_message(me, n, heartbeat_timeout, lost=who)}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(ExitCode.LOST_PEER)  # the supervisor passes it through
  print(f"error: process {me} of {n} stops after a failure shared with its peers (see the "
        f"other processes' logs); re-run the same command on every process to resume.",
        file=sys.stderr)
  sys.stderr.flush()
  os._exit(ExitCode.BUG)
