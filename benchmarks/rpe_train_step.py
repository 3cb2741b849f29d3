"""The ViT-B RPE-coordinate pretraining step with `attention_impl` xla vs pallas: img/s
and MFU against the device's dense bf16 peak.

  python benchmarks/rpe_train_step.py                # ViT-B/16, 112 px, 4 crops, bf16
  python benchmarks/rpe_train_step.py --quick        # the :smoke model (CPU: seconds)
  python benchmarks/rpe_train_step.py --json out.json

The step is `adpe_jax.train.step.make_train_step` (one value_and_grad over params and
the adversary, AdamW on params and the adversary's Adam ascent + L2 projection), accum
1, on random images (the input pipeline is not measured), data parallel over all local
devices (`--devices N` for fewer; `--batch` is per device): traced on its mesh
(`parallel.under_mesh`), so on several GPUs the pallas rows time the kernel under
shard_map, as training runs it.  FLOPs are the analytic model
FLOPs of `adpe_jax.flops` (the same count for both implementations).  Needs jax, flax,
optax, numpy only (no ml_collections, tensorflow or clu): what GPU images carry.
On CPU only xla is timed unless --impls names pallas (interpret mode: slow).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import optax

from adpe_jax import adversary as adv_lib
from adpe_jax import flops as flops_lib
from adpe_jax import parallel
from adpe_jax.models.mae import MAEPlus
from adpe_jax.models.variants import model_kwargs
from adpe_jax.train.optimizer import decay_mask
from adpe_jax.train.state import create_train_state
from adpe_jax.train.step import make_train_step

# Dense bf16 peak FLOP/s (vendor data sheets); adpe_jax.train.metrics has the same table
# but imports absl and etils.
PEAK_FLOPS = {"NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12,
              "NVIDIA L4": 121e12, "NVIDIA A10": 125e12, "TPU v5p": 459e12, "TPU v4": 275e12}


def peak_flops():
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def build(impl, quick, dtype, remat):
  if quick:
    kw = dict(image_size=28, patch_size=4, **model_kwargs("test"))
  else:
    kw = dict(image_size=112, patch_size=16, **model_kwargs("base"))
  return MAEPlus(pe="rpe", adversary="coordinate", dtype=None if dtype == "float32" else
                 jnp.dtype(dtype), attention_impl=impl, remat=remat, **kw)


def run(impl, args):
  model = build(impl, args.quick, args.dtype, args.remat)
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05, mask=decay_mask)
  adv_tx = adv_lib.ascent(lambda s: 1e-4, 0.9, 0.95, 0.0, "l2", 1.0)
  mesh = parallel.make_mesh(jax.local_devices()[:args.devices or None])
  repl = parallel.replicated(mesh)
  state = jax.jit(parallel.under_mesh(lambda k: create_train_state(model, tx, adv_tx, k), mesh),
                  out_shardings=repl)(jax.random.key(0))
  images = args.batch * mesh.size
  crops = images * args.crops
  rng = np.random.default_rng(0)
  batch = {"images": jax.device_put(np.asarray(rng.standard_normal(
      (crops, model.image_size, model.image_size, 3)), np.float32),
      parallel.batch_sharding(mesh))}
  step = jax.jit(parallel.under_mesh(make_train_step(model, tx, adv_tx, 1), mesh),
                 in_shardings=(repl, parallel.batch_sharding(mesh), repl),
                 out_shardings=(repl, repl), donate_argnums=0)
  key = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(2):
    state, m = compiled(state, batch, key)
  jax.block_until_ready(m)
  times = []
  for _ in range(args.steps):
    t1 = time.perf_counter()
    state, m = compiled(state, batch, key)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t1)
  sec = float(np.median(times))
  flops = flops_lib.train_step_flops(model, crops)
  peak = peak_flops()
  return {"impl": impl, "devices": mesh.size, "images_per_step": images,
          "crops_per_step": crops, "dtype": args.dtype, "compile_s": round(compile_s, 1),
          "ms_per_step": 1000 * sec, "img_per_s": images / sec,
          "tflops": flops / sec / 1e12 / mesh.size,   # per device
          "mfu": None if peak is None else flops / sec / peak / mesh.size,
          "loss": float(m["loss"]), "finite": float(m["finite"])}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="the :smoke model (CPU)")
  ap.add_argument("--batch", type=int, default=None,
                  help="images per step per device (x crops)")
  ap.add_argument("--devices", type=int, default=0, help="local devices (0: all)")
  ap.add_argument("--crops", type=int, default=4)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--remat", default="none")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--impls", default=None, help="comma-separated; default xla,pallas on "
                  "GPU/TPU, xla on CPU")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  if args.batch is None:
    args.batch = 4 if args.quick else 64
  backend = jax.default_backend()
  impls = (args.impls or ("xla,pallas" if backend in ("gpu", "tpu") else "xla")).split(",")
  kind = jax.devices()[0].device_kind
  print(f"device: {kind} ({backend}), jax {jax.__version__}; ViT-"
        f"{'test' if args.quick else 'B/16 112px'} RPE coordinate, {args.batch} images per "
        f"device x "
        f"{args.crops} crops, {args.dtype}", flush=True)
  if "pallas" not in impls:
    print("pallas not timed (needs a GPU; --impls xla,pallas runs interpret mode on CPU)")
  rows = []
  for impl in impls:
    try:
      r = run(impl, args)
    except Exception as e:  # noqa: BLE001 (recorded: e.g. a kernel that fails to lower)
      r = {"impl": impl, "error": repr(e)[:2000]}
      print(f"{impl:6s} FAILED {r['error'][:500]}", flush=True)
    else:
      mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
      print(f"{impl:6s} {r['ms_per_step']:9.1f} ms/step  {r['img_per_s']:9.1f} img/s  "
            f"{r['tflops']:7.2f} TFLOP/s/device  MFU {mfu}  compile {r['compile_s']} s  "
            f"loss {r['loss']:.4f}", flush=True)
    rows.append(r)
    if args.json:  # after every row: a later impl that hangs or dies keeps the earlier
      with open(args.json, "w") as f:
        json.dump({"device": kind, "backend": backend, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
