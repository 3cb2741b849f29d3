"""The iRPE-K Flax module (spec 4.4, 4.5, 5.3, 5.5): declares the shared table and the
adversary and hands them on as `adpe_jax.kernels.irpe.RPEOperands`; the math (buckets,
the continuous lookup, the logit term) is `adpe_jax.kernels.irpe`.

Adversaries live in the Flax variable collection ``adpe_jax.layout.ADVERSARY``
(``"adversary"``, not ``"params"``), zero-initialised like the original; the names are the
original's:

* ``"embedding_faithful"`` -- ``adv_token`` a (head_dim,), the original's no-op (spec 4.4 /
  9.1); kept for checkpoint / reference compatibility.
* ``"embedding"`` -- ``adv_table`` A (head_dim, 50), our working per-bucket variant.
* ``"coordinate"`` -- ``adv_shift`` (2,) = (row shift, col shift) of masked query rows'
  relative offsets, through the continuous lookup (spec 4.5).

The adversary is read only where masked query rows exist: a call with
``query_mask=None`` (e.g. frozen-encoder features) needs no ``"adversary"`` collection.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from adpe_jax.layout import ADVERSARY
from adpe_jax.kernels.irpe import ADVERSARIES, LOOKUPS, NUM_BUCKETS, RPEOperands, rpe_bias


class RelativePositionKey(nn.Module):
  """iRPE-K logit bias (B, H, T, T) from scaled queries (spec 4.4, 4.5, 5.3, 5.5).

  Attributes:
    head_dim: per-head width (the table is shared by all heads).
    grid: patch grid side; T must be 1 + grid**2 (cls first).
    lookup: "integer" (spec 5.2/5.3) or "continuous" (spec 4.5/5.5, zero shift for every
      row unless the coordinate adversary shifts masked rows).
    adversary: "none" | "embedding_faithful" | "embedding" | "coordinate" (the math:
      `adpe_jax.kernels.irpe`).  "coordinate" always uses the continuous lookup, whatever
      ``lookup`` says.
    param_dtype: dtype of the parameters; computation runs in q's dtype (the continuous
      lookup's geometry and sampling in at least float32, then cast to q's dtype).

  Params: ``lookup_table`` (head_dim, 50) [torch ``rpe_k.lookup_table_weight`` (1, hd, 50)].
  Collection "adversary": ``adv_token`` (head_dim,) / ``adv_table`` (head_dim, 50) /
  ``adv_shift`` (2,), read only when ``query_mask`` is given.

  ``operands(q, mask)`` declares / reads the variables and returns `RPEOperands` (what
  the fused attention kernels take); ``__call__`` is ``rpe_bias(q, operands(q, mask))``.
  """

  head_dim: int
  grid: int
  lookup: str = "integer"
  adversary: str = "none"
  param_dtype: Any = jnp.float32

  @nn.compact
  def operands(self, q_scaled: jax.Array, query_mask: Optional[jax.Array] = None) -> RPEOperands:
    if self.lookup not in LOOKUPS:
      raise ValueError(f"lookup must be one of {LOOKUPS}, got {self.lookup!r}.")
    if self.adversary not in ADVERSARIES:
      raise ValueError(f"adversary must be one of {ADVERSARIES}, got {self.adversary!r}.")
    *_, t, hd = q_scaled.shape
    if hd != self.head_dim:
      raise ValueError(f"q head dim {hd} != head_dim {self.head_dim}.")
    if t != 1 + self.grid * self.grid:
      raise ValueError(f"sequence length {t} != 1 + grid**2 = {1 + self.grid ** 2} (cls first).")
    lookup = "continuous" if self.adversary == "coordinate" else self.lookup
    zeros = nn.initializers.zeros
    w = self.param("lookup_table", zeros, (self.head_dim, NUM_BUCKETS), self.param_dtype)
    plain = RPEOperands(table=w, adv=None, query_mask=None, grid=self.grid, lookup=lookup,
                        adversary="none")
    if self.adversary == "none" or (query_mask is None and not self.is_initializing()):
      return plain
    name, shape = {"embedding_faithful": ("adv_token", (self.head_dim,)),
                   "embedding": ("adv_table", (self.head_dim, NUM_BUCKETS)),
                   "coordinate": ("adv_shift", (2,))}[self.adversary]
    adv = self.variable(ADVERSARY, name, jnp.zeros, shape, self.param_dtype).value
    if query_mask is None:
      return plain
    return plain.replace(adv=adv, query_mask=jnp.asarray(query_mask), adversary=self.adversary)

  def __call__(self, q_scaled: jax.Array, query_mask: Optional[jax.Array] = None) -> jax.Array:
    return rpe_bias(q_scaled, self.operands(q_scaled, query_mask))
