"""Several processes, one run: 2 processes x 2 fake CPU devices (gloo collectives, a local
coordinator on 127.0.0.1) against 1 process x 4 devices -- the pair running the fused
Pallas attention (shard_map over the batch across both processes, interpret mode), the
single process the XLA one; resume from the checkpoint both wrote; SIGTERM to ONE
process stops both at one agreed step; a killed peer makes the other exit non-zero,
naming it, in bounded time."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOKE = ["--config=configs/vitb_ape.py:smoke", "--config.data.source=fashion_mnist",
         "--config.log_every_steps=1"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict:
  e = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
           JAX_PLATFORMS="cpu")
  e.pop("JAX_COORDINATOR_ADDRESS", None)
  return e


def start_pair(workdir, *overrides, heartbeat=100):
  port = free_port()
  procs = []
  for i in (0, 1):
    cmd = [sys.executable, "-m", "adpe_jax.main", *SMOKE, f"--workdir={workdir}",
           f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
           f"--config.distributed.heartbeat_timeout_seconds={heartbeat}", *overrides]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(2), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


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


def test_killed_peer_makes_the_other_exit_naming_it(tmp_path):
  w = tmp_path / "kill"
  procs = start_pair(w, "--config.total_steps=100000", "--config.checkpoint_every_steps=0",
                     heartbeat=10)
  metrics = w / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    time.sleep(0.3)
  assert metrics.exists(), "the run did not start logging"
  procs[1].kill()
  t0 = time.time()
  rc, err = finish(procs[:1], timeout=120)[0]
  elapsed = time.time() - t0
  procs[1].communicate()
  assert rc != 0
  assert elapsed < 60, elapsed            # heartbeat timeout 10 s, plus slack
  # Our sentence, or JAX's own verdict if its coordination service aborts us first.
  assert ("lost peer: process 1 of 2" in err
          or "stopped sending heartbeats):\n1" in err or "Task 1 heartbeat timeout" in err), err[-3000:]
