"""Fused iRPE attention: forward+backward time and memory of `pallas` vs `xla`, and a
device correctness check.

  python benchmarks/rpe_attention.py                 # the two shapes below, both impls
  python benchmarks/rpe_attention.py --quick         # small shapes (CPU: seconds)
  python benchmarks/rpe_attention.py --check         # pallas vs xla on this device
  python benchmarks/rpe_attention.py --json out.json # also write the rows as JSON

Shapes (batch, heads, tokens, head_dim): pretraining (256, 12, 50, 64) -- ViT-B on
112 px crops at patch 16 -- and fine-tuning (64, 12, 197, 64).  The RPE term is the
coordinate adversary's (continuous lookup, 75% masked query rows with a shifted
geometry), the most expensive variant; --rpe integer / none for the others.
The function timed is value_and_grad of sum(attention(q, k, v) * c) w.r.t. q, k, v, the
table and the shift (median of --iters after warm-up).  Memory: the compiled
function's temp + output bytes (`memory_analysis()`), i.e. what it allocates beyond its
inputs, plus the device's peak bytes in use where the backend reports it.

On CPU the Pallas kernel only runs in interpret mode (a correctness tool, far slower
than any kernel): the benchmark times the xla reference and says the kernel needs a
GPU; --interpret times interpret mode anyway.  Needs jax, flax, numpy only.
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

from adpe_jax.kernels import irpe
from adpe_jax.kernels.attention import attention

SHAPES = {"pretrain": (256, 12, 50, 64), "finetune": (64, 12, 197, 64)}
QUICK = {"pretrain": (4, 2, 50, 64), "finetune": (2, 2, 197, 64)}
ADV = {"coordinate": ("continuous", "coordinate"), "integer": ("integer", "none"),
       "per_bucket": ("integer", "embedding"), "none": (None, "none")}


def inputs(b, h, t, d, dtype, kind, seed=0):
  grid = int(round((t - 1) ** 0.5))
  assert 1 + grid * grid == t, t
  rng = np.random.default_rng(seed)
  arrays = {n: jnp.asarray(rng.standard_normal((b, t, h, d)) * (d ** -0.5 if n == "q" else 1),
                           dtype) for n in ("q", "k", "v")}
  lookup, adv = ADV[kind]
  if lookup is not None:
    arrays["table"] = jnp.asarray(rng.normal(0, 0.5, (d, irpe.NUM_BUCKETS)), jnp.float32)
  if adv == "coordinate":
    arrays["adv"] = jnp.asarray([0.37, -0.81], jnp.float32)
  elif adv == "embedding":
    arrays["adv"] = jnp.asarray(rng.normal(0, 0.5, (d, irpe.NUM_BUCKETS)), jnp.float32)
  mask = np.zeros((b, t), bool)
  mask[:, 1:] = rng.random((b, t - 1)) < 0.75
  c = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
  return arrays, c, jnp.asarray(mask), grid, lookup, adv


def make_fn(impl, c, mask, grid, lookup, adv, grad=True):
  def loss(arrays):
    ops = None
    if lookup is not None:
      ops = irpe.RPEOperands(table=arrays["table"], adv=arrays.get("adv"),
                            query_mask=mask if adv != "none" else None, grid=grid,
                            lookup=lookup, adversary=adv)
    out = attention(arrays["q"], arrays["k"], arrays["v"], ops, impl=impl)
    return jnp.sum(out.astype(jnp.float32) * c), out
  if grad:
    return jax.jit(jax.value_and_grad(loss, has_aux=True))
  return jax.jit(loss)


def _peak_bytes():
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 (CPU and some backends report nothing)
    return None
  return stats.get("peak_bytes_in_use")


def bench(impl, shape, dtype, kind, iters):
  b, h, t, d = shape
  arrays, c, mask, grid, lookup, adv = inputs(b, h, t, d, dtype, kind)
  fn = make_fn(impl, c, mask, grid, lookup, adv)
  t0 = time.perf_counter()
  compiled = fn.lower(arrays).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = None if mem is None else int(mem.temp_size_in_bytes + mem.output_size_in_bytes)
  jax.block_until_ready(compiled(arrays))
  jax.block_until_ready(compiled(arrays))
  times = []
  for _ in range(iters):
    t1 = time.perf_counter()
    jax.block_until_ready(compiled(arrays))
    times.append(time.perf_counter() - t1)
  return {"impl": impl, "shape": list(shape), "dtype": jnp.dtype(dtype).name, "rpe": kind,
          "compile_s": round(compile_s, 2), "ms": 1000 * float(np.median(times)),
          "alloc_bytes": temp, "device_peak_bytes": _peak_bytes()}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check(quick: bool, on_row=lambda rows: None) -> list[dict]:
  """pallas vs xla on this device: forward and every gradient, lengths 50/197/257,
  head_dim 64/80, float32/bfloat16, integer / per-bucket / coordinate lookups."""
  rows = []
  cases = [(50, 64, "float32", "coordinate"), (50, 80, "bfloat16", "coordinate"),
           (197, 64, "bfloat16", "integer"), (197, 80, "float32", "per_bucket"),
           (257, 64, "float32", "coordinate"), (257, 80, "bfloat16", "per_bucket")]
  if quick:
    cases = cases[:2]
  b, h = (1, 2) if quick else (2, 3)
  with jax.default_matmul_precision("highest"):   # no TF32 in the f32 reference
    for t, d, dt, kind in cases:
      try:
        rows.append(_check_one(b, h, t, d, dt, kind))
      except Exception as e:  # noqa: BLE001 (recorded: a kernel that fails to lower)
        rows.append({"T": t, "d": d, "dtype": dt, "rpe": kind, "ok": False,
                     "error": repr(e)[:2000]})
        print(f"check T={t:3d} d={d:3d} {dt:8s} {kind:10s} FAILED {repr(e)[:500]}", flush=True)
      on_row(rows)
  return rows


def _check_one(b, h, t, d, dt, kind):
  """One row of `check` (raises if the kernel fails to lower or run)."""
  arrays, c, mask, grid, lookup, adv = inputs(b, h, t, d, jnp.dtype(dt), kind, seed=t + d)
  (_, out_p), g_p = make_fn("pallas", c, mask, grid, lookup, adv)(arrays)
  (_, out_x), g_x = make_fn("xla", c, mask, grid, lookup, adv)(arrays)
  errs = {"out": rel_err(out_p, out_x)} | {n: rel_err(g_p[n], g_x[n]) for n in g_x}
  tol = 1e-4 if dt == "float32" else 2e-2
  if dt == "float32":
    ok = all(e < tol for e in errs.values())
  else:
    # bf16: both against the float32 reference on the same (bf16-rounded) inputs;
    # the kernel must be within tol of it or no worse than 1.5x xla's own error.
    a32 = {n: x.astype(jnp.float32) for n, x in arrays.items()}
    (_, out_r), g_r = make_fn("xla", c, mask, grid, lookup, adv)(a32)
    e_p = {"out": rel_err(out_p, out_r)} | {n: rel_err(g_p[n], g_r[n]) for n in g_r}
    e_x = {"out": rel_err(out_x, out_r)} | {n: rel_err(g_x[n], g_r[n]) for n in g_r}
    ok = all(e_p[n] < max(tol, 1.5 * e_x[n]) for n in e_p)
    errs = {n: e_p[n] for n in e_p}
    print(f"      bf16 vs f32 reference: pallas max {max(e_p.values()):.2e}, "
          f"xla max {max(e_x.values()):.2e}", flush=True)
  print(f"check T={t:3d} d={d:3d} {dt:8s} {kind:10s} max rel err "
        f"{max(errs.values()):.2e} (tol {tol:.0e}) {'OK' if ok else 'FAIL'}  "
        + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
  return {"T": t, "d": d, "dtype": dt, "rpe": kind, "tol": tol, "ok": ok,
          "max_rel_err": max(errs.values()), "errors": errs}


def fmt_bytes(n):
  return "-" if n is None else f"{n / 2 ** 20:9.1f} MiB"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="small shapes (CPU)")
  ap.add_argument("--check", action="store_true", help="correctness of pallas vs xla only")
  ap.add_argument("--interpret", action="store_true", help="on CPU, time interpret mode too")
  ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU)")
  ap.add_argument("--rpe", default="coordinate", choices=sorted(ADV))
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  backend = jax.default_backend()
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({backend}), jax {jax.__version__}", flush=True)
  result = {"device": dev.device_kind, "backend": backend, "jax": jax.__version__}

  def dump():  # after every row: a stage killed by its time limit keeps what it measured
    if args.json:
      with open(args.json, "w") as f:
        json.dump(result, f, indent=1)

  if args.check:
    def on_row(rows):
      result["check"], result["check_ok"] = rows, all(r["ok"] for r in rows)
      dump()
    result["check"] = check(args.quick, on_row)
    result["check_ok"] = all(r["ok"] for r in result["check"])
  else:
    dtype = jnp.dtype(args.dtype or ("bfloat16" if backend == "gpu" else "float32"))
    impls = ["xla"]
    if backend in ("gpu", "tpu") or args.interpret:
      impls.append("pallas")
    else:
      print("the Pallas kernel needs a GPU (on CPU it runs only in interpret mode, a "
            "correctness tool): timing the xla reference only; --interpret to time it anyway",
            flush=True)
    rows = []
    for name, shape in (QUICK if args.quick else SHAPES).items():
      by = {}
      for impl in impls:
        try:
          r = bench(impl, shape, dtype, args.rpe, args.iters if impl == "xla" or
                    backend != "cpu" else 2)
        except Exception as e:  # noqa: BLE001 (recorded: a kernel that fails to lower)
          r = {"impl": impl, "shape": list(shape), "name": name, "error": repr(e)[:2000]}
          rows.append(r)
          print(f"{name:9s} {impl}: FAILED {r['error'][:500]}", flush=True)
          continue
        r["name"] = name
        by[impl] = r
        rows.append(r)
        result["bench"] = rows
        dump()
        print(f"{name:9s} {str(tuple(shape)):20s} {dtype.name:8s} {args.rpe:10s} {impl:6s} "
              f"{r['ms']:9.3f} ms  alloc {fmt_bytes(r['alloc_bytes'])}  "
              f"compile {r['compile_s']:.1f} s", flush=True)
      if "pallas" in by and "xla" in by:
        x, p = by["xla"], by["pallas"]
        ratio = x["ms"] / p["ms"]
        mem = (None if not (x["alloc_bytes"] and p["alloc_bytes"])
               else p["alloc_bytes"] / x["alloc_bytes"])
        p["speedup_vs_xla"], p["memory_vs_xla"] = ratio, mem
        print(f"{name:9s} pallas / xla: {ratio:.2f}x faster, memory "
              f"{'-' if mem is None else f'{mem:.2f}x'} of xla", flush=True)
        dump()
    result["bench"] = rows
  dump()
  if args.check and not result["check_ok"]:
    sys.exit(1)


if __name__ == "__main__":
  main()
