"""Compile time of the pretraining train step, blocks unrolled vs scanned (model.scan_blocks).

For each variant (ViT-B/L/H, adpe_jax/models/variants.py) with RPE + the coordinate
adversary (configs/vit*_rpe_coord.py, i.e. `pretrain_config.seed_config("rpe", "coordinate")`),
one image x num_crops crops per step, no accumulation, one device: the train step built
as `pretrain.build_training` builds it (same optimizers, shardings, donation), lowered
and compiled from abstract shapes (no state is allocated), with model.scan_blocks False
and True, in one run.  Prints a table with lower / compile seconds, the StableHLO size
and the unrolled / scanned ratio.

    python benchmarks/compile_time.py                               # base, large, huge
    python benchmarks/compile_time.py --variants base --skip-unrolled-above 12
    python benchmarks/compile_time.py --skip-unrolled-above 12     # unrolled ViT-B only

Unrolled ViT-L / ViT-H can take very long on a small CPU: --skip-unrolled-above DEPTH
skips the unrolled case of encoders deeper than DEPTH.  The persistent compilation cache
is not used (every compile is cold).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp

from adpe_jax import parallel
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.models.variants import VARIANTS
from adpe_jax.train import optimizer as optim
from adpe_jax.train.state import build_model, create_train_state
from adpe_jax.train.step import make_train_step

PATCH = {"base": 16, "large": 16, "huge": 14}


def config_for(variant: str, scan: bool, images: int):
  c = pretrain_config.seed_config("rpe", "coordinate", None, variant=variant,
                           patch_size=PATCH.get(variant, 16))
  c.model.scan_blocks = scan
  c.batch_size, c.accum_steps = images, 1
  return c


def compile_step(c) -> dict:
  """lower() and compile() seconds of the train step of config c (as build_training)."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = build_model(c)
  tx, adv_tx = optim.make_optimizers(c, 1000, 100.0)
  lr_fn, adv_lr_fn = optim.schedules(c, 1000, 100.0)
  key = jax.random.key(0)
  abstract = jax.eval_shape(lambda k: create_train_state(model, tx, adv_tx, k), key)
  state_sharding = parallel.state_shardings(mesh, abstract, c.mesh.fsdp_min_size)
  repl = parallel.replicated(mesh)
  step = jax.jit(
      make_train_step(model, tx, adv_tx, c.accum_steps, lr_fn, adv_lr_fn,
                      inner_steps=c.adversary.inner_steps, adv_norm=c.adversary.norm,
                      adv_eps=c.adversary.eps, inner_step_size=c.adversary.inner_step_size),
      in_shardings=(state_sharding, parallel.batch_sharding(mesh), repl),
      out_shardings=(state_sharding, repl), donate_argnums=(0,))
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       abstract, state_sharding)
  n = c.num_crops * c.batch_size
  batch = {"images": jax.ShapeDtypeStruct((n, c.image_size, c.image_size, 3), jnp.float32),
           "ids": jax.ShapeDtypeStruct((n,), jnp.int32)}
  t0 = time.perf_counter()
  lowered = step.lower(state, batch, key)
  lower_s = time.perf_counter() - t0
  hlo_chars = len(lowered.as_text())
  t0 = time.perf_counter()
  lowered.compile()
  compile_s = time.perf_counter() - t0
  return {"lower_s": lower_s, "compile_s": compile_s, "hlo_chars": hlo_chars}


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--variants", default="base,large,huge")
  ap.add_argument("--skip-unrolled-above", type=int, default=0,
                  help="skip the unrolled case for encoder depth > DEPTH (0: never skip)")
  ap.add_argument("--images", type=int, default=1, help="images per step (x num_crops crops)")
  args = ap.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)
  rows = []
  for variant in [v for v in args.variants.split(",") if v]:
    if variant not in VARIANTS:
      raise SystemExit(f"error: --variants: {variant!r} is not one of {', '.join(VARIANTS)}.")
    depth = VARIANTS[variant][1]
    row = {"variant": variant, "depth": depth, "decoder_depth": VARIANTS[variant][4]}
    for scan in (True, False):
      name = "scanned" if scan else "unrolled"
      if not scan and args.skip_unrolled_above and depth > args.skip_unrolled_above:
        row[name] = None
        continue
      c = config_for(variant, scan, args.images)
      row[name] = compile_step(c)
      print(json.dumps({"variant": variant, "layout": name, "crops": c.num_crops * c.batch_size,
                        **row[name]}), flush=True)
    rows.append(row)
  print(f"\nbackend {jax.default_backend()} ({jax.devices()[0].device_kind}), RPE + coordinate "
        f"adversary, {args.images} image(s) x 4 crops, 112 px, train step lower + compile")
  print("| model | depth (enc+dec) | unrolled lower s | unrolled compile s | scanned lower s "
        "| scanned compile s | compile unrolled/scanned | HLO chars unrolled/scanned |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    s, u = r["scanned"], r["unrolled"]
    fmt = lambda d, k: "skipped" if d is None else f"{d[k]:.1f}"  # noqa: E731
    ratio = "-" if u is None else f"{u['compile_s'] / s['compile_s']:.1f}x"
    hlo = "-" if u is None else f"{u['hlo_chars']:,} / {s['hlo_chars']:,}"
    if u is None:
      hlo = f"- / {s['hlo_chars']:,}"
    print(f"| {r['variant']} | {r['depth']}+{r['decoder_depth']} | {fmt(u, 'lower_s')} | "
          f"{fmt(u, 'compile_s')} | {fmt(s, 'lower_s')} | {fmt(s, 'compile_s')} | {ratio} | "
          f"{hlo} |")


if __name__ == "__main__":
  main()
