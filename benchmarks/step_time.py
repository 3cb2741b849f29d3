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
from adpe_jax.train.pretrain import build_training

ADVERSARIES = [("ape", "none", "per_bucket"), ("ape", "embedding", "per_bucket"),
               ("ape", "coordinate", "per_bucket"), ("rpe", "none", "per_bucket"),
               ("rpe", "embedding", "faithful"), ("rpe", "embedding", "per_bucket"),
               ("rpe", "coordinate", "per_bucket")]


def measure(config, steps: int, devices=None) -> dict:
  mesh = parallel.make_mesh(devices)
  setup = build_training(config, mesh, total_steps=1000, steps_per_epoch=100)
  state, key = setup["state"], setup["step_key"]
  n = config.num_crops * config.batch_size
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(
      {"images": rng.normal(size=(n, config.image_size, config.image_size, 3)).astype(np.float32)},
      mesh)
  t0 = time.perf_counter()
  lowered = setup["train_step"].lower(state, batch, key)
  flops = (lowered.cost_analysis() or {}).get("flops", float("nan"))
  step = lowered.compile()
  compile_s = time.perf_counter() - t0
  for _ in range(2):
    state, m = step(state, batch, key)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = step(state, batch, key)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  ms = 1000 * float(np.median(times))
  return {"compile_s": compile_s, "ms_per_step": ms,
          "img_per_s": config.batch_size / (ms / 1000), "gflop_per_step": flops / 1e9}


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
  row("smoke (test model, 2x8 crops, accum 2)", measure(smoke, args.steps))

  base = None
  for pe, kind, emb in ([("ape", "none", "per_bucket")] if args.skip_adversaries else ADVERSARIES):
    c = defaults.base_config()
    c.model.variant, c.model.patch_size, c.model.dtype = args.variant, args.patch, args.dtype
    c.image_size, c.num_crops, c.batch_size, c.accum_steps = (args.image_size, args.crops,
                                                              args.batch, 1)
    c.model.pe, c.adversary.kind, c.adversary.rpe_embedding = pe, kind, emb
    r = measure(c, args.steps)
    label = f"{args.variant}@{args.batch} {pe} {kind}" + (f" ({emb})" if kind == "embedding" and pe == "rpe" else "")
    if kind == "none":
      base = r
    elif base is not None:
      label += f" [{r['ms_per_step'] / base['ms_per_step']:.3f}x]"
    row(label, r)


if __name__ == "__main__":
  main()
