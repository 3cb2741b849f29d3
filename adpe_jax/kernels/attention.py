"""The one attention interface every transformer block calls.

    out = attention(q, k, v, rpe=None, impl="auto")

q, k, v: (B, T, H, hd); q is the attention's (already scaled) query, so the logits are
q . k.  rpe: None (APE models) or `adpe_jax.rpe.RPEOperands` (the iRPE-K table, the
adversary, the query mask and the geometry, as `RelativePositionKey.operands` returns
them).  Returns (B, T, H, hd) in v's dtype:

    softmax_f32(q k^T + rpe_bias(q_rpe)) v,      q_rpe = rpe.query if given, else q.

Implementations (`model.attention_impl`):

* ``xla``: plain jnp -- the reference.  It IS the computation the model always had
  (moved here from `Attention`, not changed): the fidelity test against the original
  PyTorch code runs through it.  Materialises the (B, H, T, T) logits and bias.
* ``pallas``: the fused kernel of `adpe_jax.kernels.rpe_attention` (forward and a
  `jax.custom_vjp` backward, no (B, H, T, T) tensor in HBM).  On CPU it runs with
  ``interpret=True`` (slow; for tests).
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

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "pallas")


def _f32_or_wider(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


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
    import numpy as np  # noqa: PLC0415
    from adpe_jax.kernels import irpe as rpe_lib  # noqa: PLC0415
    from adpe_jax.kernels.rpe_attention import pallas_attention  # noqa: PLC0415
    b, h, grid, hd = 1, 1, 3, 16
    t = 1 + grid * grid
    x = jnp.asarray(np.random.default_rng(0).normal(size=(b, t, h, hd)), jnp.float32)
    mask = jnp.asarray(np.arange(t)[None] % 2 == 1)

    def loss(q, table, shift):
      ops = rpe_lib.RPEOperands(table=table, adv=shift, query_mask=mask, grid=grid,
                                lookup="continuous", adversary="coordinate")
      return pallas_attention(q, x, x, ops).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
        x, jnp.full((hd, rpe_lib.NUM_BUCKETS), 0.1, jnp.float32), jnp.asarray([0.3, -0.2]))
    jax.block_until_ready(grads)
    return all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  except Exception as e:  # noqa: BLE001
    from absl import logging  # noqa: PLC0415
    logging.warning("attention_impl=auto: the Pallas kernel does not build on this device "
                    "(%s: %s); using xla.", type(e).__name__, str(e).splitlines()[0][:200])
    return False


def xla_attention_heads_first(q, k, v, rpe=None):
  """The reference math head-major: (B, H, T, hd) x3 -> (B, H, T, hd); `rpe.query`, if
  given, is head-major too.  `models.vit.Attention` calls this directly under `xla`."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k)
  if rpe is not None:
    from adpe_jax.kernels.irpe import rpe_bias  # noqa: PLC0415 (keeps APE import light)
    logits = logits + rpe_bias(q if rpe.query is None else rpe.query, rpe)
  probs = jax.nn.softmax(_f32_or_wider(logits), axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


def xla_attention(q, k, v, rpe=None):
  """The reference: (B, T, H, hd) x3 -> (B, T, H, hd); the model's original math."""
  def heads_first(x):
    return x.transpose(0, 2, 1, 3)
  if rpe is not None and rpe.query is not None:
    rpe = rpe.replace(query=heads_first(rpe.query))
  return heads_first(xla_attention_heads_first(heads_first(q), heads_first(k), heads_first(v),
                                               rpe))


def attention(q, k, v, rpe=None, *, impl: str = "auto", block_q: Optional[int] = None):
  """Multi-head attention with the optional iRPE-K term; see the module docstring."""
  impl = resolve_impl(impl)
  if impl == "xla":
    return xla_attention(q, k, v, rpe)
  from adpe_jax.kernels.rpe_attention import pallas_attention  # noqa: PLC0415
  return pallas_attention(q, k, v, rpe, block_q=block_q)
