"""The iRPE-K logit term alone, forward + backward: our `irpe.rpe_bias` vs the materialised-R
contraction it replaced, for every lookup / adversary, interleaved in one run.

    python benchmarks/rpe_bias.py [--batch 64] [--heads 3] [--head-dim 64] [--grid 7] [--rounds 20]

`materialised` builds R (head_dim, T, T) from the table (a one-hot matmul for the integer
lookup, bilinear weights for the continuous one) and contracts it with q in one einsum
('bhid,dij->bhij', T thin matmuls); the embedding adversary adds a second contraction with
R(A), the coordinate adversary one with R_shifted - R_unshifted.  `ours` is `irpe.rpe_bias`:
for the integer lookup q W (one (B*H*T, hd) x (hd, 50) matmul) and a gather of bucket(i, j).
The loss is sum(bias * g) for a fixed random g; the gradients are w.r.t. q, the table and the
adversary.  Prints min / median ms and ours / materialised by min time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from adpe_jax.kernels import irpe


def materialised(q, ops):
  """The earlier reference: R materialised, contracted with one einsum per term."""
  def table(w, shift=None):
    if ops.lookup == "integer":
      return irpe.integer_table(w, ops.grid)
    return irpe.continuous_table(w, ops.grid, jnp.zeros(2, w.dtype) if shift is None else shift)

  def contract(r):
    return jnp.einsum("bhid,dij->bhij", q, r)

  r_plain = table(ops.table)
  bias = contract(r_plain)
  if ops.adversary == "none":
    return bias
  mask = ops.query_mask[:, None, :, None].astype(q.dtype)
  if ops.adversary == "embedding":
    return bias + mask * contract(table(ops.adv))
  return bias + mask * contract(table(ops.table, ops.adv) - r_plain)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=64, help="crops (B)")
  ap.add_argument("--heads", type=int, default=3)
  ap.add_argument("--head-dim", type=int, default=64)
  ap.add_argument("--grid", type=int, default=7)
  ap.add_argument("--rounds", type=int, default=20)
  args = ap.parse_args()
  b, h, hd, grid = args.batch, args.heads, args.head_dim, args.grid
  t = 1 + grid * grid
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(b, h, t, hd)), jnp.float32)
  w = jnp.asarray(0.1 * rng.normal(size=(hd, irpe.NUM_BUCKETS)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(b, h, t, t)), jnp.float32)
  mask = jnp.asarray(rng.random((b, t)) < 0.75)
  advs = {"none": None, "embedding": jnp.asarray(0.01 * rng.normal(size=w.shape), jnp.float32),
          "coordinate": jnp.asarray([0.3, -0.2], jnp.float32)}
  cases = [("integer", "none"), ("integer", "embedding"), ("continuous", "none"),
           ("continuous", "coordinate")]
  fns = {}
  for lookup, adversary in cases:
    for impl, bias_fn in (("materialised", materialised), ("ours", irpe.rpe_bias)):
      def loss(q, w, a, lookup=lookup, adversary=adversary, bias_fn=bias_fn):
        ops = irpe.RPEOperands(table=w, adv=a, query_mask=None if a is None else mask,
                              grid=grid, lookup=lookup, adversary=adversary)
        return jnp.sum(bias_fn(q, ops) * g)
      argnums = (0, 1) if adversary == "none" else (0, 1, 2)
      fns[(lookup, adversary, impl)] = jax.jit(jax.value_and_grad(loss, argnums=argnums))
  for (lookup, adversary, impl), f in fns.items():
    out = jax.block_until_ready(f(q, w, advs[adversary]))
    if impl == "ours":
      ref = fns[(lookup, adversary, "materialised")](q, w, advs[adversary])
      err = max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30))
                for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
      print(f"{lookup}/{adversary}: ours vs materialised, max relative difference {err:.1e}")
  times = {k: [] for k in fns}
  for _ in range(args.rounds):
    for k, f in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(f(q, w, advs[k[1]]))
      times[k].append(time.perf_counter() - start)
  print(f"\nB={b} H={h} hd={hd} grid={grid}; {args.rounds} interleaved rounds; "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}")
  print("| lookup | adversary | materialised min / median ms | ours min / median ms | "
        "ours / materialised (min) |")
  print("|---|---|---|---|---|")
  for lookup, adversary in cases:
    m, o = times[(lookup, adversary, "materialised")], times[(lookup, adversary, "ours")]
    print(f"| {lookup} | {adversary} | {1e3 * min(m):.2f} / {1e3 * np.median(m):.2f} | "
          f"{1e3 * min(o):.2f} / {1e3 * np.median(o):.2f} | {min(o) / min(m):.2f} |")


if __name__ == "__main__":
  main()
