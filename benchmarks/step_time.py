"""Compile time and ms/step of the compiled train step, and the cost of each adversary.

Measures, in ONE run on this machine, the same step for several configurations so the
numbers compare (ratios, not absolute speed, are the point on a shared CPU):

  python benchmarks/step_time.py                       # smoke + tiny@32 + adversary overheads
  python benchmarks/step_time.py --variant=base --batch=64 --steps=5

Each row: compile seconds, ms per optimizer step (median of --steps after 2 warm-up
steps), images/s (images, not crops), and the step's FLOPs (XLA cost analysis).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from adpe_jax import defaults, parallel
from adpe_jax.train.pretrain import build_training, step_flops

ADVERSARIES = [("ape", "none", "per_bucket"), ("ape", "embedding", "per_bucket"),
               ("ape", "coordinate", "per_bucket"), ("rpe", "none", "per_bucket"),
               ("rpe", "embedding", "faithful"), ("rpe", "embedding", "per_bucket"),
               ("rpe", "coordinate", "per_bucket")]


def prepare(config, devices=None) -> dict:
  """Builds and compiles the step; returns what `time_steps` needs."""
  mesh = parallel.make_mesh(devices)
  setup = build_training(config, mesh, total_steps=1000, steps_per_epoch=100)
  n = config.num_crops * config.batch_size
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(
      {"images": rng.normal(size=(n, config.image_size, config.image_size, 3)).astype(np.float32)},
      mesh)
  t0 = time.perf_counter()
  lowered = setup["train_step"].lower(setup["state"], batch, setup["step_key"])
  flops = step_flops(config, setup["model"])  # analytic (XLA counts the accum loop once)
  step = lowered.compile()
  compile_s = time.perf_counter() - t0
  run = {"step": step, "state": setup["state"], "batch": batch, "key": setup["step_key"],
         "compile_s": compile_s, "gflop_per_step": flops / 1e9, "times": [],
         "batch_size": config.batch_size}
  time_steps(run, 2)  # warm-up
  run["times"].clear()
  return run


def time_steps(run, n: int) -> None:
  for _ in range(n):
    t = time.perf_counter()
    run["state"], m = run["step"](run["state"], run["batch"], run["key"])
    jax.block_until_ready(m)
    run["times"].append(time.perf_counter() - t)


def summarise(run) -> dict:
  ms = 1000 * float(np.median(run["times"]))
  return {"compile_s": run["compile_s"], "ms_per_step": ms,
          "img_per_s": run["batch_size"] / (ms / 1000), "gflop_per_step": run["gflop_per_step"]}


def row(name, r):
  print(f"{name:34s} compile {r['compile_s']:6.1f} s   {r['ms_per_step']:9.1f} ms/step   "
        f"{r['img_per_s']:8.1f} img/s   {r['gflop_per_step']:9.2f} GFLOP", flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--variant", default="tiny")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--crops", type=int, default=4)
  ap.add_argument("--image_size", type=int, default=28)
  ap.add_argument("--patch", type=int, default=4)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--skip_adversaries", action="store_true")
  args = ap.parse_args()
  print(f"devices: {jax.devices()}")

  smoke = defaults.apply_smoke(defaults.base_config())
  runs = {"smoke (test model, 2x8 crops, accum 2)": prepare(smoke)}
  for pe, kind, emb in ([("ape", "none", "per_bucket")] if args.skip_adversaries else ADVERSARIES):
    c = defaults.base_config()
    c.model.variant, c.model.patch_size, c.model.dtype = args.variant, args.patch, args.dtype
    c.image_size, c.num_crops, c.batch_size, c.accum_steps = (args.image_size, args.crops,
                                                              args.batch, 1)
    c.model.pe, c.adversary.kind, c.adversary.rpe_embedding = pe, kind, emb
    label = f"{args.variant}@{args.batch} {pe} {kind}" + (
        f" ({emb})" if kind == "embedding" and pe == "rpe" else "")
    runs[label] = prepare(c)
  # Interleaved rounds: a slow spell of a shared machine hits every row alike.
  for _ in range(args.steps):
    for run in runs.values():
      time_steps(run, 1)
  base = {}
  for label, run in runs.items():
    r = summarise(run)
    pe = label.split()[1] if "@" in label else None
    if pe and " none" in label:
      base[pe] = r
    elif pe in base:
      label += f" [{r['ms_per_step'] / base[pe]['ms_per_step']:.3f}x]"
    row(label, r)


if __name__ == "__main__":
  main()
