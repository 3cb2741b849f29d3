"""One writer per workdir: a second run on a workdir refuses at start, naming the first.

`acquire(workdir, config)` takes the lock after the config's validation and before
anything is written into the workdir or compiled (docs/running.md: why, and the defaults).

* Local disks (`FileLock`): an exclusive `fcntl.flock` on WORKDIR/.adpe_lock, held as long
  as the run.  The kernel drops it when its process ends in any way, so a holder that is
  gone never blocks a resume.  The file names the holder (host, pid, start, command),
  written only once the lock is ours: a refused run changes nothing.
* gs:// (`Lease`): an object store has no flock and a preempted VM releases nothing, so
  "gone" is decided by time.  The lock object holds the holder and a heartbeat; it is
  created only if absent, rewritten every HEARTBEAT_SECONDS on a precondition on the
  generation it last wrote, and counts as gone after TTL_SECONDS without one; a gone lease
  is taken over on a precondition on its stale generation (of two contenders exactly one
  wins).  A holder whose lease was taken over exits at once without saving.  Hosts'
  clocks must agree to well under the TTL.  The lease runs over a four-call `ObjectStore`
  (`GcsObjectStore`; the tests' fake: tests/object_store_fake.py).  Other schemes (s3://,
  az://, hf://) have no lock: a warning says so.
* Several processes are one writer: process 0 takes the lock and every process hears the
  outcome (`parallel.decide_on_process0`), so all go on or all refuse with one sentence.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable, Optional, Protocol

from absl import logging

from adpe_jax.errors import ExitCode, WorkdirBusyError, WorkdirLockError

LOCK_NAME = ".adpe_lock"
HEARTBEAT_SECONDS = 30.0  # one small conditional write (GCS allows one per second per object)
TTL_SECONDS = 120.0       # four heartbeats: three late or failed ones in a row are no loss
_COMMAND_CHARS = 160      # of the holder's command line in a refusal


# -- the holder -------------------------------------------------------------------------------

def _utc(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
      "%Y-%m-%dT%H:%M:%SZ")


def holder_info() -> dict:
  """Who holds a lock: host, pid, start time (UTC), command line, and a token that tells
  this holder from any other (a retried write that did succeed is recognised as ours)."""
  now = time.time()
  argv = list(sys.argv)
  if argv and argv[0].endswith(os.path.join("adpe_jax", "main.py")):
    argv[:1] = ["python", "-m", "adpe_jax.main"]
  return {"host": socket.gethostname(), "pid": os.getpid(), "started_utc": _utc(now),
          "started_unix": now, "command": shlex.join(argv), "token": uuid.uuid4().hex}


def _describe(holder: Optional[dict]) -> str:
  if not holder:
    return "a process whose details are not written yet"
  command = str(holder.get("command", ""))
  if len(command) > _COMMAND_CHARS:
    command = command[:_COMMAND_CHARS] + "..."
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
          f"{holder.get('started_utc', '?')}" + (f", command: {command}" if command else ""))


def _busy_message(workdir: str, holder: Optional[dict], clear: str, lease: str = "") -> str:
  pid, host = (holder or {}).get("pid", "?"), (holder or {}).get("host", "?")
  return (f"workdir {workdir} is in use by another run ({_describe(holder)}{lease}); wait "
          f"for it to end or stop it (kill {pid} on {host}), or pass another --workdir; "
          f"{clear}")


def _parse(data: bytes) -> Optional[dict]:
  try:
    out = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, ValueError):
    return None
  return out if isinstance(out, dict) else None


# -- the locks --------------------------------------------------------------------------------

class WorkdirLock:
  """A held lock: `release()` (idempotent), or use it as a context manager."""

  path: str = ""
  holder: Optional[dict] = None

  def release(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()
    return False


class Unlocked(WorkdirLock):
  """No lock: another process than 0 of a multi-process run (process 0 holds it for all),
  or a scheme with no lock implementation (a warning said so)."""

  def __init__(self, path: str = ""):
    self.path = path


def _flock(fd: int) -> None:
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _same_file(fd: int, path: str) -> bool:
  """Whether the locked descriptor is still the file `path` names: one deleted (by hand)
  between our open and our flock is no lock at all.  Deleting the file frees a lock at
  once, also on NFS, whose server frees a dead host's flock only after its lease time."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return False
  mine = os.fstat(fd)
  return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def _read_holder(fd: int, tries: int = 10) -> Optional[dict]:
  """The holder's info; it writes it just after taking the lock: wait a moment for it."""
  for _ in range(tries):
    holder = _parse(os.pread(fd, 65536, 0))
    if holder:
      return holder
    time.sleep(0.05)
  return None


class FlockUnsupportedError(OSError):
  """The file system has no flock (ENOLCK, ENOSYS, EOPNOTSUPP: e.g. Lustre without its
  flock mount option)."""


class FileLock(WorkdirLock):
  """`fcntl.flock` on a local WORKDIR/.adpe_lock, held until `release()` or the process ends."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd: Optional[int] = None
    for _ in range(10):
      try:
        # No O_TRUNC: a refused run must not wipe the holder's info.  Not inherited (PEP 446).
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
      except OSError as e:
        raise WorkdirLockError(
            f"workdir {workdir} is not writable: creating its lock file {self.path} failed "
            f"({e.strerror}); pass a --workdir you can write to.") from e
      try:
        _flock(fd)
      except OSError as e:
        busy = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        holder = _read_holder(fd) if busy else None
        os.close(fd)
        if not busy:
          raise FlockUnsupportedError(e.errno, e.strerror) from e
        raise WorkdirBusyError(_busy_message(
            workdir, holder, f"if that process is known to be dead on another host, delete "
            f"{self.path} and re-run.")) from None
      if _same_file(fd, self.path):
        break
      os.close(fd)  # deleted (by hand) meanwhile: lock the file the path names now
    else:
      raise WorkdirLockError(f"workdir {workdir}: {self.path} keeps being deleted while this "
                             f"run locks it; stop whatever deletes it and re-run.")
    self._fd = fd
    self.holder = holder_info()
    os.ftruncate(fd, 0)  # ours now: the previous holder's info goes
    os.pwrite(fd, (json.dumps(self.holder, indent=1) + "\n").encode(), 0)

  def release(self) -> None:
    fd, self._fd = self._fd, None
    if fd is None:
      return
    with contextlib.suppress(OSError):
      os.ftruncate(fd, 0)  # no stale holder info for a reader; the file itself stays
    os.close(fd)  # closing the only descriptor drops the flock


# -- object stores (gs://) --------------------------------------------------------------------

class ObjectStore(Protocol):
  """What the lease needs of an object store; a generation identifies one version of an
  object and never repeats for that name.  Each call answers None / False where its
  precondition failed."""

  def create_if_absent(self, name: str, data: bytes) -> Optional[int]: ...
  def read_with_generation(self, name: str) -> Optional[tuple[bytes, int]]: ...
  def replace_if_generation(self, name: str, data: bytes, generation: int) -> Optional[int]: ...
  def delete(self, name: str, generation: Optional[int] = None) -> bool: ...


class GcsObjectStore:
  """A GCS bucket through google-cloud-storage (`if_generation_match` preconditions),
  UNTESTED here (the package is not installed in the test environment).  Requests are
  bounded (20 s with retries), so that a slow heartbeat cannot outlive the TTL unseen."""

  def __init__(self, bucket: str, client: Any = None):
    try:
      from google.api_core import exceptions  # noqa: PLC0415 (optional dependency)
      from google.cloud import storage as gcs  # noqa: PLC0415
    except ImportError as e:
      raise WorkdirLockError(
          f"the workdir lock on gs://{bucket} needs the google-cloud-storage package (pip "
          f"install google-cloud-storage); orbax's gs:// checkpoints need it too.") from e
    self._lost = (exceptions.PreconditionFailed, exceptions.NotFound)
    self._bucket = (client or gcs.Client()).bucket(bucket)
    try:
      from google.cloud.storage.retry import DEFAULT_RETRY  # noqa: PLC0415
      self._kw = dict(timeout=10, retry=DEFAULT_RETRY.with_deadline(20.0))
    except (ImportError, AttributeError):
      self._kw = dict(timeout=10)

  def create_if_absent(self, name, data):
    return self.replace_if_generation(name, data, 0)  # GCS: generation 0 = no live object

  def read_with_generation(self, name):
    blob = self._bucket.get_blob(name, **self._kw)
    if blob is None:
      return None
    try:
      data = blob.download_as_bytes(if_generation_match=blob.generation, **self._kw)
    except self._lost:
      return None  # rewritten or deleted meanwhile: the caller looks again
    return data, int(blob.generation)

  def replace_if_generation(self, name, data, generation):
    blob = self._bucket.blob(name)
    try:
      blob.upload_from_string(data, content_type="application/json",
                              if_generation_match=generation, **self._kw)
    except self._lost:
      return None
    return int(blob.generation)

  def delete(self, name, generation=None):
    try:
      self._bucket.blob(name).delete(if_generation_match=generation, **self._kw)
    except self._lost:
      return False
    return True


def object_store_for(workdir: str) -> Optional[tuple[ObjectStore, str]]:
  """(store, object name) of the lock object of a remote workdir; None: no lock there."""
  if workdir.startswith("gs://"):
    bucket, _, prefix = workdir[len("gs://"):].partition("/")
    return GcsObjectStore(bucket), "/".join(p for p in (prefix.strip("/"), LOCK_NAME) if p)
  return None


def _exit_lost(message: str) -> None:
  """The default for a holder whose lease was taken over: stop at once, writing nothing."""
  print(f"error: {message}", file=sys.stderr)
  sys.stderr.flush()
  os._exit(ExitCode.REFUSED)


class Lease(WorkdirLock):
  """A lease in an object store: acquired on construction (or WorkdirBusyError), kept
  alive by a daemon thread, deleted by `release()`.  `clock`, `on_lost` and
  `start_heartbeat=False` (refresh by hand) are for tests."""

  def __init__(self, store: ObjectStore, name: str, display: str, *,
               ttl_s: float = TTL_SECONDS, heartbeat_s: float = HEARTBEAT_SECONDS,
               clock: Callable[[], float] = time.time,
               on_lost: Callable[[str], None] = _exit_lost, start_heartbeat: bool = True):
    self.store, self.name, self.path = store, name, display
    self.workdir = display.rsplit("/", 1)[0]
    self.ttl_s, self.heartbeat_s, self.clock, self.on_lost = ttl_s, heartbeat_s, clock, on_lost
    self.holder = holder_info()
    self.generation: Optional[int] = None
    self.lost = False
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._take()
    if start_heartbeat:
      self._thread = threading.Thread(target=self._beat, name="adpe-workdir-lease",
                                      daemon=True)
      self._thread.start()

  def _record(self) -> bytes:
    now = self.clock()
    return json.dumps({**self.holder, "heartbeat_unix": now, "heartbeat_utc": _utc(now),
                       "ttl_seconds": self.ttl_s,
                       "heartbeat_seconds": self.heartbeat_s}).encode()

  def _ours(self, data: bytes) -> bool:
    return (_parse(data) or {}).get("token") == self.holder["token"]

  def _take(self) -> None:
    for _ in range(5):
      gen = self.store.create_if_absent(self.name, self._record())
      if gen is not None:
        self.generation = gen
        return
      got = self.store.read_with_generation(self.name)
      if got is None:
        continue  # deleted meanwhile: create it again
      data, gen = got
      if self._ours(data):  # our own create, whose answer was lost and retried
        self.generation = gen
        return
      other = _parse(data)
      ttl = float((other or {}).get("ttl_seconds", self.ttl_s))
      beat = (other or {}).get("heartbeat_unix")
      age = self.clock() - float(beat) if isinstance(beat, (int, float)) else float("inf")
      if age <= ttl:  # alive
        raise WorkdirBusyError(_busy_message(
            self.workdir, other,
            f"if that process is known to be dead, delete {self.path} (gcloud storage rm), "
            f"or re-run in {max(ttl - age, 0.0):.0f} s when its lease counts as gone.",
            lease=f"; its last heartbeat was {age:.0f} s ago, it counts as gone after "
                  f"{ttl:.0f} s without one"))
      new = self.store.replace_if_generation(self.name, self._record(), gen)
      if new is not None:
        logging.warning("workdir %s: took over the lock of a run gone for %.0f s (%s)",
                        self.workdir, age, _describe(other))
        self.generation = new
        return
      # Another run took it over first (or the holder's heartbeat came): look again.
    raise WorkdirBusyError(f"workdir {self.workdir}: its lock {self.path} changed hands "
                           f"five times while this run tried to take it; another run is "
                           f"starting on it: stop one of them, or pass another --workdir.")

  def refresh(self) -> bool:
    """One heartbeat; False (and `on_lost`) if another run has taken the lease over."""
    if self.lost or self.generation is None:
      return False
    new = self.store.replace_if_generation(self.name, self._record(), self.generation)
    if new is not None:
      self.generation = new
      return True
    got = self.store.read_with_generation(self.name)
    if got is not None and self._ours(got[0]):  # our write landed; its answer was lost
      self.generation = got[1]
      return self.refresh()
    self.lost = True
    other = _parse(got[0]) if got else None
    self.on_lost(
        f"this run (pid {os.getpid()}) lost the lock of workdir {self.workdir}: "
        + (f"another run ({_describe(other)}) took it over" if got else
           f"{self.path} was deleted")
        + f" after this run's heartbeat lapsed for over {self.ttl_s:.0f} s (was this process "
        f"frozen or cut off?); it stops at once without saving, and the workdir is the "
        f"other run's now.")
    return False

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        if not self.refresh():
          return
      except Exception as e:  # noqa: BLE001 (a failed heartbeat is retried; the TTL spans several)
        logging.warning("workdir %s: heartbeat of its lock failed (%s); retrying in %.0f s",
                        self.workdir, e, self.heartbeat_s)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=30)
      self._thread = None
    gen, self.generation = self.generation, None
    if gen is None or self.lost:
      return
    try:
      self.store.delete(self.name, generation=gen)
    except Exception as e:  # noqa: BLE001
      logging.warning("workdir %s: could not delete its lock %s (%s); it counts as gone "
                      "%.0f s after its last heartbeat", self.workdir, self.path, e,
                      self.ttl_s)


# -- several processes: one writer -----------------------------------------------------------

_KEY = "adpe_jax/workdir_lock/{}"
_agreements = 0  # every process makes the same sequence of acquire calls


def _take_here(workdir: str) -> WorkdirLock:
  if "://" not in workdir:
    try:
      return FileLock(workdir)
    except FlockUnsupportedError as e:
      # Refusing every run there would stop users who cannot change a mount option.
      logging.warning("workdir %s: its file system cannot flock %s (%s): this run goes on "
                      "WITHOUT a lock; make sure no other run writes into it", workdir,
                      os.path.join(workdir, LOCK_NAME), e.strerror)
      return Unlocked(workdir)
  found = object_store_for(workdir)
  if found is None:
    logging.warning("workdir %s: no lock for %s:// workdirs (gs:// and local disks have one); "
                    "make sure no other run writes into it", workdir, workdir.split("://")[0])
    return Unlocked(workdir)
  store, name = found
  return Lease(store, name, f"{workdir.rstrip('/')}/{LOCK_NAME}")


def agree(take: Callable[[], WorkdirLock], workdir: str, *, key: str, timeout_s: float,
          **coordination) -> WorkdirLock:
  """Process 0 runs `take`, and every process hears the outcome
  (`parallel.decide_on_process0`; `coordination`: its client, process_index and
  process_count, for tests): the lock on process 0, `Unlocked` on the others, or the same
  refusal on all."""
  from adpe_jax import parallel  # noqa: PLC0415 (imports jax: only several processes need it)

  held = []
  parallel.decide_on_process0(key, lambda _: held.append(take()) or "held", timeout_s,
                              what=f"take the lock of workdir {workdir}",
                              error=WorkdirLockError, **coordination)
  return held[0] if held else Unlocked(workdir)


# -- acquire -----------------------------------------------------------------------------------

def acquire(workdir, config=None) -> WorkdirLock:
  """Takes the workdir's lock for this run (process 0 for all processes), or raises
  WorkdirBusyError naming its holder.  The caller releases it, however the run ends:
  `with acquire(...):` in `run.run_task` (the kernel drops a flock at a kill anyway; a
  lease would otherwise wait out its TTL)."""
  import jax  # noqa: PLC0415 (this module is importable without starting jax)
  workdir = os.fspath(workdir)
  if jax.process_count() == 1:
    lock = _take_here(workdir)
  else:
    d = getattr(config, "distributed", None)
    timeout = float(getattr(d, "heartbeat_timeout_seconds", 60) or 60) + 60.0
    global _agreements
    key = _KEY.format(_agreements)
    _agreements += 1
    lock = agree(lambda: _take_here(workdir), workdir, key=key, timeout_s=timeout)
  return lock
