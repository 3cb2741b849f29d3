"""The supervisor of a launch: our last sentence when JAX aborts the process.

When a peer or the coordinator (process 0) of a multi-process run dies or freezes, or a
peer never joins, JAX's distributed runtime and gloo end the survivors with a fatal C++
abort (SIGABRT, rc 134): nothing in the process can catch it or print after it.  So
`python -m adpe_jax.main` of a multi-process launch runs the real work in a child
process (the same command line, `ADPE_SUPERVISED=1` in its environment so that it does
not supervise again) and waits:

* stdin / stdout / stderr are the child's own (inherited); SIGTERM / SIGINT sent to the
  supervisor are forwarded to it (so a preemption notice reaches JAX's preemption manager
  in the child, which stops all processes at one agreed step, saves and exits 0), and
  SIGHUP (a dropped ssh session, a closed terminal) is forwarded to a multi-process child
  as SIGTERM (JAX's manager acts on SIGTERM only, and a hang-up is a preemption; a single
  process handles SIGHUP itself), unless SIGHUP is ignored (`nohup`: then it stays
  ignored, here and in the child); the child dies with the supervisor
  (PR_SET_PDEATHSIG), so `kill -9` of a process ends it.
* the child's exit codes that are ours pass through (`exit_code`): `errors.ExitCode` (OK
  finished / stopped / preempted, BUG a traceback, REFUSED a refusal or stop of ours,
  LOST_PEER named by the child itself), 128 + n a signal outside the training steps.
* any other end (killed by a signal, an exit code we never produce) becomes one sentence
  of ours, printed as the last line, and LOST_PEER (128 + n for a signal the supervisor
  forwarded or a SIGKILL): which process, what most likely happened (it could not join;
  a peer or the coordinator was lost or froze for the heartbeat timeout), the last
  complete checkpoint, and what to do.

The child tells the supervisor how far it got (`report`: joining, joined) through a pipe
whose descriptor is in `ADPE_SUPERVISOR_FD`, so that the sentence can tell a process that
never joined from one whose peer was lost, and which phase it is in (`adpe_jax.phase`:
compile, restore, training step N, save at step N).

A single-process run is supervised too (`multi_process=False`): it has no peers, but
memory exhausted under an address-space limit (`ulimit -v`) aborts it in C++ (SIGABRT /
SIGSEGV) and the kernel's out-of-memory killer sends SIGKILL; the supervisor's sentence
names the phase and what to lower (`_single_process_end`), with the shell's code 128 + n.
A terminal's Ctrl-C reaches the child directly (the same process group): it is not
forwarded a second time (`_terminal_interrupt`).  ADPE_SUPERVISED=1 in the environment
runs without a supervisor (a debugger).

`detect_launch` decides whether a launch is one of several processes (the supervisor's
question, and what `parallel.initialize_distributed` joins).  This module imports nothing
of JAX (the supervisor never starts a backend).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading

from adpe_jax import phase as phase_lib
from adpe_jax.checkpoint import rundir
from adpe_jax.errors import MEMORY_KNOBS, ExitCode, lost_peer_message
from adpe_jax.phase import REPORT_FD, SUPERVISED
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# What the child gets for a signal the supervisor forwards (others: the same signal).
FORWARDED_AS = {signal.SIGHUP: signal.SIGTERM}


@dataclasses.dataclass(frozen=True)
class Launch:
  """What this process's launch is (`detect_launch`): `kind` "" for a single process;
  "explicit" (a coordinator address in config.distributed or JAX_COORDINATOR_ADDRESS),
  "slurm" (> 1 task), "tpu_pod" (a multi-host TPU slice) or "gke" (JOBSET / indexed jobs),
  which `jax.distributed.initialize()` detects itself.  `num_processes` 0 and `process_id`
  -1: not known before joining."""

  kind: str = ""
  coordinator: str = ""
  num_processes: int = 0
  process_id: int = -1

  @property
  def multi_process(self) -> bool:
    return bool(self.kind)


def detect_launch(config=None) -> Launch:
  """What `parallel.initialize_distributed` will join, decided without starting JAX's
  backend (which must not start before it joins), nor importing JAX (the supervisor does
  without).  An explicit address with one process is a single-process launch; one with no
  process count or id is reported as a multi-process launch (joining refuses it, naming
  the fields)."""
  d = getattr(config, "distributed", None)
  address = (d.coordinator_address if d is not None else "") or os.environ.get(
      "JAX_COORDINATOR_ADDRESS", "")
  num = (d.num_processes if d is not None else 0) or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
  pid = d.process_id if d is not None and d.process_id >= 0 else int(
      os.environ.get("JAX_PROCESS_ID", "-1"))
  if address:
    return Launch("explicit" if num != 1 else "", address, num, pid)
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return Launch("slurm", "", int(os.environ["SLURM_NTASKS"]),
                  int(os.environ.get("SLURM_PROCID", "-1")))
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return Launch("tpu_pod", "", num, pid)
  if "JOBSET_NAME" in os.environ or "JOB_COMPLETION_INDEX" in os.environ:
    return Launch("gke", "", num, pid)
  return Launch("", "", num, pid)


def supervised() -> bool:
  """Whether this process is the child of a supervisor (so it must not supervise)."""
  return os.environ.get(SUPERVISED) == "1"


def report(phase: str, **info) -> None:
  """Child side: tell the supervisor (if any) how far this process got; never fails."""
  fd = os.environ.get(REPORT_FD)
  if not fd or not supervised():
    return
  with contextlib.suppress(OSError, ValueError):
    os.write(int(fd), (json.dumps({"phase": phase, **info}) + "\n").encode())


def _newest(workdir: str | None) -> tuple[str | None, int | None]:
  """(checkpoints folder, newest complete step) of a local workdir: one listing
  (`rundir.newest_step`); (folder, None) where there is none or it cannot be listed,
  (None, None) for no workdir, and (folder, -1) for a gs:// workdir (not listed here)."""
  if not workdir:
    return None, None
  ckpts = os.path.join(workdir, rundir.CHECKPOINTS)
  if "://" in workdir:
    return ckpts, -1
  try:
    return ckpts, rundir.newest_step(ckpts)
  except OSError:
    return ckpts, None


def last_checkpoint(workdir: str | None) -> str:
  """The newest complete checkpoint of a local workdir, in words (cheap: one listing,
  `rundir.newest_step`; a gs:// workdir is not listed from here)."""
  ckpts, step = _newest(workdir)
  if ckpts is None or step == -1:
    return f"the newest complete checkpoint in {ckpts or 'the workdir'}"
  if step is None:
    return f"no complete checkpoint yet in {ckpts} (the run starts again from step 0)"
  return f"the last complete checkpoint is {os.path.join(ckpts, str(step))}"


def resume_point(workdir: str | None) -> str:
  """`last_checkpoint` as a noun phrase: what re-running the same command resumes from."""
  ckpts, step = _newest(workdir)
  if ckpts is None or step == -1:
    return f"the newest complete checkpoint in {ckpts or 'the workdir'}"
  if step is None:
    return f"step 0 (no complete checkpoint yet in {ckpts})"
  return f"the last complete checkpoint {os.path.join(ckpts, str(step))}"


def _signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


def exit_code(returncode: int, phase: dict | None = None, forwarded=(),
              workdir: str | None = None, multi_process: bool = True
              ) -> tuple[int, str | None]:
  """(exit code, sentence or None) for a child that ended with `returncode` (Popen's:
  -n = killed by signal n), having last reported `phase`, after the supervisor forwarded
  the signals `forwarded`.  None: the child's own code passes through, its last line is
  already ours (or a traceback: a bug)."""
  if returncode in tuple(ExitCode) or returncode >= 128:
    return returncode, None
  if not multi_process:
    return _single_process_end(returncode, phase or {}, forwarded, workdir)
  phase = phase or {}
  me, n = phase.get("process", -1), phase.get("processes", 0)
  who = f"process {me if me >= 0 else '?'} of {n if n > 0 else '?'}"
  address = phase.get("coordinator") or "(auto-detected)"
  resume = (f"re-run the same command on every host to resume ({last_checkpoint(workdir)})")
  if returncode < 0:
    signum = -returncode
    name = _signal_name(signum)
    if signum in forwarded or signum == signal.SIGKILL:
      how = "forwarded to it by its supervisor" if signum in forwarded else (
          "out of memory, or killed by another program")
      return 128 + signum, f"{who} was ended by {name} ({how}); {resume}."
    what = f"was aborted ({name}) by JAX's distributed runtime"
  else:
    what = f"ended with exit code {returncode}, which adpe_jax never uses"
  if phase.get("phase", "joining") == "joining":
    timeout = phase.get("initialization_timeout")
    return ExitCode.LOST_PEER, (
        f"{who} could not join the run: the coordinator at {address} did not gather all "
        f"{n if n > 0 else 'the'} processes within distributed.initialization_timeout_seconds"
        f"={timeout if timeout is not None else '?'} s ({what}); start the same command on "
        f"every host (each with its own distributed.process_id), check that {address} is "
        f"reachable from this host, or raise distributed.initialization_timeout_seconds.")
  return ExitCode.LOST_PEER, lost_peer_message(
      me, n, phase.get("heartbeat_timeout"), ended=what, coordinator=address, resume=resume)


# How a process that ran out of memory most often dies where no handler of ours can see it:
# an allocation failing under an address-space limit (ulimit -v) aborts in C++ (SIGABRT,
# or SIGSEGV), and the kernel's out-of-memory killer sends SIGKILL.
_MEMORY_DEATHS = (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS)


def _single_process_end(returncode: int, phase: dict, forwarded, workdir) -> tuple[int, str]:
  """`exit_code` of a single-process run's child (no peers): the shell's code of a signal
  (128 + n) or the child's unknown exit code, and one sentence naming the phase it last
  reported (`phase_lib.describe`) and, for the deaths of memory exhausted, what to lower."""
  where = phase_lib.describe(phase)
  resume = f"re-run the same command to resume from {resume_point(workdir)}"
  if returncode > 0:
    return returncode, (f"the run ended with exit code {returncode}, which adpe_jax never "
                        f"uses, during {where}; {resume}.")
  signum = -returncode
  name = _signal_name(signum)
  knobs = MEMORY_KNOBS.format(kept=resume_point(workdir))
  if signum in forwarded:
    said = f"the run was ended by {name} (forwarded to it by its supervisor) during {where}"
  elif signum == signal.SIGKILL:
    return 128 + signum, (
        f"the run was killed (SIGKILL) during {where}, most likely by the kernel's "
        f"out-of-memory killer (`dmesg` says) or by another program; if memory ran out: "
        f"{knobs}.")
  elif signum in _MEMORY_DEATHS:
    return 128 + signum, (
        f"the run aborted ({name}) during {where}, most likely because host or device memory "
        f"ran out (an address-space limit such as `ulimit -v` ends a run this way; otherwise "
        f"JAX or XLA crashed: the lines above say which); {knobs}.")
  else:
    said = f"the run was ended by {name} during {where}"
  return 128 + signum, f"{said}; {resume}."


def _terminal_interrupt(signum: int) -> bool:
  """Whether `signum` is a terminal's Ctrl-C that the child got too: SIGINT while this
  process is in its terminal's foreground process group (the child is in the same group),
  so forwarding it would make two (and a second SIGINT aborts the run for real)."""
  if signum != signal.SIGINT:
    return False
  for stream in (sys.stdin, sys.stderr):
    try:
      if stream is not None and stream.isatty():
        return os.tcgetpgrp(stream.fileno()) == os.getpgrp()
    except (OSError, ValueError):
      continue
  return False


def _die_with_parent():
  """A preexec_fn that makes the child get SIGKILL when the supervisor dies (Linux's
  PR_SET_PDEATHSIG; libc is looked up here, before the fork).  None elsewhere: there
  the child may outlive a killed supervisor."""
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  return lambda: prctl(1, signal.SIGKILL)


def child_command() -> list[str]:
  """This process's own command line (interpreter options and `-m adpe_jax.main` kept)."""
  argv = list(getattr(sys, "orig_argv", []) or [])
  if not argv:
    return [sys.executable, *sys.argv]
  return [sys.executable, *argv[1:]]


def supervise(workdir: str | None = None, command: list[str] | None = None,
              multi_process: bool = True) -> int:
  """Run `command` (default: this process's own) as the supervised child; its exit code,
  or ours with a last sentence (`exit_code`; `multi_process` False: a single-process run's
  words, no peers)."""
  # What the workdir held before the child (one process: the only writer), so that a child
  # that dies by a signal before writing config.json (an abort at the first jit) leaves it
  # as it found it, as a refused start does (`rundir.undo_start`).
  before = rundir.before_start(workdir) if workdir and not multi_process else None
  read_fd, write_fd = os.pipe()
  env = dict(os.environ, **{SUPERVISED: "1", REPORT_FD: str(write_fd)})
  child = subprocess.Popen(command or child_command(), env=env, pass_fds=(write_fd,),
                           preexec_fn=_die_with_parent())
  os.close(write_fd)
  forwarded: list[int] = []
  phase: dict = {}

  def forward(signum, frame):  # noqa: ARG001
    if _terminal_interrupt(signum):
      return  # the terminal sent it to the child as well
    # (one process handles SIGHUP itself; JAX's preemption manager acts on SIGTERM only)
    sent = FORWARDED_AS.get(signum, signum) if multi_process else signum
    forwarded.append(sent)
    with contextlib.suppress(ProcessLookupError):
      child.send_signal(sent)

  # An ignored SIGHUP (nohup) stays ignored: that launch asked to outlive its terminal.
  previous = {s: signal.signal(s, forward) for s in FORWARDED
              if s != signal.SIGHUP or signal.getsignal(s) != signal.SIG_IGN}

  def read() -> None:
    with os.fdopen(read_fd, "rb") as f:
      for line in f:
        with contextlib.suppress(ValueError):
          phase.update(json.loads(line))

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    returncode = child.wait()
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
  reader.join(timeout=1.0)  # the child's last report (its data workers may hold the pipe)
  if returncode < 0:
    rundir.undo_start(before, lock_ours=False)
  code, sentence = exit_code(returncode, dict(phase), tuple(forwarded), workdir,
                             multi_process=multi_process)
  if sentence:
    sys.stdout.flush()
    print(f"error: {sentence}", file=sys.stderr, flush=True)
  return code
