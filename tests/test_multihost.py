"""Several processes, one run: 2 processes x 2 fake CPU devices (gloo collectives, a local
coordinator on 127.0.0.1) against 1 process x 4 devices -- the pair running the fused
Pallas attention (shard_map over the batch across both processes, interpret mode), the
single process the XLA one; resume from the checkpoint both wrote; SIGTERM to ONE
process stops both at one agreed step; a peer killed mid-save makes the other exit
non-zero, naming it, in bounded time, with the complete checkpoints kept.  The faults JAX
ends with a C++ abort (coordinator killed, frozen peer, a peer that never joins) and two
processes started with different configs end every survivor with one sentence of ours
(`adpe_jax.supervisor`, the config agreement in `adpe_jax.parallel`): one test runs them
side by side, before compiling."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import ml_collections
import pytest

from adpe_jax import parallel, supervisor
from adpe_jax.config import common
from devices import xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOKE = ["--config=configs/vitb_ape.py:smoke", "--config.data.source=fashion_mnist",
         "--config.log_every_steps=1"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict:
  e = dict(os.environ, XLA_FLAGS=xla_flags(devices),
           JAX_PLATFORMS="cpu")
  e.pop("JAX_COORDINATOR_ADDRESS", None)
  return e


def command(workdir, i, port, *overrides, heartbeat=100):
  return [sys.executable, "-m", "adpe_jax.main", *SMOKE, f"--workdir={workdir}",
          f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
          f"--config.distributed.heartbeat_timeout_seconds={heartbeat}", *overrides]


def start_pair(workdir, *overrides, heartbeat=100):
  port = free_port()
  return [subprocess.Popen(command(workdir, i, port, *overrides, heartbeat=heartbeat), cwd=ROOT,
                           env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in (0, 1)]


def finish(procs, timeout=300):
  out = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      p.kill()
      _, err = p.communicate()
      pytest.fail(f"process did not finish in {timeout} s: {err[-2000:]}")
    out.append((p.returncode, err))
  return out


def run_pair(workdir, *overrides):
  results = finish(start_pair(workdir, *overrides))
  for i, (rc, err) in enumerate(results):
    assert rc == 0, f"process {i}: {err[-3000:]}"


def run_single(workdir, *overrides):
  r = subprocess.run([sys.executable, "-m", "adpe_jax.main", *SMOKE, f"--workdir={workdir}",
                      *overrides], cwd=ROOT, env=env(4), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]


def losses(workdir) -> dict:
  recs = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in recs if "loss" in r}


def steps_saved(workdir) -> list:
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """1 process x 4 devices, 8 steps, XLA attention: the losses every layout must reproduce."""
  w = tmp_path_factory.mktemp("one_process")
  run_single(w, "--config.total_steps=8", "--config.checkpoint_every_steps=4",
             "--config.model.attention_impl=xla")
  return losses(w)


def test_two_processes_match_one_and_resume_from_their_checkpoint(reference, tmp_path):
  w = tmp_path / "two"
  pallas = "--config.model.attention_impl=pallas"
  # 2 x 2 devices, stopped after 4 steps with a checkpoint both processes wrote ...
  run_pair(w, "--config.total_steps=8", "--config.checkpoint_every_steps=4",
           "--config.max_steps_per_run=4", pallas)
  assert steps_saved(w) == [4]
  assert json.loads((w / "summary.json").read_text())["status"] == "stopped"
  # ... then the same command again: both restore step 4 and finish (with the end-of-run
  # k-NN and reconstructions, which every process takes part in).
  run_pair(w, "--config.total_steps=8", "--config.checkpoint_every_steps=4",
           "--config.eval.knn_source=fashion_mnist", "--config.eval.knn_train_examples=200",
           "--config.eval.knn_test_examples=64", pallas)
  summary = json.loads((w / "summary.json").read_text())
  assert summary["status"] == "finished" and 0.0 < summary["knn_top1"] <= 1.0
  assert (w / "reconstructions.png").exists()
  got = losses(w)
  assert sorted(got) == list(range(1, 9))  # only process 0 writes metrics: one record a step
  for step in range(1, 9):
    assert got[step] == pytest.approx(reference[step], rel=1e-5), (step, got, reference)
  assert steps_saved(w) == [4, 8]


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes(tmp_path):
  w = tmp_path / "term"
  procs = start_pair(w, "--config.total_steps=100000", "--config.checkpoint_every_steps=0")
  metrics = w / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    time.sleep(0.3)
  assert metrics.exists(), "the run did not start logging"
  procs[1].send_signal(signal.SIGTERM)           # one process only
  results = finish(procs, timeout=180)
  for i, (rc, err) in enumerate(results):
    assert rc == 0, f"process {i}: {err[-3000:]}"
    assert "stop requested by SIGTERM (agreed by all processes)" in err
  summary = json.loads((w / "summary.json").read_text())
  assert summary["status"] == "preempted"
  saved = steps_saved(w)
  assert saved == [summary["steps"]], saved      # one save, at the agreed step
  stop = saved[0]
  # Re-running continues exactly where the agreed step left off (same total_steps, so the
  # same lr schedule; compared with one process running that far in one go).
  run_pair(w, "--config.total_steps=100000", "--config.checkpoint_every_steps=0",
           "--config.max_steps_per_run=2")
  got = losses(w)
  assert steps_saved(w)[-1] == stop + 2
  ref = tmp_path / "ref"
  run_single(ref, "--config.total_steps=100000", "--config.checkpoint_every_steps=0",
             f"--config.max_steps_per_run={stop + 2}")
  for step in (stop + 1, stop + 2):
    assert got[step] == pytest.approx(losses(ref)[step], rel=1e-5), step


def test_killed_peer_mid_save_makes_the_other_exit_naming_it(tmp_path):
  """A checkpoint every step, and process 1 killed while one is being written: process 0
  exits 3 in bounded time, naming it, and the checkpoints already complete are kept."""
  w = tmp_path / "kill"
  procs = start_pair(w, "--config.total_steps=100000", "--config.checkpoint_every_steps=1",
                     heartbeat=10)
  metrics, saving = w / "metrics.jsonl", w / "checkpoints"

  def mid_save() -> bool:   # a few steps logged, and a checkpoint folder still being written
    return (metrics.exists() and metrics.read_text().count("\n") >= 3 and saving.is_dir()
            and any(p.name.endswith("-tmp") for p in saving.iterdir()))

  deadline = time.time() + 240
  while not mid_save():
    if time.time() > deadline or any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
      err = procs[0].communicate()[1]
      procs[1].communicate()
      pytest.fail(f"no checkpoint was seen being written: nothing to kill mid-save\n{err[-2000:]}")
    time.sleep(0.01)
  procs[1].kill()
  t0 = time.time()
  rc, err = finish(procs[:1], timeout=120)[0]
  elapsed = time.time() - t0
  procs[1].communicate()
  assert rc == 3, err[-3000:]             # a lost peer (docs/running.md "Exit codes")
  assert elapsed < 60, elapsed            # heartbeat timeout 10 s, plus slack
  # Our sentence, or JAX's own verdict if its coordination service aborts us first.
  assert ("lost peer: process 1 of 2" in err
          or "stopped sending heartbeats):\n1" in err or "Task 1 heartbeat timeout" in err), err[-3000:]
  assert steps_saved(w), "no complete checkpoint was kept"


# --- the faults outside the documented one ----------------------------------------------------

def test_supervisor_exit_codes(tmp_path):
  """The supervisor's mapping of a child's end (Popen's return code) to ours."""
  for ours in (0, 1, 2, 3, 130, 143):    # the child's own codes pass through, silently
    assert supervisor.exit_code(ours, {"phase": "joined"}) == (ours, None)
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  (tmp_path / "checkpoints" / "8").mkdir()
  (tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp").mkdir()   # unfinished: not counted
  joined = {"phase": "joined", "process": 1, "processes": 2, "coordinator": "10.0.0.1:1234",
            "heartbeat_timeout": 7}
  code, said = supervisor.exit_code(-signal.SIGABRT, joined, workdir=str(tmp_path))
  assert code == 3
  for part in ("process 1 of 2", "SIGABRT", "process 0 at 10.0.0.1:1234",
               "heartbeat_timeout_seconds=7 s", str(tmp_path / "checkpoints" / "8"),
               "re-run the same command on every host"):
    assert part in said, (part, said)
  joining = {"phase": "joining", "process": 0, "processes": 4, "coordinator": "h:99",
             "initialization_timeout": 5}
  code, said = supervisor.exit_code(-signal.SIGABRT, joining, workdir=str(tmp_path / "none"))
  assert code == 3
  for part in ("process 0 of 4 could not join", "coordinator at h:99", "all 4 processes",
               "initialization_timeout_seconds=5 s"):
    assert part in said, (part, said)
  assert "could not join" in supervisor.exit_code(-signal.SIGSEGV, {})[1]   # no report yet
  # A signal the supervisor forwarded, or SIGKILL: the shell's code, with a sentence.
  code, said = supervisor.exit_code(-signal.SIGINT, joined, forwarded=(signal.SIGINT,))
  assert code == 130 and "SIGINT" in said and "forwarded" in said
  code, said = supervisor.exit_code(-signal.SIGKILL, joined)
  assert code == 137 and "SIGKILL" in said and "out of memory" in said
  code, said = supervisor.exit_code(42, joined)                     # not a code of ours
  assert code == 3 and "exit code 42" in said and "process 1 of 2" in said


def _supervise(tmp_path, capfd, code: str, signal_when=None):
  """supervise() over `python -c code`: (exit code, what reached stderr); SIGTERM to this
  process once the file `signal_when` exists (the supervisor's handler forwards it)."""
  capfd.readouterr()
  if signal_when is not None:
    def send():
      deadline = time.time() + 60
      while not signal_when.exists() and time.time() < deadline:
        time.sleep(0.05)
      os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=send, daemon=True).start()
  rc = supervisor.supervise(str(tmp_path), [sys.executable, "-c", code])
  return rc, capfd.readouterr().err


def test_supervise_passes_codes_and_signals_and_reads_the_report(tmp_path, capfd):
  rc, err = _supervise(tmp_path, capfd, "import sys; print('child says', file=sys.stderr); sys.exit(2)")
  assert (rc, err) == (2, "child says\n")                          # passed through, no sentence
  report = ("from adpe_jax import supervisor; supervisor.report('joined', process=1, "
            "processes=2, coordinator='127.0.0.1:9'); import os; os.abort()")
  rc, err = _supervise(tmp_path, capfd, report)
  assert rc == 3
  assert err.splitlines()[-1].startswith("error: process 1 of 2 was aborted (SIGABRT)"), err
  # SIGTERM reaches the child, which stops cleanly (as JAX's preemption manager does).
  ready = tmp_path / "ready"
  handler = ("import pathlib, signal, sys, time; "
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
             f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60); sys.exit(9)")
  t0 = time.time()
  rc, err = _supervise(tmp_path, capfd, handler, signal_when=ready)
  assert rc == 0 and time.time() - t0 < 30, err
  assert supervisor.supervised() is False and "ADPE_SUPERVISED" not in os.environ


def test_configs_compared_field_by_field():
  def config(**d):
    c = ml_collections.ConfigDict({"blr": 1.5e-3, "seed": 0, "distributed": common.distributed()})
    c.distributed.update(d)
    return c

  zero = parallel._flat_config(config(process_id=0, coordinator_address="a:1"), "runs/x")
  one = parallel._flat_config(config(process_id=1, coordinator_address="b:1"), "runs/x")
  assert zero == one and "blr" in zero and "distributed.heartbeat_timeout_seconds" in zero
  assert parallel.config_mismatch(zero, {1: one}) is None
  other = dict(one, blr=3e-3)
  said = parallel.config_mismatch(zero, {1: one, 2: other, 3: dict(one, seed=5, **{"--workdir": "y"})})
  assert "process 1 " not in said
  assert "process 2 has blr=0.003 (process 0: 0.0015)" in said
  assert "process 3 has --workdir='y' (process 0: 'runs/x'), seed=5 (process 0: 0)" in said
  assert said.count(".") >= 1 and "\n" not in said and said.endswith("nothing on disk was changed.")


def _child_of(pid: int) -> int:
  """The supervised child of a supervisor (its only child)."""
  deadline = time.time() + 30
  while time.time() < deadline:
    kids = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if kids:
      return int(kids[0])
    time.sleep(0.1)
  raise AssertionError(f"supervisor {pid} started no child")


def test_faults_end_every_survivor_with_our_sentence(tmp_path):
  """Side by side, on 2 fake devices per process, none of them compiling a step:
  (a) two processes with different blr: both refuse, before compiling or writing;
  (b) a process whose peer never comes: our sentence after the initialization timeout;
  (c) the coordinator killed after both joined; (d) a frozen (SIGSTOP) peer: the survivor
  ends with our sentence and exit 3 within the heartbeat timeout (+ a margin for this
  loaded machine)."""
  heartbeat, long_run = 5, ("--config.total_steps=100000", "--config.checkpoint_every_steps=0")
  runs = {}

  def start(name, i, port, *overrides):
    log = tmp_path / f"{name}{i}.err"
    runs[name, i] = (subprocess.Popen(
        command(tmp_path / name, i, port, *overrides, heartbeat=heartbeat), cwd=ROOT, env=env(2),
        stdout=subprocess.DEVNULL, stderr=open(log, "w"), text=True), log)

  ports = {name: free_port() for name in "abcd"}
  start("a", 0, ports["a"], "--config.total_steps=4")
  start("a", 1, ports["a"], "--config.total_steps=4", "--config.blr=3e-3")
  start("b", 1, ports["b"], "--config.total_steps=4",
        "--config.distributed.initialization_timeout_seconds=5")
  for name in "cd":
    for i in (0, 1):
      start(name, i, ports[name], *long_run)

  def last_line(name, i):
    lines = runs[name, i][1].read_text().splitlines()
    return lines[-1] if lines else ""

  def wait(name, i, timeout):
    p = runs[name, i][0]
    try:
      return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      p.kill()
      pytest.fail(f"{name}{i} did not end in {timeout} s: {runs[name, i][1].read_text()[-3000:]}")

  try:
    # (c) and (d): both joined and agreed once process 0 wrote config.json.
    deadline = time.time() + 240
    while time.time() < deadline and not all((tmp_path / n / "config.json").exists() for n in "cd"):
      time.sleep(0.2)
    assert (tmp_path / "c" / "config.json").exists(), runs["c", 0][1].read_text()[-3000:]
    assert (tmp_path / "d" / "config.json").exists(), runs["d", 0][1].read_text()[-3000:]
    time.sleep(1.0)  # process 1 past the agreement too
    frozen = _child_of(runs["d", 1][0].pid)
    os.kill(frozen, signal.SIGSTOP)
    t_frozen = time.time()
    runs["c", 0][0].kill()      # the supervisor; its child, the coordinator, dies with it
    t_killed = time.time()
    assert wait("c", 1, 120) == 3, runs["c", 1][1].read_text()[-3000:]
    assert time.time() - t_killed < heartbeat + 25
    said = last_line("c", 1)
    assert said.startswith("error: process 1 of 2") or said.startswith("error: lost peer"), said
    assert "process 0" in said and "re-run the same command on every" in said, said
    assert wait("d", 0, 120) == 3, runs["d", 0][1].read_text()[-3000:]
    assert time.time() - t_frozen < heartbeat + 25
    said = last_line("d", 0)
    assert said.startswith("error: process 0 of 2"), said
    assert f"heartbeat_timeout_seconds={heartbeat} s" in said and "re-run the same" in said, said
    # (a) refused by both, in the same sentence, with nothing written.
    for i in (0, 1):
      assert wait("a", i, 120) == 2, runs["a", i][1].read_text()[-3000:]
    assert last_line("a", 0) == last_line("a", 1)
    assert "process 1 has blr=0.003 (process 0: 0.0015)" in last_line("a", 0)
    assert last_line("a", 0).startswith("error: the 2 processes of this run were started with ")
    assert not (tmp_path / "a").exists()
    # (b) the lone process: the address, the process count, the timeout and what to do.
    assert wait("b", 1, 120) == 3, runs["b", 1][1].read_text()[-3000:]
    said = last_line("b", 1)
    for part in ("error: process 1 of 2 could not join", f"127.0.0.1:{ports['b']}",
                 "all 2 processes", "initialization_timeout_seconds=5 s", "every host"):
      assert part in said, (part, said)
  finally:
    for (name, i), (p, _) in runs.items():
      if p.poll() is None:
        p.kill()             # a supervisor: its child dies with it (also a stopped one)
        p.wait()
