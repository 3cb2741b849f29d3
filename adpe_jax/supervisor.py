"""The supervisor of a multi-process launch: our last sentence when JAX aborts the process.

When a peer or the coordinator (process 0) of a multi-process run dies or freezes, or a
peer never joins, JAX's distributed runtime and gloo end the survivors with a fatal C++
abort (SIGABRT, rc 134): nothing in the process can catch it or print after it.  So
`python -m adpe_jax.main` of a multi-process launch runs the real work in a child
process (the same command line, `ADPE_SUPERVISED=1` in its environment so that it does
not supervise again) and waits:

* stdin / stdout / stderr are the child's own (inherited); SIGTERM / SIGINT sent to the
  supervisor are forwarded to it (so a preemption notice reaches JAX's preemption manager
  in the child, which stops all processes at one agreed step, saves and exits 0), and
  SIGHUP (a dropped ssh session, a closed terminal) is forwarded as SIGTERM: JAX's manager
  acts on SIGTERM only, and a hang-up is a preemption (unless SIGHUP is ignored, `nohup`:
  then it stays ignored, here and in the child); the child dies with the supervisor
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
never joined from one whose peer was lost.  A single-process run has no supervisor: it
has no peers, and every fault of its own is caught in-process.

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

from adpe_jax.checkpoint import rundir
from adpe_jax.errors import ExitCode, lost_peer_message

SUPERVISED = "ADPE_SUPERVISED"
REPORT_FD = "ADPE_SUPERVISOR_FD"
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


def last_checkpoint(workdir: str | None) -> str:
  """The newest complete checkpoint of a local workdir, in words (cheap: one listing,
  `rundir.newest_step`; a gs:// workdir is not listed from here)."""
  if not workdir:
    return "the newest complete checkpoint in the workdir"
  ckpts = os.path.join(workdir, rundir.CHECKPOINTS)
  if "://" in workdir:
    return f"the newest complete checkpoint in {ckpts}"
  try:
    step = rundir.newest_step(ckpts)
  except OSError:
    step = None
  if step is None:
    return f"no complete checkpoint yet in {ckpts} (the run starts again from step 0)"
  return f"the last complete checkpoint is {os.path.join(ckpts, str(step))}"


def _signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


def exit_code(returncode: int, phase: dict | None = None, forwarded=(),
              workdir: str | None = None) -> tuple[int, str | None]:
  """(exit code, sentence or None) for a child that ended with `returncode` (Popen's:
  -n = killed by signal n), having last reported `phase`, after the supervisor forwarded
  the signals `forwarded`.  None: the child's own code passes through, its last line is
  already ours (or a traceback: a bug)."""
  if returncode in tuple(ExitCode) or returncode >= 128:
    return returncode, None
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


def supervise(workdir: str | None = None, command: list[str] | None = None) -> int:
  """Run `command` (default: this process's own) as the supervised child; its exit code,
  or ours with a last sentence (`exit_code`)."""
  read_fd, write_fd = os.pipe()
  env = dict(os.environ, **{SUPERVISED: "1", REPORT_FD: str(write_fd)})
  child = subprocess.Popen(command or child_command(), env=env, pass_fds=(write_fd,),
                           preexec_fn=_die_with_parent())
  os.close(write_fd)
  forwarded: list[int] = []
  phase: dict = {}

  def forward(signum, frame):  # noqa: ARG001
    sent = FORWARDED_AS.get(signum, signum)
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
  code, sentence = exit_code(returncode, dict(phase), tuple(forwarded), workdir)
  if sentence:
    sys.stdout.flush()
    print(f"error: {sentence}", file=sys.stderr, flush=True)
  return code
