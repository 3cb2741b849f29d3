"""A fake of GCS for the workdir lease's tests (`adpe_jax.workdir_lock.ObjectStore`): a
directory with object-store semantics.  Used by tests/test_workdir_lock.py and
tests/test_storage.py; the GCS backend itself (`GcsObjectStore`) is not tested here
(google-cloud-storage is not installed in the test environment)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from typing import Optional


class LocalObjectStore:
  """A directory with object-store semantics, for tests of the lease (a fake of GCS):
  create is atomic and exclusive (a hard link of a complete file, as O_EXCL), every write
  takes a new generation from a per-object counter that never repeats (not even after a
  delete), and compare-and-swap happens under a flock, so processes may share it."""

  def __init__(self, root):
    self.root = os.fspath(root)

  def _paths(self, name: str) -> tuple[str, str, str]:
    path = os.path.join(self.root, name)
    head, tail = os.path.split(path)
    return path, os.path.join(head, f".{tail}.mutex"), os.path.join(head, f".{tail}.generation")

  @contextlib.contextmanager
  def _locked(self, name: str):
    path, mutex, counter = self._paths(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(mutex, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      yield path, counter
    finally:
      os.close(fd)

  @staticmethod
  def _next_generation(counter: str) -> int:
    try:
      with open(counter) as f:
        gen = int(f.read() or 0) + 1
    except FileNotFoundError:
      gen = 1
    with open(counter, "w") as f:
      f.write(str(gen))
    return gen

  @staticmethod
  def _read(path: str) -> Optional[tuple[bytes, int]]:
    try:
      with open(path, "rb") as f:
        raw = f.read()
    except FileNotFoundError:
      return None
    gen, _, data = raw.partition(b"\n")
    return data, int(gen)

  @staticmethod
  def _write(path: str, data: bytes, gen: int, exclusive: bool) -> bool:
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
      f.write(b"%d\n" % gen + data)
    try:
      if exclusive:
        os.link(tmp, path)  # fails if the object exists: an atomic create-if-absent
      else:
        os.replace(tmp, path)
    except FileExistsError:
      return False
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    return True

  def create_if_absent(self, name, data):
    with self._locked(name) as (path, counter):
      if os.path.exists(path):
        return None
      gen = self._next_generation(counter)
      return gen if self._write(path, data, gen, exclusive=True) else None

  def read_with_generation(self, name):
    with self._locked(name) as (path, _):
      return self._read(path)

  def replace_if_generation(self, name, data, generation):
    with self._locked(name) as (path, counter):
      current = self._read(path)
      if current is None or current[1] != generation:
        return None
      gen = self._next_generation(counter)
      self._write(path, data, gen, exclusive=False)
      return gen

  def delete(self, name, generation=None):
    with self._locked(name) as (path, _):
      current = self._read(path)
      if current is None or (generation is not None and current[1] != generation):
        return False
      os.unlink(path)
      return True
