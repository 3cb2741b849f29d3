"""Compare process-wide options of our train step (XLA flags, devices per host) in one run.

XLA reads its flags once per process, so each option runs in its own worker process
(`benchmarks/train_step.py --serve`); after every worker has compiled, the driver asks
them in turn for one step at a time, round after round, so a slow spell of a shared
machine hits every option alike.  Ends with the median and the fastest ms/step of each
option and their ratios to the first (the reference).  Code versions compare the same way:
`--option "old=--checkout=/path/to/other/checkout"` runs that checkout's train_step.py
(and so its adpe_jax), e.g. a `git worktree` of an earlier commit.

    python benchmarks/cpu_options.py                      # the default options below
    python benchmarks/cpu_options.py --rounds 10 --common "--cases ape --crops 32" \\
        --option "default=" --option "two devices=--host-devices 2"

An option is NAME=ARGS, ARGS being train_step.py arguments (e.g. --xla-flags=...) and
--env=KEY=VALUE for the worker's environment, or --checkout=DIR to run DIR's train_step.py
(another version of the code; its command line must take the common arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OPTIONS = [
    "default=",
    "one device per core=--host-devices 2",
    "xnnpack=--xla-flags=--xla_cpu_use_xnnpack=true",
    "onednn=--xla-flags=--xla_cpu_use_onednn=true",
]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--common", default="--cases ape --crops 32",
                  help="train_step.py arguments shared by every option")
  ap.add_argument("--option", action="append", default=[], help="NAME=ARGS (repeatable)")
  ap.add_argument("--rounds", type=int, default=10)
  args = ap.parse_args()
  options = args.option or DEFAULT_OPTIONS
  workers = {}
  for option in options:
    name, _, extra = option.partition("=")
    tokens = shlex.split(extra)
    env = dict(os.environ)
    env.update(t[len("--env="):].split("=", 1) for t in tokens if t.startswith("--env="))
    script = os.path.join(HERE, "train_step.py")
    for t in tokens:
      if t.startswith("--checkout="):
        script = os.path.join(os.path.abspath(t[len("--checkout="):]), "benchmarks",
                              "train_step.py")
        if not os.path.exists(script):
          raise SystemExit(f"option {name!r}: {script} does not exist (--checkout must be "
                           "a checkout of this repository).")
    cmd = [sys.executable, script, "--serve", *shlex.split(args.common),
           *(t for t in tokens if not t.startswith(("--env=", "--checkout=")))]
    print(f"starting {name}: {' '.join(cmd[1:])}", flush=True)
    workers[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, env=env)
  info = {}
  for name, proc in workers.items():  # compile one after the other (each uses all cores)
    for line in proc.stdout:
      if line.startswith("ready "):
        info[name] = json.loads(line[6:])
        break
    else:
      raise SystemExit(f"option {name!r}: the worker exited before compiling "
                       f"(exit {proc.wait()}).")
  times = {name: {} for name in workers}
  for round_ in range(args.rounds + 1):  # round 0 is a warm-up
    for name, proc in workers.items():
      proc.stdin.write("step\n")
      line = proc.stdout.readline()
      if not line.startswith("times "):
        raise SystemExit(f"option {name!r}: unexpected worker output {line!r}")
      if round_:
        for case, t in json.loads(line[6:]).items():
          times[name].setdefault(case, []).append(t)
  for proc in workers.values():
    proc.stdin.close()
    proc.wait()
  ref = next(iter(workers))
  print(f"\n| option | case | compile_s | ms/step (median of {args.rounds}) | img/s | "
        f"ratio img/s vs {ref} | min ms | ratio by min ms |")
  print("|---|---|---|---|---|---|---|---|")
  for name in workers:
    for case, ts in times[name].items():
      ms = 1000 * statistics.median(ts)
      ref_ms = 1000 * statistics.median(times[ref][case]) if case in times[ref] else float("nan")
      lo = 1000 * min(ts)
      ref_lo = 1000 * min(times[ref][case]) if case in times[ref] else float("nan")
      images = info[name][case]["images"]
      print(f"| {name} | {case} | {info[name][case]['compile_s']:.1f} | {ms:.1f} | "
            f"{images / (ms / 1000):.2f} | {ref_ms / ms:.3f} | {lo:.1f} | {ref_lo / lo:.3f} |",
            flush=True)


if __name__ == "__main__":
  main()
