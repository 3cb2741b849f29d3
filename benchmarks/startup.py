"""Start-up of `python -m adpe_jax.main`: seconds to the first compiled step and to the first
log record, and the memory of a process that has imported the task code and opened its
metric writers -- for two checkouts side by side (e.g. before and after a change), runs
interleaved A B A B ... so that machine noise hits both alike; the table gives medians and
the ratio B / A.

    python benchmarks/startup.py --a=/path/to/old/checkout --b=. --repeats=3

Each checkout is run with its own directory first on PYTHONPATH, with the interpreter
running this script (its packages: TensorFlow installed or not is what differs between
the writers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

_RUN = ["-m", "adpe_jax.main", "--config=configs/vitb_ape.py:smoke", "--config.total_steps=2",
        "--config.log_every_steps=1", "--config.eval.knn_source=",
        "--config.compilation_cache=none"]

_IDLE = """
import resource, sys, tempfile
from adpe_jax.train import tasks  # noqa: F401 (every task's code)
from adpe_jax.train.metrics import MetricsLog
log = MetricsLog(tempfile.mkdtemp(), total_steps=10)
log.write({"step": 1, "loss": 1.0})
log.close()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
print(int("tensorflow" in sys.modules))
"""


def _env(checkout: str) -> dict:
  env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout), JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def run_once(checkout: str) -> dict:
  """Seconds from the process start to 'compiled the train step' and to the first log
  record ('step 1 loss'), as the lines reach this process."""
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, *_RUN, f"--workdir={workdir}"], cwd=checkout,
                            env=_env(checkout), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    out = {}
    for line in proc.stderr:
      now = time.time() - t0
      if "compiled the train step" in line and "compiled" not in out:
        out["compiled"] = now
      if " step 1 loss " in line and "first_record" not in out:
        out["first_record"] = now
    proc.wait()
    out["total"] = time.time() - t0
    if proc.returncode != 0:
      raise RuntimeError(f"{checkout}: exit {proc.returncode}")
  return out


def idle(checkout: str) -> tuple[float, bool]:
  r = subprocess.run([sys.executable, "-c", _IDLE], cwd=checkout, env=_env(checkout),
                     capture_output=True, text=True, check=True)
  mib, tf = r.stdout.split()
  return float(mib), tf == "1"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--a", required=True, help="the reference checkout")
  parser.add_argument("--b", default=".", help="the checkout compared with it")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  results = {args.a: [], args.b: []}
  memory = {args.a: [], args.b: []}
  for _ in range(args.repeats):
    for checkout in (args.a, args.b):
      results[checkout].append(run_once(checkout))
      memory[checkout].append(idle(checkout))
  print("| | A (reference) | B | B / A |\n|---|---|---|---|")
  for key, name in (("compiled", "s to the compiled step"), ("first_record", "s to the first "
                    "log record"), ("total", "s for the whole 2-step run")):
    a = statistics.median(r[key] for r in results[args.a])
    b = statistics.median(r[key] for r in results[args.b])
    print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
  a = statistics.median(m for m, _ in memory[args.a])
  b = statistics.median(m for m, _ in memory[args.b])
  print(f"| MiB peak RSS, idle process (task code + writers) | {a:.0f} | {b:.0f} | {b / a:.2f} |")
  print(f"| tensorflow imported | {memory[args.a][0][1]} | {memory[args.b][0][1]} | |")


if __name__ == "__main__":
  main()
