"""Faults of the input under a run end in one sentence (issue 28, items 6 and 7): a prepared
shard missing at start or damaged while training names the shard and the `prepare` command
that repairs it (and that command does: it writes the damaged shard again and skips the
finished ones); an input worker process killed mid-run names the worker, its pid and the step.

Data: a tiny ImageFolder of noise JPEGs (no dataset needed), prepared into 2 shards.
"""

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from adpe_jax import data
from adpe_jax.checkpoint import rundir
from adpe_jax.data import prepare
from adpe_jax.errors import DataError
from devices import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 32


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
  """N small noise JPEGs in two class folders."""
  root = tmp_path_factory.mktemp("noise")
  rng = np.random.default_rng(0)
  for i in range(N):
    path = root / f"c{i % 2}" / f"{i:03d}.jpg"
    path.parent.mkdir(exist_ok=True)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (36, 40, 3), np.uint8)).save(out, format="JPEG")
    path.write_bytes(out.getvalue())
  return str(root)


def _prepare(jpegs, out) -> dict:
  """`prepare` as its command line calls it (the source name it records is the command's)."""
  source = data.get_source(f"folder:{jpegs}", "train")
  return prepare.prepare(source, str(out), num_shards=2, source_name=f"folder:{jpegs}/train")


def _env(devices: int = 1) -> dict:
  return dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
              PYTHONPATH=os.pathsep.join([ROOT] + sys.path))


def _repair_command(message: str) -> list[str]:
  """The `python -m adpe_jax.tools.prepare ...` command a shard's error names."""
  match = re.search(r"`(python -m adpe_jax\.tools\.prepare [^`]*)`", message)
  assert match, message
  return [sys.executable] + shlex.split(match.group(1))[1:]


def test_a_missing_shard_is_named_at_start(jpegs, tmp_path):
  index = _prepare(jpegs, tmp_path / "p")
  shard = tmp_path / "p" / index["shards"][1]["file"]
  shard.unlink()
  with pytest.raises(DataError) as error:
    data.get_source(f"prepared:{tmp_path / 'p'}")
  message = str(error.value)
  assert str(shard) in message and "does not exist" in message, message
  assert f"--out={tmp_path / 'p'}" in message and "skips" in message, message
  assert "\n" not in message


def test_a_shard_truncated_while_read_or_before_a_start_is_named(jpegs, tmp_path):
  out = tmp_path / "p"
  index = _prepare(jpegs, out)
  shard = out / index["shards"][1]["file"]
  start = index["shards"][1]["start"]
  source = data.get_source(f"prepared:{out}")
  pipe = data.PretrainPipeline(source, 8, 16, 1, num_threads=2)
  source.encoded(start)  # its reader is open, as in a run
  os.truncate(shard, 2000)  # the trial: `truncate -s 2000` while training
  with pytest.raises(DataError, match=re.escape(str(shard)) + ".* damaged"):
    source.encoded(start + 1)
  with pytest.raises(DataError, match=re.escape(str(shard)) + ".* damaged"):
    list(pipe.iterate(0, 4))  # through the pipeline's threads: the same sentence
  pipe.close()
  # A start (a resume) on the damaged shard: refused when the source is opened.
  with pytest.raises(DataError, match=re.escape(str(shard)) + ".* damaged") as error:
    data.get_source(f"prepared:{out}")
  assert "prepare" in str(error.value) and "\n" not in str(error.value)
  # An index from before shard sizes were recorded: found on the first read instead.
  meta = json.loads((out / prepare.INDEX).read_text())
  del meta["shard_bytes"]
  (out / prepare.INDEX).write_text(json.dumps(meta))
  old = data.get_source(f"prepared:{out}")
  with pytest.raises(DataError, match=re.escape(str(shard)) + ".* damaged"):
    old.encoded(start)
  # Truncated at a block boundary: the file opens, with too few records.
  _prepare(jpegs, out)
  os.truncate(shard, 65536)
  with pytest.raises(DataError, match=re.escape(str(shard)) + ".* damaged"):
    data.get_source(f"prepared:{out}").encoded(start)


def test_the_named_prepare_command_rewrites_only_the_damaged_shard(jpegs, tmp_path):
  out = tmp_path / "p"
  r = subprocess.run([sys.executable, "-m", "adpe_jax.tools.prepare", f"--source=folder:{jpegs}",
                      f"--out={out}", "--num_shards=2", "--num_processes=1"],
                     cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  index = json.loads((out / prepare.INDEX).read_text())
  good, bad = (out / s["file"] for s in index["shards"])
  reference = data.get_source(f"prepared:{out}")
  expected = [reference.encoded(i) for i in range(N)]
  stamp = os.stat(good).st_mtime_ns
  os.truncate(bad, 2000)
  with pytest.raises(DataError) as error:
    data.get_source(f"prepared:{out}")
  r = subprocess.run(_repair_command(str(error.value)), cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.stat(good).st_mtime_ns == stamp  # the finished shard is skipped
  repaired = data.get_source(f"prepared:{out}")
  assert [repaired.encoded(i) for i in range(N)] == expected
  assert not list(out.glob("*.tmp*"))


def _wait_for_worker(pool, w: int) -> None:
  """Until worker w has a batch ready for the consumer (its replies sit in the socket)."""
  deadline = time.monotonic() + 60
  while not pool._conns[w].poll(0.05):
    assert time.monotonic() < deadline


@pytest.mark.parametrize("ready", [True, False], ids=["batches-ready", "computing"])
def test_a_killed_worker_is_named_with_its_pid_and_step(ready):
  source = data.get_source("synthetic:24", "train", num_examples=48)
  with data.PretrainPipeline(source, 4, 16, 1, seed=1, num_workers=2, prefetch=2) as pipe:
    stream = pipe.iterate(0)
    got = [next(stream) for _ in range(3)]  # steps 0, 1, 2; step 3 is worker 1's
    pool = pipe._workers
    if ready:  # the dead worker's replies are still in the socket, its shared memory not
      _wait_for_worker(pool, 1)
    pid = pool._procs[1].pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(DataError) as error:
      for batch in stream:
        got.append(batch)
    stream.close()
    message = str(error.value)
    step = len(got)
    assert re.search(rf"Input worker process 1 of 2 \(pid {pid}\) died .*SIGKILL.* step {step}\b",
                     message), message
    assert "\n" not in message
    # The first step not delivered is worker 1's: 3, or a later one of its steps where the
    # kill took effect after the next request had been sent (its replies still came).
    assert step >= 3 and step % 2 == 1
    pipe.num_workers = 0
    for s, batch in enumerate(got):
      np.testing.assert_array_equal(batch["images"], pipe.get_batch(s)["images"])


def _children(pid: int) -> list[int]:
  """Every descendant of `pid` (the run is the supervisor's child: its workers are below)."""
  found = []
  for task in os.listdir(f"/proc/{pid}/task"):
    with open(f"/proc/{pid}/task/{task}/children") as f:
      found += [int(c) for c in f.read().split()]
  return found + [d for c in found for d in _children(c)]


def test_a_run_stops_with_one_sentence_for_a_killed_worker_and_a_damaged_shard(jpegs,
                                                                                tmp_path):
  """The command line: kill -9 of one input worker mid-run, then a resume on a damaged
  shard; each exits 2 with our sentence, no traceback, the checkpoints kept."""
  out, workdir = tmp_path / "p", tmp_path / "run"
  index = _prepare(jpegs, out)
  command = [sys.executable, "-m", "adpe_jax.main", "--config=configs/vitb_ape.py:smoke",
             f"--workdir={workdir}", f"--config.data.source=prepared:{out}",
             "--config.data.num_workers=2", "--config.total_steps=400",
             "--config.log_every_steps=2", "--config.checkpoint_every_steps=2",
             "--config.compilation_cache=none"]
  run = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 240
    while not rundir.complete_steps(workdir / "checkpoints"):
      assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
      time.sleep(0.2)
    workers = [c for c in _children(run.pid)
               if b"worker_main" in open(f"/proc/{c}/cmdline", "rb").read()]
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    _, stderr = run.communicate(timeout=120)
  finally:
    if run.poll() is None:
      run.kill()
      run.communicate()
  assert run.returncode == 2, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert re.fullmatch(rf"error: Input worker process [01] of 2 \(pid {workers[1]}\) died .* step "
                      r"\d+.*", last), last
  kept = rundir.complete_steps(workdir / "checkpoints")
  assert kept, "the last checkpoint is kept"
  shard = out / index["shards"][0]["file"]
  os.truncate(shard, 2000)
  r = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                     timeout=240)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: Prepared shard {shard} ") and "tools.prepare" in last, last
  assert rundir.complete_steps(workdir / "checkpoints") == kept
