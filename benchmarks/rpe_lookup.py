"""The iRPE table lookup R = table[:, bucket_ids] as a one-hot matmul (ours) vs a gather.

`adpe_jax.rpe.integer_table` builds R (head_dim, T, T) with a one-hot matmul, so that its
backward pass is a matmul rather than a scatter-add.  This script compiles the whole RPE
train step (MAE+ RPE, and RPE + embedding adversary, which use the integer lookup) twice
in one process, once with that function and once with `jnp.take` (a gather), and times
them interleaved:

    python benchmarks/rpe_lookup.py                        # tiny12, 32 and 128 crops
    python benchmarks/rpe_lookup.py --crops 128 --steps 10 --host-devices 2
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--crops", default="32,128")
  ap.add_argument("--cases", default="rpe,rpe_embed")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--host-devices", type=int, default=0)
  opts = ap.parse_args()
  if opts.host_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={opts.host_devices}")
  sys.argv = [sys.argv[0]]
  import jax.numpy as jnp  # noqa: PLC0415
  import train_step as ts  # noqa: PLC0415
  from adpe_jax import rpe  # noqa: PLC0415
  args = ts._args()  # noqa: SLF001 (train_step's defaults: tiny12, 112 px, patch 16)
  one_hot = rpe.integer_table

  def gather(table, grid):
    return jnp.take(table, jnp.asarray(rpe.bucket_ids(int(grid))), axis=1)

  runs = {}
  for crops in (int(c) for c in opts.crops.split(",")):
    for case in opts.cases.split(","):
      for name, fn in (("one-hot", one_hot), ("gather", gather)):
        rpe.integer_table = fn  # traced when the step compiles, in prepare()
        print(f"compiling {case}@{crops} {name} ...", flush=True)
        runs[(case, crops, name)] = ts.prepare(ts.case_config(args, case, crops))
  rpe.integer_table = one_hot
  for _ in range(opts.steps):
    for run in runs.values():
      ts.time_steps(run, 1)
  print("\n| case | lookup | ms/step | gather / one-hot time |")
  print("|---|---|---|---|")
  for (case, crops, name), run in runs.items():
    ms = 1000 * float(np.median(run["times"]))
    ref = 1000 * float(np.median(runs[(case, crops, "one-hot")]["times"]))
    print(f"| {case}@{crops} | {name} | {ms:.1f} | {ms / ref:.3f} |", flush=True)


if __name__ == "__main__":
  main()
