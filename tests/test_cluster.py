"""A real scheduler and a real network between two hosts (issue 28, items 12 and 13), run by
`make test-cluster` (not collected by `make test`: tests/conftest.py), as root:

* SLURM: Debian's slurm-wlm 22.05 with munge, started here on this machine (one node, CPUs
  only; the plugins and why: launch/README.md), jobs submitted through the project's own
  launcher (`sbatch launch/slurm_gpu.sh --cpu ...`, 2 tasks, JAX detecting SLURM itself).
  One job shows: a second sbatch on its workdir while it runs is refused by the workdir lock;
  `scancel --signal=TERM` stops both tasks at one agreed step with a save; `scontrol requeue`
  restarts it and the resumed run equals one process x 2 devices run in one go.
* Two network namespaces joined by a veth pair, one process in each (the coordinator on the
  veth address; each namespace resolves the host name to its own veth address, so gloo's
  traffic crosses the veth too): the link cut mid-run ends both processes within the
  heartbeat timeout with our sentence, the complete checkpoints kept, and the resume once
  the link is back equals the same one-process run.

Every run is compared with one reference, END steps in one go on 1 process x 2 CPU devices,
bit for bit: the per-step losses, grad norms and learning rates, and the checkpoint at END by
its per-leaf checksums (bit sums of every leaf of params, optimizer and adversary state). Two
processes x 1 device compute what 1 x 2 computes to the last bit (each device holds the same
rows in the same order whatever the process count: adpe_jax/data/pipeline.py, and two
partial sums add the same in either order; launch/README.md).
"""

import ctypes
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from adpe_jax.checkpoint import rundir
from adpe_jax.checkpoint.checkpointer import read_meta
from devices import xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
END = 12            # every run is compared with the references at this step
HEARTBEAT = 5       # distributed.heartbeat_timeout_seconds of the network run
# total_steps far beyond END: the learning-rate schedule is the same in every run, and a run
# stops only when told to (max_steps_per_run, SIGTERM, a lost peer).
RUN = ["--config=configs/vitb_ape.py:smoke", "--config.total_steps=100000",
       "--config.log_every_steps=1"]
COMPARED = ("loss", "grad_norm", "lr")


# --- helpers ----------------------------------------------------------------------------------

def clean_env(devices: int, **extra) -> dict:
  """The environment of a run: `devices` CPU devices, no launch variables of an outer job."""
  e = {k: v for k, v in os.environ.items()
       if not k.startswith(("SLURM_", "SRUN_", "SBATCH_", "JAX_COORDINATOR", "JAX_NUM_PROC",
                            "JAX_PROCESS_ID"))}
  e.update(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
           PYTHONPATH=str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""), **extra)
  return e


def records(workdir) -> dict:
  recs = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
          .splitlines()]
  return {r["step"]: {k: r[k] for k in COMPARED} for r in recs if "loss" in r}


def saved(workdir) -> list:
  return rundir.complete_steps(pathlib.Path(workdir) / "checkpoints")


def checksums(workdir, step: int) -> dict:
  sums = read_meta(pathlib.Path(workdir) / "checkpoints" / str(step))["checksums"]
  assert sums, f"the checkpoint at step {step} of {workdir} has no checksums"
  return sums


def summary(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / "summary.json").read_text())


def assert_equals_references(workdir, references):
  """The run in `workdir` is bit for bit the uninterrupted 1 process x 2 devices run."""
  one = references["one"]
  got = records(workdir)
  assert sorted(got) == list(range(1, END + 1)), sorted(got)
  for step in range(1, END + 1):
    assert got[step] == one["records"][step], (step, got[step], one["records"][step])
  assert summary(workdir)["steps"] == END
  assert checksums(workdir, END) == one["checksums"]


def wait_for(what: str, ready, timeout: float, log=None, alive=(), gone=lambda: False):
  """Polls `ready` until it holds; fails after `timeout` s, or once a process of `alive`
  has ended or `gone()` holds, with the end of `log`."""
  deadline = time.time() + timeout
  while not ready():
    if time.time() > deadline or any(p.poll() is not None for p in alive) or gone():
      tail = pathlib.Path(log).read_text()[-3000:] if log and pathlib.Path(log).exists() else ""
      pytest.fail(f"{what}: not seen in {timeout:.0f} s\n{tail}")
    time.sleep(0.2)


def logged_steps(workdir) -> int:
  m = pathlib.Path(workdir) / "metrics.jsonl"
  return m.read_text().count("\n") if m.exists() else 0


def _die_with_parent():
  ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def pair_command(workdir, i, address, *extra) -> list:
  """Process i of a 2-process run, the coordinator at `address` (host:port)."""
  return [sys.executable, "-m", "adpe_jax.main", *RUN, f"--workdir={workdir}",
          f"--config.distributed.coordinator_address={address}",
          "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
          f"--config.distributed.heartbeat_timeout_seconds={HEARTBEAT}", *extra]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
  """END steps in one go (saved at END) on 1 process x 2 CPU devices: what every interrupted
  2-process run must reproduce."""
  stop = (f"--config.max_steps_per_run={END}", "--config.checkpoint_every_steps=0")
  one = tmp_path_factory.mktemp("one_process")
  r = subprocess.run([sys.executable, "-m", "adpe_jax.main", *RUN, f"--workdir={one}", *stop],
                     cwd=ROOT, env=clean_env(2), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert saved(one) == [END]
  return {"one": {"records": records(one), "checksums": checksums(one, END)}}


# --- SLURM ------------------------------------------------------------------------------------

SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun")


def slurm_conf(d: pathlib.Path, host: str) -> str:
  # The plugins (launch/README.md, "The cluster tests"): no cgroups (proctrack/linuxproc,
  # task/none), CPUs as the consumable resource (select/cons_tres, CR_CPU), no accounting
  # daemon, the builtin scheduler asked every second, credentials that expire in 5 s (a
  # requeued job waits that long before it starts again).  CPUs=4 (config_overrides): the
  # 2-task job and the refused second job run side by side on this 2-core machine.
  return f"""\
ClusterName=adpetest
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/socket,cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=60
MinJobAge=600
NodeName={host} CPUs=4 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm():
  """munged, slurmctld and slurmd on this machine, in a temporary directory of their own;
  everything they started is ended afterwards (the daemons also die with this process)."""
  if os.geteuid() != 0:
    pytest.skip("the SLURM test starts slurmd and munged, which need root")
  missing = [p for p in SLURM_PROGRAMS if shutil.which(p) is None]
  if missing:
    pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): `make test-cluster` "
                "installs Debian's slurm-wlm and munge with apt-get when it can")
  d = pathlib.Path(tempfile.mkdtemp(prefix="adpe-slurm-"))
  os.chmod(d, 0o711)                        # munged wants its socket's folders searchable
  for sub in ("state", "spool"):
    (d / sub).mkdir()
  (d / "munge").mkdir(mode=0o711)
  (d / "munge" / "key").write_bytes(os.urandom(1024))
  os.chmod(d / "munge" / "key", 0o600)
  host = socket.gethostname().split(".")[0]
  conf = d / "slurm.conf"
  conf.write_text(slurm_conf(d, host))
  env = dict(os.environ, SLURM_CONF=str(conf))
  daemons = []

  def start(*cmd, log):
    daemons.append(subprocess.Popen(cmd, stdout=open(d / log, "w"), stderr=subprocess.STDOUT,
                                    env=env, preexec_fn=_die_with_parent))

  def sinfo() -> str:
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
    return r.stdout.strip()

  try:
    m = d / "munge"
    start("munged", "-F", f"--socket={m}/socket", f"--key-file={m}/key", f"--log-file={m}/log",
          f"--pid-file={m}/pid", f"--seed-file={m}/seed", log="munged.out")
    wait_for("munged's socket", (m / "socket").exists, 30, d / "munged.out", daemons)
    start("slurmctld", "-D", "-f", str(conf), log="slurmctld.out")
    start("slurmd", "-D", "-f", str(conf), log="slurmd.out")
    wait_for("the SLURM node idle", lambda: sinfo() == "idle", 60, d / "slurmctld.log", daemons)
    yield {"env": env, "dir": d}
  finally:
    subprocess.run(["scancel", "--partition=test", "--signal=KILL", "--full"], env=env,
                   capture_output=True, timeout=30)
    subprocess.run(["scancel", "--partition=test"], env=env, capture_output=True, timeout=30)
    time.sleep(1)
    for p in reversed(daemons):
      p.terminate()
      try:
        p.wait(timeout=20)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    shutil.rmtree(d, ignore_errors=True)


def job_field(slurm, job: str, field: str) -> str:
  r = subprocess.run(["scontrol", "-o", "show", "job", job], env=slurm["env"],
                     capture_output=True, text=True, timeout=30)
  for word in r.stdout.split():
    if word.startswith(field + "="):
      return word.split("=", 1)[1]
  return ""


def sbatch(slurm, workdir, out, *extra) -> str:
  # The launcher in its CPU mode, 2 tasks on the one node; JAX finds the coordinator, the
  # process count and each process's id in SLURM's environment.
  env = clean_env(1, **{"SLURM_CONF": slurm["env"]["SLURM_CONF"], "PYTHON": sys.executable})
  r = subprocess.run(["sbatch", "--parsable", "--ntasks=2", "--ntasks-per-node=2",
                      "--oversubscribe", f"--output={out}", "launch/slurm_gpu.sh", "--cpu",
                      RUN[0].split("=", 1)[1], str(workdir), *RUN[1:], *extra],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  return r.stdout.strip().split(";")[0]


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def wait_job_end(slurm, job, out, timeout=300, gone=lambda: False):
  wait_for(f"job {job} ended", lambda: job_field(slurm, job, "JobState") in ENDED, timeout, out,
           gone=gone)
  return job_field(slurm, job, "JobState"), job_field(slurm, job, "ExitCode")


def test_slurm_job_refuses_a_second_sbatch_stops_on_term_and_resumes_exactly_on_requeue(
    slurm, references, tmp_path):
  w, out, flags = tmp_path / "run", tmp_path / "job.out", tmp_path / "extra.flags"
  flags.write_text("")                      # read by every start of the job (absl --flagfile)
  job = sbatch(slurm, w, out, "--config.checkpoint_every_steps=0", f"--flagfile={flags}")
  lock = w / ".adpe_lock"
  ended = lambda: job_field(slurm, job, "JobState") in ENDED  # noqa: E731
  wait_for("the job's workdir lock", lambda: lock.exists() and lock.stat().st_size > 0, 300, out,
           gone=ended)

  # A second sbatch on the same workdir while the first job runs: refused, nothing written.
  out2 = tmp_path / "second.out"
  second = sbatch(slurm, w, out2, "--config.checkpoint_every_steps=0")
  trains = lambda: out2.exists() and "] step 1 " in out2.read_text()  # noqa: E731
  state, code = wait_job_end(slurm, second, out2, gone=trains)
  said = out2.read_text()
  assert state == "FAILED" and code.startswith("2:"), (state, code, said[-3000:])
  assert f"workdir {w} is in use by another run" in said, said[-3000:]
  assert job_field(slurm, job, "JobState") == "RUNNING"

  # scancel --signal=TERM: both tasks stop at one agreed step, save it and exit 0.
  wait_for("the job's first step", lambda: logged_steps(w) >= 1, 300, out, gone=ended)
  subprocess.run(["scancel", "--signal=TERM", job], env=slurm["env"], check=True, timeout=30)
  state, code = wait_job_end(slurm, job, out)
  log = out.read_text()
  assert (state, code) == ("COMPLETED", "0:0"), (state, code, log[-3000:])
  assert log.count("stop requested by SIGTERM (agreed by all processes)") == 2, log[-3000:]
  assert summary(w)["status"] == "preempted"
  stop = summary(w)["steps"]
  assert saved(w) == [stop], saved(w)
  assert 1 <= stop < END, f"the job stopped at step {stop}; END={END} must lie beyond it"

  # scontrol requeue: the same job starts again and resumes from that step; it runs to END.
  flags.write_text(f"--config.max_steps_per_run={END - stop}\n")
  subprocess.run(["scontrol", "requeue", job], env=slurm["env"], check=True, timeout=30)
  wait_for(f"job {job} restarted", lambda: job_field(slurm, job, "Restarts") == "1", 60, out)
  state, code = wait_job_end(slurm, job, out)
  assert (state, code) == ("COMPLETED", "0:0"), (state, code, out.read_text()[-3000:])
  assert summary(w)["status"] == "stopped"
  assert saved(w) == [stop, END]
  assert_equals_references(w, references)


# --- two hosts: network namespaces joined by a veth pair ------------------------------------------

@pytest.fixture
def two_hosts():
  """Namespaces a (10.x.0.1) and b (10.x.0.2) joined by a veth pair; in each, the host name
  resolves to its own veth address (/etc/netns/NAME/hosts, which `ip netns exec` mounts over
  /etc/hosts), so gloo binds and connects across the veth.  All removed afterwards."""
  if os.geteuid() != 0:
    pytest.skip("the network test creates network namespaces, which needs root")
  ip = shutil.which("ip") or "/usr/sbin/ip"
  tag = f"adpe{os.getpid() % 100000}"
  names = {"a": f"{tag}a", "b": f"{tag}b"}
  net = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
  addr = {"a": f"{net}.1", "b": f"{net}.2"}
  host = socket.gethostname()
  created = []

  def run(*cmd):
    return subprocess.run([ip, *cmd], capture_output=True, text=True, timeout=30)

  try:
    for k in "ab":
      r = run("netns", "add", names[k])
      if r.returncode != 0:
        pytest.skip(f"network namespaces are not available here (ip netns add: {r.stderr.strip()})")
      created.append(names[k])
    r = run("link", "add", names["a"], "type", "veth", "peer", "name", names["b"])
    if r.returncode != 0:
      pytest.skip(f"veth pairs are not available here (ip link add: {r.stderr.strip()})")
    for k in "ab":
      for cmd in (("link", "set", names[k], "netns", names[k]),
                  ("-n", names[k], "addr", "add", f"{addr[k]}/24", "dev", names[k]),
                  ("-n", names[k], "link", "set", names[k], "up"),
                  ("-n", names[k], "link", "set", "lo", "up")):
        r = run(*cmd)
        assert r.returncode == 0, (cmd, r.stderr)
      etc = pathlib.Path("/etc/netns") / names[k]
      etc.mkdir(parents=True, exist_ok=True)
      (etc / "hosts").write_text(f"127.0.0.1 localhost\n{addr[k]} {host}\n")

    def link(up: bool):
      r = run("-n", names["a"], "link", "set", names["a"], "up" if up else "down")
      assert r.returncode == 0, r.stderr

    yield {"ip": ip, "ns": names, "addr": addr, "link": link}
  finally:
    for name in created:
      run("netns", "del", name)
      shutil.rmtree(pathlib.Path("/etc/netns") / name, ignore_errors=True)


def start_across(hosts, workdir, tmp_path, tag, *extra):
  port = free_port()
  procs = []
  for i, k in enumerate("ab"):
    log = tmp_path / f"{tag}{i}.err"
    cmd = [hosts["ip"], "netns", "exec", hosts["ns"][k],
           *pair_command(workdir, i, f"{hosts['addr']['a']}:{port}",
                         "--config.checkpoint_every_steps=2", *extra)]
    procs.append((subprocess.Popen(cmd, cwd=ROOT, env=clean_env(1), stdout=subprocess.DEVNULL,
                                   stderr=open(log, "w"), preexec_fn=_die_with_parent), log))
  return procs


def finish(procs, timeout):
  codes = []
  for p, log in procs:
    try:
      codes.append(p.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
      for q, _ in procs:
        q.kill()
      pytest.fail(f"{log.name} did not end in {timeout} s: {log.read_text()[-3000:]}")
  return codes


def test_link_cut_between_two_hosts_ends_both_with_our_sentence_and_resumes_exactly(
    two_hosts, references, tmp_path):
  w = tmp_path / "run"
  procs = start_across(two_hosts, w, tmp_path, "cut")
  try:
    wait_for("a complete checkpoint and 3 logged steps",
             lambda: saved(w) and logged_steps(w) >= 3, 300, procs[0][1], [p for p, _ in procs])
    kept = saved(w)[-1]
    two_hosts["link"](False)
    t_cut = time.time()
    codes = finish(procs, timeout=120)
    elapsed = time.time() - t_cut
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
  two_hosts["link"](True)
  for i, (code, (_, log)) in enumerate(zip(codes, procs)):
    text = log.read_text()
    last = text.splitlines()[-1] if text else ""
    assert code == 3, (i, code, text[-3000:])        # a lost peer (docs/running.md "Exit codes")
    assert last.startswith("error: "), (i, last)
    assert "lost peer" in last or f"process {i} of 2" in last, (i, last)
    assert "re-run the same command on every" in last, (i, last)
  assert elapsed < HEARTBEAT + 25, elapsed             # bounded: the heartbeat timeout + margin
  assert saved(w) and saved(w)[-1] >= kept, (saved(w), kept)
  resume_from = saved(w)[-1]
  assert resume_from < END, f"the cut came after step {END}: nothing left to compare"
  # The link back up: the same command resumes from the newest complete checkpoint to END.
  procs = start_across(two_hosts, w, tmp_path, "resume", f"--config.max_steps_per_run={END - resume_from}")
  codes = finish(procs, timeout=300)
  assert codes == [0, 0], [log.read_text()[-3000:] for _, log in procs]
  assert_equals_references(w, references)
