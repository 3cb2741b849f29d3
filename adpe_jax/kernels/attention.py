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
  return _auto_impl(backend, jax.device_count(), str(capability))


def xla_attention(q, k, v, rpe=None):
  """The reference: (B, T, H, hd) x3 -> (B, T, H, hd); the model's original math."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
  if rpe is not None:
    from adpe_jax.rpe import rpe_bias  # noqa: PLC0415 (keeps APE import light)
    q_rpe = q if rpe.query is None else rpe.query
    logits = logits + rpe_bias(q_rpe.transpose(0, 2, 1, 3), rpe)
  probs = jax.nn.softmax(_f32_or_wider(logits), axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def attention(q, k, v, rpe=None, *, impl: str = "auto", block_q: Optional[int] = None):
  """Multi-head attention with the optional iRPE-K term; see the module docstring."""
  impl = resolve_impl(impl)
  if impl == "xla":
    return xla_attention(q, k, v, rpe)
  from adpe_jax.kernels.rpe_attention import pallas_attention  # noqa: PLC0415
  return pallas_attention(q, k, v, rpe, block_q=block_q)
