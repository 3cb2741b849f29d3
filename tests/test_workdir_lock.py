"""One writer per workdir (adpe_jax.workdir_lock, issue 17 item 1): a second run on a held
workdir refuses at start, naming the holder, changing nothing and compiling nothing; a
holder that is gone (SIGKILL) does not block a resume; the gs:// lease over a fake object
store (live refuses, stale is taken over by exactly one, heartbeats keep it alive); the
outcome of process 0 reaches every process."""

import datetime
import errno
import importlib.util
import json
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from adpe_jax import workdir_lock
from adpe_jax.errors import WorkdirBusyError, WorkdirLockError
from devices import xla_flags
from object_store_fake import LocalObjectStore

ROOT = pathlib.Path(__file__).resolve().parent.parent
HOST = socket.gethostname()

# A live holder: takes the lock, compiles one tiny function (a compile must show in its log:
# the check that a refused run compiles nothing can see one), says so, waits for stdin.
HOLDER = """
import json, sys
from adpe_jax import workdir_lock
lock = workdir_lock.FileLock(sys.argv[1])
if sys.argv[2] == "compile":
  import jax
  jax.jit(lambda x: x + 1)(1)
print(json.dumps(lock.holder), flush=True)
sys.stdin.read()
"""


def child_env(**extra) -> dict:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), JAX_PLATFORMS="cpu",
      XLA_FLAGS=xla_flags(2), **extra)
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def start_holder(workdir, mode="plain", **env):
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), mode], cwd=ROOT,
                          env=child_env(**env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  ready, _, _ = select.select([proc.stdout], [], [], 120)
  assert ready, "the holder did not take the lock in 120 s"
  line = proc.stdout.readline()
  assert line, proc.stderr.read()[-2000:]
  return proc, json.loads(line)


def snapshot(top: pathlib.Path) -> dict:
  return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}


def load_config(name, arg="smoke"):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# -- local disks: flock ----------------------------------------------------------------------

def test_twin_run_is_refused_naming_the_holder_and_changes_nothing(tmp_path):
  """The issue's trial: a second `python -m adpe_jax.main` on a workdir whose run is live
  exits 2 with one sentence naming host, pid and start, writes nothing, compiles nothing."""
  work = tmp_path / "twin"
  (work / "checkpoints" / "50" / "state").mkdir(parents=True)
  # What a live run has written (the refused run must not even read them).
  (work / "config.json").write_text('{"blr": 0.0015, "total_steps": 200}\n')
  (work / "metrics.jsonl").write_text('{"step": 10, "loss": 1.5}\n{"step": 20, "loss": 1.2}\n')
  (work / "checkpoints" / "50" / "state" / "data").write_bytes(os.urandom(256))
  (work / "checkpoints" / "50" / "commit_success.txt").write_text("ok")
  t0 = time.time()
  holder, info = start_holder(work, "compile", JAX_LOG_COMPILES="1")
  t1 = time.time()
  try:
    before = snapshot(work)  # the holder's .adpe_lock included
    assert json.loads(before[".adpe_lock"])["pid"] == holder.pid
    r = subprocess.run(
        [sys.executable, "-m", "adpe_jax.main", "--config=configs/vitb_rpe_coord.py:smoke",
         "--config.blr=3e-3", "--config.total_steps=400", f"--workdir={work}"],
        cwd=ROOT, env=child_env(JAX_LOG_COMPILES="1"), capture_output=True, text=True,
        timeout=180)
    after = snapshot(work)
  finally:
    holder.stdin.close()
    holder.wait(timeout=60)
  holder_log = holder.stderr.read()
  assert "Compiling" in holder_log, holder_log[-2000:]  # a compile shows in such a log
  assert r.returncode == 2, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert errors == [r.stderr.strip().splitlines()[-1]], r.stderr[-3000:]
  message = errors[0]
  assert message.startswith(f"error: workdir {work} is in use by another run (host {HOST}, "
                            f"pid {holder.pid}, started ")
  started = message.split("started ", 1)[1].split(",", 1)[0]
  when = datetime.datetime.strptime(started, "%Y-%m-%dT%H:%M:%SZ").replace(
      tzinfo=datetime.timezone.utc).timestamp()
  assert t0 - 1 <= when <= t1 + 1 and started == info["started_utc"]
  assert f"kill {holder.pid} on {HOST}" in message and "--workdir" in message
  assert message.endswith(f"delete {work}/.adpe_lock and re-run.")
  assert after == before  # config.json, metrics.jsonl, checkpoints and the holder's info
  assert "Compiling" not in r.stderr, r.stderr[-3000:]


def test_a_sigkilled_holder_does_not_block_the_resume(tmp_path):
  holder, info = start_holder(tmp_path)
  try:
    with pytest.raises(WorkdirBusyError, match=f"pid {holder.pid}, started "):
      workdir_lock.FileLock(str(tmp_path))
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  assert holder.returncode == -signal.SIGKILL
  assert json.loads((tmp_path / ".adpe_lock").read_text())["token"] == info["token"]  # left
  with workdir_lock.FileLock(str(tmp_path)) as lock:  # the kernel freed it: the resume runs
    assert json.loads((tmp_path / ".adpe_lock").read_text())["pid"] == os.getpid()
    assert lock.holder["token"] != info["token"]


def test_refusal_keeps_the_holder_info_and_release_frees(tmp_path):
  first = workdir_lock.FileLock(str(tmp_path))
  text = (tmp_path / ".adpe_lock").read_bytes()
  assert json.loads(text)["token"] == first.holder["token"]
  with pytest.raises(WorkdirBusyError):
    workdir_lock.FileLock(str(tmp_path))  # another open file description: refused
  assert (tmp_path / ".adpe_lock").read_bytes() == text
  first.release()
  first.release()  # idempotent
  assert (tmp_path / ".adpe_lock").read_bytes() == b""
  with workdir_lock.FileLock(str(tmp_path)):
    pass


def test_a_lock_file_deleted_while_locking_is_not_a_lock(tmp_path, monkeypatch):
  """Between open and flock the file is deleted (and made again) by someone clearing it:
  the descriptor locked is no longer the workdir's lock file; the lock is taken again."""
  real, calls = workdir_lock._flock, []

  def flock(fd):
    real(fd)
    if not calls:
      os.unlink(tmp_path / ".adpe_lock")
      (tmp_path / ".adpe_lock").write_text("")
    calls.append(fd)

  monkeypatch.setattr(workdir_lock, "_flock", flock)
  with workdir_lock.FileLock(str(tmp_path)) as lock:
    assert len(calls) == 2
    assert os.fstat(lock._fd).st_ino == os.stat(tmp_path / ".adpe_lock").st_ino
  with workdir_lock.FileLock(str(tmp_path)):  # and it was released
    pass


def test_a_file_system_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
  def no_flock(fd):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  warnings = []
  monkeypatch.setattr(workdir_lock, "_flock", no_flock)
  monkeypatch.setattr(workdir_lock.logging, "warning", lambda *a: warnings.append(a[0] % a[1:]))
  assert isinstance(workdir_lock.acquire(str(tmp_path)), workdir_lock.Unlocked)
  assert len(warnings) == 1 and "WITHOUT a lock" in warnings[0]
  assert os.strerror(errno.ENOLCK) in warnings[0]


@pytest.mark.parametrize("config_name", ["vitb_rpe_coord", "finetune_vitb_rpe",
                                         "linprobe_vitb", "knn"])
def test_every_task_takes_the_lock_first_and_releases_it_at_its_end(config_name, tmp_path,
                                                                    monkeypatch):
  from adpe_jax.config import validate
  from adpe_jax.train import run, tasks

  config = load_config(config_name)
  entry = tasks.ENTRIES[validate.task_of(config)]
  holder = workdir_lock.FileLock(str(tmp_path))
  with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()}"):
    entry(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == [".adpe_lock"]  # no config.json
  holder.release()

  real = run.write_config

  def write_then_fail(*args, **kwargs):
    real(*args, **kwargs)
    assert os.path.getsize(tmp_path / ".adpe_lock") > 0  # held while the task runs
    raise RuntimeError("the task fails after its start")

  monkeypatch.setattr(run, "write_config", write_then_fail)
  with pytest.raises(RuntimeError, match="fails after its start"):
    entry(config, str(tmp_path))
  with workdir_lock.FileLock(str(tmp_path)):  # released by the failed task's end
    pass


def test_acquire_is_released_by_its_with_on_return_and_on_error(tmp_path):
  def task(fail: bool):
    with workdir_lock.acquire(str(tmp_path)):
      with pytest.raises(WorkdirBusyError):  # held inside the task
        workdir_lock.FileLock(str(tmp_path))
      if fail:
        raise KeyboardInterrupt
      return "done"

  assert task(False) == "done"
  with pytest.raises(KeyboardInterrupt):
    task(True)
  with workdir_lock.FileLock(str(tmp_path)):
    pass


# -- gs://: the lease over a fake object store ------------------------------------------------

class Clock:
  def __init__(self, t=1_000_000.0):
    self.t = t

  def __call__(self):
    return self.t


NAME, DISPLAY = "runs/a/.adpe_lock", "gs://bucket/runs/a/.adpe_lock"


def lease(store, clock, **kw):
  kw.setdefault("start_heartbeat", False)
  return workdir_lock.Lease(store, NAME, DISPLAY, clock=clock, ttl_s=120, heartbeat_s=30, **kw)


def test_store_create_replace_delete_semantics(tmp_path):
  store = LocalObjectStore(tmp_path)
  assert store.read_with_generation("x/o") is None
  g1 = store.create_if_absent("x/o", b"one")
  assert g1 is not None and store.create_if_absent("x/o", b"two") is None
  assert store.read_with_generation("x/o") == (b"one", g1)
  assert store.replace_if_generation("x/o", b"two", g1 + 100) is None
  g2 = store.replace_if_generation("x/o", b"two", g1)
  assert g2 not in (None, g1) and store.read_with_generation("x/o") == (b"two", g2)
  assert not store.delete("x/o", generation=g1) and store.delete("x/o", generation=g2)
  g3 = store.create_if_absent("x/o", b"three")
  assert g3 not in (g1, g2)  # a generation never repeats (no ABA after a delete)


def test_live_lease_refuses_and_changes_nothing(tmp_path):
  store, clock = LocalObjectStore(tmp_path), Clock()
  a = lease(store, clock)
  before = store.read_with_generation(NAME)
  clock.t += 60
  with pytest.raises(WorkdirBusyError) as e:
    lease(store, clock)
  message = str(e.value)
  assert message.startswith(f"workdir gs://bucket/runs/a is in use by another run (host {HOST}, "
                            f"pid {os.getpid()}, started {a.holder['started_utc']}")
  assert "last heartbeat was 60 s ago, it counts as gone after 120 s" in message
  assert message.endswith(f"delete {DISPLAY} (gcloud storage rm), or re-run in 60 s when "
                          f"its lease counts as gone.")
  assert store.read_with_generation(NAME) == before


def test_stale_lease_is_taken_over_and_the_old_holder_learns_it(tmp_path):
  store, clock = LocalObjectStore(tmp_path), Clock()
  lost = []
  a = lease(store, clock, on_lost=lost.append)
  clock.t += 121  # a's heartbeat is 121 s old: a is gone
  b = lease(store, clock)
  data, gen = store.read_with_generation(NAME)
  assert json.loads(data)["token"] == b.holder["token"] and gen == b.generation
  assert not a.refresh() and a.lost and len(lost) == 1
  assert "lost the lock of workdir gs://bucket/runs/a" in lost[0] and "took it over" in lost[0]
  a.release()  # the stale holder does not delete the new holder's lease
  assert store.read_with_generation(NAME) == (data, gen)
  b.release()
  assert store.read_with_generation(NAME) is None


def test_a_stale_holder_releasing_leaves_the_new_holders_lease(tmp_path):
  store, clock = LocalObjectStore(tmp_path), Clock()
  a = lease(store, clock)
  clock.t += 121
  b = lease(store, clock)
  held = store.read_with_generation(NAME)
  a.release()  # a never heard it was taken over: its delete is conditional on its generation
  assert store.read_with_generation(NAME) == held and held[1] == b.generation
  b.release()


def test_heartbeats_keep_a_lease_alive(tmp_path):
  store, clock = LocalObjectStore(tmp_path), Clock()
  a = lease(store, clock)
  clock.t += 100
  assert a.refresh()
  clock.t += 100  # 200 s since a started, 100 s since its heartbeat
  with pytest.raises(WorkdirBusyError, match="last heartbeat was 100 s ago"):
    lease(store, clock)
  clock.t += 21
  lease(store, clock).release()


def test_the_heartbeat_thread_refreshes(tmp_path):
  store = LocalObjectStore(tmp_path)
  a = workdir_lock.Lease(store, NAME, DISPLAY, ttl_s=0.5, heartbeat_s=0.05)
  try:
    time.sleep(1.2)  # over twice the TTL
    with pytest.raises(WorkdirBusyError):
      workdir_lock.Lease(store, NAME, DISPLAY, ttl_s=0.5, heartbeat_s=0.05,
                         start_heartbeat=False)
  finally:
    a.release()
  assert store.read_with_generation(NAME) is None  # released: a resume starts at once
  workdir_lock.Lease(store, NAME, DISPLAY, start_heartbeat=False).release()


def test_racing_takeovers_of_a_stale_lease_exactly_one_wins(tmp_path):
  clock, n = Clock(), 6
  base = LocalObjectStore(tmp_path)
  dead = dict(workdir_lock.holder_info(), heartbeat_unix=clock.t - 1000, ttl_seconds=120)
  base.create_if_absent(NAME, json.dumps(dead).encode())
  barrier, seen = threading.Barrier(n, timeout=30), threading.local()

  class AllReadTheStaleOneFirst(LocalObjectStore):
    def read_with_generation(self, name):
      out = super().read_with_generation(name)
      if not getattr(seen, "done", False):  # every contender holds the stale generation
        seen.done = True
        barrier.wait()
      return out

  store = AllReadTheStaleOneFirst(tmp_path)
  won, refused = [], []

  def contend():
    try:
      won.append(lease(store, clock))
    except WorkdirBusyError as e:
      refused.append(str(e))

  threads = [threading.Thread(target=contend) for _ in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert len(won) == 1 and len(refused) == n - 1, (len(won), refused)
  assert json.loads(base.read_with_generation(NAME)[0])["token"] == won[0].holder["token"]
  assert all(f"started {won[0].holder['started_utc']}" in m for m in refused)


def test_a_create_whose_answer_was_lost_is_recognised_as_ours(tmp_path):
  class LostAnswer(LocalObjectStore):
    def create_if_absent(self, name, data):
      super().create_if_absent(name, data)
      return None  # the write landed; its answer did not (a retried request sees 412)

  store = LostAnswer(tmp_path)
  a = lease(store, Clock())
  assert store.read_with_generation(NAME)[1] == a.generation
  a.release()
  assert store.read_with_generation(NAME) is None


def test_gs_workdirs_take_a_lease_and_other_schemes_warn(tmp_path, monkeypatch):
  store = LocalObjectStore(tmp_path)
  monkeypatch.setattr(workdir_lock, "object_store_for",
                      lambda w: (store, "run/.adpe_lock") if w.startswith("gs://") else None)
  with workdir_lock.acquire("gs://bucket/run") as lock:
    assert isinstance(lock, workdir_lock.Lease) and lock._thread.is_alive()
    with pytest.raises(WorkdirBusyError, match="gs://bucket/run is in use"):
      workdir_lock.acquire("gs://bucket/run")
  assert store.read_with_generation("run/.adpe_lock") is None
  assert isinstance(workdir_lock.acquire("s3://bucket/run"), workdir_lock.Unlocked)


def test_gs_lease_without_google_cloud_storage_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # not installed
  with pytest.raises(WorkdirLockError, match="pip install google-cloud-storage"):
    workdir_lock.object_store_for("gs://bucket/run")


# -- several processes: process 0 decides for all ---------------------------------------------

class FakeKeyValueClient:
  """The coordination service's key-value calls that `parallel.decide_on_process0` uses
  (jax 0.10.2 signatures)."""

  def __init__(self):
    self.values, self.cond = {}, threading.Condition()

  def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
    with self.cond:
      if key in self.values and not allow_overwrite:
        raise RuntimeError(f"ALREADY_EXISTS: {key}")
      self.values[key] = value
      self.cond.notify_all()

  def blocking_key_value_get(self, key: str, timeout_in_ms: int) -> str:
    with self.cond:
      if not self.cond.wait_for(lambda: key in self.values, timeout_in_ms / 1000):
        raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")
      return self.values[key]


def agree(client, index, take, key, timeout_s=30.0):
  return workdir_lock.agree(take, "/w", key=key, client=client, process_index=index,
                            process_count=2, timeout_s=timeout_s)


def test_process_0_takes_the_lock_and_every_process_goes_on(tmp_path):
  client, results = FakeKeyValueClient(), {}
  follower = threading.Thread(target=lambda: results.update(
      one=agree(client, 1, lambda: pytest.fail("only process 0 takes the lock"), "k")))
  follower.start()
  lock = agree(client, 0, lambda: workdir_lock.FileLock(str(tmp_path)), "k")
  follower.join(timeout=30)
  assert isinstance(lock, workdir_lock.FileLock) and lock._fd is not None
  assert isinstance(results["one"], workdir_lock.Unlocked)
  lock.release()


def test_a_refusal_of_process_0_stops_every_process_with_its_sentence(tmp_path):
  client = FakeKeyValueClient()
  holder = workdir_lock.FileLock(str(tmp_path))
  with pytest.raises(WorkdirBusyError) as zero:
    agree(client, 0, lambda: workdir_lock.FileLock(str(tmp_path)), "k")
  with pytest.raises(WorkdirBusyError) as one:
    agree(client, 1, None, "k")
  assert str(one.value) == str(zero.value) and f"pid {os.getpid()}" in str(one.value)
  holder.release()

  def broken():
    raise OSError("disk on fire")

  with pytest.raises(OSError):
    agree(client, 0, broken, "k2")
  with pytest.raises(WorkdirLockError, match="process 0 failed to take the lock .*disk on fire"):
    agree(client, 1, None, "k2")


def test_no_word_from_process_0_ends_the_others_in_bounded_time():
  t = time.time()
  with pytest.raises(WorkdirLockError, match="process 1 of 2 had no word from process 0"):
    agree(FakeKeyValueClient(), 1, None, "k", timeout_s=0.2)
  assert time.time() - t < 5


def test_agree_over_jax_own_coordination_service(tmp_path):
  """The same calls on the real client of jax (one process plays both roles)."""
  script = f"""
import socket, jax
from adpe_jax import workdir_lock
from adpe_jax.errors import WorkdirLockError
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
jax.distributed.initialize(f"127.0.0.1:{{port}}", num_processes=1, process_id=0)
from adpe_jax import jax_compat
client = jax_compat.coordination_client()
kw = dict(client=client, process_count=2, timeout_s=2.0)
lock = workdir_lock.agree(lambda: workdir_lock.FileLock({str(tmp_path)!r}), "/w", key="k",
                          process_index=0, **kw)
other = workdir_lock.agree(None, "/w", key="k", process_index=1, **kw)
assert type(lock).__name__ == "FileLock" and type(other).__name__ == "Unlocked"
try:
  workdir_lock.agree(None, "/w", key="never", process_index=1, **dict(kw, timeout_s=0.5))
except WorkdirLockError as e:
  print("timeout:", e)
print("ok")
"""
  r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=child_env(),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "timeout: process 1 of 2 had no word from process 0" in r.stdout and "ok" in r.stdout
