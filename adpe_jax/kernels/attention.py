"""The one attention interface every transformer block calls.

    out = attention(q, k, v, rpe=None, impl="auto")

q, k, v: (B, T, H, hd); q is the attention's (already scaled) query, so the logits are
q . k.  rpe: None (APE models) or `adpe_jax.kernels.irpe.RPEOperands` (the iRPE-K table,
the adversary, the query mask and the geometry, as `RelativePositionKey.operands` returns
them).  Returns (B, T, H, hd) in v's dtype:

    softmax_f32(q k^T + rpe_bias(q_rpe)) v,      q_rpe = rpe.query if given, else q.

Implementations (`model.attention_impl`):

* ``xla``: `rpe_attention.rpe_attention_reference`, plain jnp -- the reference.  It IS
  the computation the model always had: the fidelity test against the original PyTorch
  code runs through it.  Materialises the (B, H, T, T) logits and bias.
* ``pallas``: `rpe_attention.rpe_attention`, the fused kernel (forward and a
  `jax.custom_vjp` backward, no (B, H, T, T) tensor in HBM).  On CPU it runs in the
  Pallas interpreter (slow; for tests).
* ``auto``: ``pallas`` on a single CUDA GPU of compute capability >= 8.0 (the Triton
  backend the kernel targets), else ``xla``.  TPUs stay on ``xla`` under ``auto`` (the
  kernel is written to be Mosaic-TPU lowerable but was never compiled on one; select
  ``pallas`` explicitly to try); several devices stay on ``xla`` because a pallas_call is
  not partitioned by GSPMD (its operands would be replicated) until the kernel is wrapped
  in a shard_map over the batch axis.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import jax
import jax.numpy as jnp
from absl import logging

from adpe_jax.kernels import irpe
from adpe_jax.kernels import rpe_attention as fused

IMPLS = ("auto", "xla", "pallas")


@functools.lru_cache(maxsize=None)
def _auto_impl(backend: str, device_count: int, capability: str) -> str:
  if backend != "gpu" or device_count != 1:
    return "xla"
  try:
    major = int(str(capability).split(".")[0])
  except ValueError:
    return "xla"
  return "pallas" if major >= 8 else "xla"


def resolve_impl(impl: str) -> str:
  """'auto' | 'xla' | 'pallas' -> 'xla' | 'pallas' for the default backend."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}.")
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  capability = ""
  if backend == "gpu":
    capability = getattr(jax.devices()[0], "compute_capability", "") or ""
  chosen = _auto_impl(backend, jax.device_count(), str(capability))
  if chosen == "pallas" and not _pallas_builds():
    return "xla"
  return chosen


@functools.lru_cache(maxsize=None)
def _pallas_builds() -> bool:
  """Under `auto`: compile and run the kernel (forward and backward, with a coordinate
  adversary) once on tiny shapes; if that fails on this device, warn and use `xla`, so a
  kernel that does not build here never breaks default training."""
  try:
    b, h, grid, hd = 1, 1, 3, 16
    t = 1 + grid * grid
    x = jnp.asarray(np.random.default_rng(0).normal(size=(b, t, h, hd)), jnp.float32)
    mask = jnp.asarray(np.arange(t)[None] % 2 == 1)

    def loss(q, table, shift):
      ops = irpe.RPEOperands(table=table, adv=shift, query_mask=mask, grid=grid,
                             lookup="continuous", adversary="coordinate")
      return fused.rpe_attention(q, x, x, ops).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
        x, jnp.full((hd, irpe.NUM_BUCKETS), 0.1, jnp.float32), jnp.asarray([0.3, -0.2]))
    jax.block_until_ready(grads)
    return all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  except Exception as e:  # noqa: BLE001
    logging.warning("attention_impl=auto: the Pallas kernel does not build on this device "
                    "(%s: %s); using xla.", type(e).__name__, str(e).splitlines()[0][:200])
    return False


def attention(q, k, v, rpe: Optional[irpe.RPEOperands] = None, *, impl: str = "auto",
              block_sizes: Optional[fused.BlockSizes] = None,
              interpret: Optional[bool] = None):
  """Multi-head attention with the optional iRPE-K term; see the module docstring.
  `block_sizes` and `interpret` go to the fused kernel (`rpe_attention.rpe_attention`)
  and are ignored under `xla`."""
  impl = resolve_impl(impl)
  if impl == "xla":
    return fused.rpe_attention_reference(q, k, v, rpe)
  return fused.rpe_attention(q, k, v, rpe, block_sizes=block_sizes, interpret=interpret)
