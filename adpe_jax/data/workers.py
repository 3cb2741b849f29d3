"""Worker processes for the input pipeline: whole batches computed past the GIL.

Decoding and resizing hold the GIL for a good part of their time (Pillow releases it only in
its inner loops), so threads of one process stop scaling at about 1.5 cores. A `WorkerPool`
runs N processes, each holding a copy of the pipeline (pickled: its source, seed and options,
not its threads), and hands them whole steps: worker w computes get_batch(step) for the steps
start + w, start + w + N, ... in order, up to `prefetch` ahead, and writes each batch into one
of its shared-memory slots; the consumer copies it out and yields the batches in step order.

The contract of `PretrainPipeline` is unchanged: the batch of step s is get_batch(s), a pure
function of (seed, s, process), whichever worker computes it, so resume and any process count
give the same batches; nothing about the workers needs checkpointing.

Each worker is a fresh interpreter (`python -c ...` over a socket pair; never a fork of a
process whose jax runtime or threads are already running, and unlike multiprocessing's "spawn"
it does not re-import the caller's `__main__`, so an unguarded script works and the trainer's
entry point is not imported again). It gets the caller's sys.path, imports numpy, Pillow and
adpe_jax.data (plus whatever the pickled source needs) and never touches jax. A worker's error
(e.g. a DataError naming a file) is re-raised in the consumer; a worker that dies (killed,
out of memory) is named in a DataError with its pid, how it ended and the step whose batch the
consumer waited for, however its death shows (end of file, a broken pipe, its shared memory
gone): the run stops with that sentence and keeps its last checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing import connection, resource_tracker, shared_memory

import numpy as np

from adpe_jax.errors import DataError

_ALIGN = 64


def resolve_num_workers(num_workers: int, backend: str) -> int:
  """config data.num_workers -> processes: -1 = one per usable CPU when the step runs on an
  accelerator (`backend` != "cpu"), else 0 (on CPU the cores compute the step)."""
  if num_workers >= 0:
    return num_workers
  if backend == "cpu":
    return 0
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux.
    return os.cpu_count() or 1


def _attach(name: str) -> shared_memory.SharedMemory:
  """Opens a worker's segment without adopting it: the worker that made it unlinks it."""
  shm = shared_memory.SharedMemory(name=name)
  # Python < 3.13 registers every attach with the resource tracker (bpo-39959), under the
  # POSIX name: the public `name` with the leading slash SharedMemory strips from it.
  tracked = "/" + shm.name if os.name == "posix" else shm.name
  with contextlib.suppress(Exception):
    resource_tracker.unregister(tracked, "shared_memory")
  return shm


def worker_main(fd: int) -> None:
  """A worker process (the first message is the pickled pipeline), then
  ("batch", step, slot) -> ("ok", step, segment name, layout) | ("error", step, exception)."""
  conn = connection.Connection(fd)
  slots: dict[int, shared_memory.SharedMemory] = {}
  try:
    pipeline = pickle.loads(conn.recv_bytes())
    while True:
      message = conn.recv()
      if message is None:
        return
      _, step, slot = message
      try:
        batch = pipeline.get_batch(step)
        layout, offset = [], 0
        for key, value in batch.items():
          value = np.ascontiguousarray(value).reshape(np.shape(value))  # 0-d stays 0-d
          layout.append((key, value.dtype.str, value.shape, offset))
          offset += -(-value.nbytes // _ALIGN) * _ALIGN
        shm = slots.get(slot)
        if shm is None or shm.size < offset:
          if shm is not None:
            shm.close()
            shm.unlink()
          shm = slots[slot] = shared_memory.SharedMemory(create=True, size=max(offset, 1))
        for (key, dtype, shape, start) in layout:
          view = np.ndarray(shape, dtype, buffer=shm.buf, offset=start)
          view[...] = batch[key]
          del view
        conn.send(("ok", step, shm.name, layout))
      except BaseException as e:  # noqa: BLE001 (sent to the consumer, which re-raises it)
        try:
          payload = pickle.dumps(e)
        except Exception:  # noqa: BLE001
          payload = pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}"))
        conn.send(("error", step, payload, None))
  except (EOFError, KeyboardInterrupt, BrokenPipeError):
    return  # the consumer has gone.
  finally:
    for shm in slots.values():
      shm.close()
      shm.unlink()
    pipeline = None
    conn.close()


class WorkerPool:
  """N worker processes computing `pipeline.get_batch(step)`; see the module docstring.

  Args:
    pipeline: a PretrainPipeline (or subclass); each worker gets a pickled copy with
      num_workers=0 and `threads_per_worker` threads.
    num_workers: processes.
    prefetch: batches each worker may compute ahead of the consumer (its shared-memory slots).
    timeout_s: how long a batch may take before the worker is declared stuck.
  """

  def __init__(self, pipeline, num_workers: int, prefetch: int = 2,
               threads_per_worker: int = 1, timeout_s: float = 600.0):
    if num_workers <= 0:
      raise ValueError(f"num_workers must be > 0, got {num_workers}.")
    state = pickle.loads(pickle.dumps(pipeline))  # a copy to configure for the workers.
    state.close()
    state.num_workers, state.num_threads = 0, threads_per_worker
    payload = pickle.dumps(state)
    self.num_workers, self.prefetch = num_workers, max(1, prefetch)
    self.timeout_s = timeout_s
    # The caller's import path (a benchmark's sys.path.insert, pytest's rootdir), so that the
    # worker can unpickle what the caller can.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    self._conns, self._procs = [], []
    for _ in range(num_workers):
      ours, theirs = socket.socketpair()
      proc = subprocess.Popen(
          [sys.executable, "-c",
           f"from adpe_jax.data.workers import worker_main; worker_main({theirs.fileno()})"],
          pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
      theirs.close()
      conn = connection.Connection(ours.detach())
      conn.send_bytes(payload)
      self._conns.append(conn)
      self._procs.append(proc)
    self._segments: dict[str, shared_memory.SharedMemory] = {}
    self._pending: list[int] = [0] * num_workers  # requests sent, replies not yet read.

  def _name(self, w: int) -> str:
    return f"Input worker process {w} of {self.num_workers} (pid {self._procs[w].pid})"

  def _lost(self, w: int, step: int | None, cause: BaseException) -> DataError:
    """The one sentence for worker w gone (dead, or its socket or shared memory broken) while
    the consumer waited for the batch of `step` (None: between iterations)."""
    proc = self._procs[w]
    with contextlib.suppress(subprocess.TimeoutExpired):
      proc.wait(timeout=5)
    self._pending[w] = 0
    when = ("between batches" if step is None
            else f"before the batch of step {step} was delivered")
    code = proc.returncode
    if code is None:  # alive, but what it handed over cannot be read
      return DataError(f"{self._name(w)} failed {when} ({type(cause).__name__}: {cause}); "
                       f"re-run the same command to resume from the last checkpoint.")
    try:
      how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    except ValueError:
      how = f"exit code {code}"
    return DataError(f"{self._name(w)} died ({how}) {when}; the last checkpoint is kept: "
                     f"re-run the same command to resume (lower data.num_workers if the host "
                     f"ran out of memory; the worker's own error, if any, is above).")

  def _receive(self, w: int, step: int | None = None):
    conn, proc = self._conns[w], self._procs[w]
    deadline = time.monotonic() + self.timeout_s
    try:
      while not conn.poll(0.1):
        if proc.poll() is not None:
          raise EOFError("its socket closed")
        if time.monotonic() > deadline:
          raise DataError(f"{self._name(w)} made no batch in {self.timeout_s:.0f} s"
                          + ("" if step is None else f" (the batch of step {step})") + ".")
      message = conn.recv()
    except (EOFError, OSError) as e:
      raise self._lost(w, step, e) from None
    self._pending[w] -= 1
    return message

  def _copy_out(self, name: str, layout) -> dict[str, np.ndarray]:
    shm = self._segments.get(name)
    if shm is None:
      if len(self._segments) > 4 * self.num_workers * self.prefetch:  # replaced segments
        for old in self._segments.values():
          old.close()
        self._segments.clear()
      shm = self._segments[name] = _attach(name)
    return {key: np.ndarray(shape, dtype, buffer=shm.buf, offset=start).copy()
            for key, dtype, shape, start in layout}

  def _drain(self) -> None:
    """Reads the replies of an abandoned iteration, so the next starts clean."""
    for w in range(self.num_workers):
      while self._pending[w] > 0:
        self._receive(w)

  def iterate(self, start_step: int = 0,
              num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """get_batch(start_step), get_batch(start_step + 1), ... computed by the workers."""
    self._drain()
    end = None if num_steps is None else start_step + num_steps
    n, ahead = self.num_workers, self.num_workers * self.prefetch

    def request(step: int, waiting: int) -> None:
      """Asks for the batch of `step`; the consumer waits for the batch of `waiting`."""
      if end is None or step < end:
        w = (step - start_step) % n
        try:
          self._conns[w].send(("batch", step, ((step - start_step) // n) % self.prefetch))
        except OSError as e:  # a broken pipe: the worker has died
          raise self._lost(w, waiting, e) from None
        self._pending[w] += 1

    try:
      for step in range(start_step, start_step + ahead):
        request(step, start_step)
      step = start_step
      while end is None or step < end:
        w = (step - start_step) % n
        kind, got, payload, layout = self._receive(w, step)
        if kind == "error":
          raise pickle.loads(payload)
        assert got == step, (got, step)
        try:
          batch = self._copy_out(payload, layout)
        except OSError as e:  # its shared memory is gone: the worker has died
          raise self._lost(w, step, e) from None
        request(step + ahead, step)  # the slot just read is free again.
        yield batch
        step += 1
    finally:
      with contextlib.suppress(DataError):  # a dead worker: the next call names it.
        self._drain()

  def close(self) -> None:
    """Stops the workers (each unlinks its shared memory) and detaches from their segments."""
    for conn in self._conns:
      with contextlib.suppress(OSError):  # a worker that has already gone.
        conn.send(None)
    for proc in self._procs:
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(timeout=5)
    for shm in self._segments.values():
      shm.close()
    self._segments.clear()
    for conn in self._conns:
      conn.close()
    self._conns, self._procs = [], []
