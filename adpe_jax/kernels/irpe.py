"""iRPE-K relative position encoding: geometry and reference math (spec 4.4, 4.5, 5).

Pure jnp / numpy; the Flax module that declares the table and the adversary is
`adpe_jax.models.irpe.RelativePositionKey`.

Configuration (fixed, as in the original): contextual mode, "product" method, ONE table
shared by all heads, keys only, the cls token in its own bucket (skip = 1),
alpha = 1.9, beta = 3.8, gamma = 15.2, i.e. (2*3+1)**2 + 1 = 50 buckets whatever the grid.

The logit term added before softmax is

    bias[b, h, i, j] = q_scaled[b, h, i, :] . R[:, i, j]

where R (head_dim, 1+L, 1+L) is read from the table W (head_dim, 50):

* integer lookup (spec 5.2/5.3): R[:, i, j] = W[:, bucket(i, j)] with
  bucket = (g(drow) + 3) * 7 + (g(dcol) + 3) and bucket 49 for any pair with cls;
* continuous lookup (spec 4.5 / 5.5): bilinear sampling of W[:, :49] seen as a 7x7
  image with torch ``grid_sample(bilinear, align_corners=False, padding_mode=zeros)``
  geometry.  NOTE the original's axis swap: the ROW offset indexes the LAST axis of
  the 7x7 (W[:, 7a + b], b = row axis), the column offset the first axis.  Tables of
  the two lookups are therefore not interchangeable (spec 9.3c).

Offsets are query minus key: d = pos_i - pos_j; patch n sits at (n // grid, n % grid).

`rpe_bias`, the reference the `xla` attention uses, computes the integer term as
QW = q W followed by a gather of bucket(i, j) (`integer_bias`), and the continuous one by
materialising R (a matmul with constant-structure bilinear weights) and contracting it
with one einsum ('bhid,dij->bhij').  `integer_table` materialises the integer R (a
one-hot matmul), the slower equal form `benchmarks/rpe_bias.py` times against it.
The fused Pallas kernel (`adpe_jax.kernels.rpe_attention`) computes the same term from
QW = q W and bucket / corner ids without materialising anything of size T x T per query.

The adversary (`RPEOperands.adversary`, spec 4.4 / 4.5; the variables are declared by
`RelativePositionKey`) acts on masked query rows only:

* ``"embedding_faithful"`` -- a token a (head_dim,), the original's: the table becomes
  W + a 1^T (the same vector in EVERY bucket, cls too), so the bias gains q_i . a, a
  constant over keys j.  Softmax ignores a per-row constant: this is a mathematical
  NO-OP (spec 4.4 / 9.1); its gradient is pure round-off.
* ``"embedding"`` -- our working variant: a table A (head_dim, 50); masked query rows
  read W + A through the same lookup, i.e. the bias gains
  mask[b, i] * q_i . A[:, bucket(i, j)] (a per-bucket perturbation).
* ``"coordinate"`` -- a shift (2,) = (row shift, col shift) added to the relative offset
  of masked query rows; always uses the continuous lookup (visible rows and cls use the
  zero-shift continuous table).  Spec 4.5.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import numpy as np
import jax
import jax.numpy as jnp

ALPHA, BETA, GAMMA = 1.9, 3.8, 15.2
BETA_INT = int(BETA)                 # 3
SIDE = 2 * BETA_INT + 1              # 7 buckets per axis
NUM_BUCKETS = SIDE * SIDE + 1        # 50
CLS_BUCKET = NUM_BUCKETS - 1         # 49

LOOKUPS = ("integer", "continuous")
ADVERSARIES = ("none", "embedding_faithful", "embedding", "coordinate")

_LOG_RATIO = math.log(GAMMA / ALPHA)


# ----------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------

def _patch_offsets(grid: int) -> tuple[np.ndarray, np.ndarray]:
  """(drow, dcol), each int64 (L, L): query minus key, patches row-major."""
  n = np.arange(grid * grid)
  row, col = n // grid, n % grid
  return row[:, None] - row[None, :], col[:, None] - col[None, :]


def piecewise_index_int(x: np.ndarray) -> np.ndarray:
  """Integer iRPE piecewise index g(x) (spec 5.2), element-wise, returns int64.

  g(x) = round(x) for |x| <= alpha, otherwise
  sign(x) * int(min(beta, round(alpha + ln(|x|/alpha) / ln(gamma/alpha) * (beta - alpha)))).
  """
  x = np.asarray(x, dtype=np.float64)
  ax = np.abs(x)
  inside = ax <= ALPHA
  safe = np.where(inside, ALPHA, ax)
  out = np.round(ALPHA + np.log(safe / ALPHA) / _LOG_RATIO * (BETA - ALPHA))
  out = np.sign(x) * np.minimum(out, BETA)
  return np.where(inside, np.round(x), np.trunc(out)).astype(np.int64)


@functools.lru_cache(maxsize=None)
def _bucket_ids_cached(grid: int) -> np.ndarray:
  drow, dcol = _patch_offsets(grid)
  inner = (piecewise_index_int(drow) + BETA_INT) * SIDE + (piecewise_index_int(dcol) + BETA_INT)
  t = 1 + grid * grid
  ids = np.full((t, t), CLS_BUCKET, dtype=np.int32)
  ids[1:, 1:] = inner
  ids.setflags(write=False)
  return ids


def bucket_ids(grid: int) -> np.ndarray:
  """Integer bucket ids, int32 (1+L, 1+L); token 0 = cls, any pair with cls -> 49.

  The returned array is cached and read-only.
  """
  return _bucket_ids_cached(int(grid))


def integer_table(table: jax.Array, grid: int) -> jax.Array:
  """R (head_dim, 1+L, 1+L) = table[:, bucket_ids(grid)], written as a one-hot matmul.

  The one-hot is built in-graph from the int32 ids (a small constant), so the backward
  pass is a matmul rather than a scatter-add.
  """
  ids = jnp.asarray(bucket_ids(int(grid)))
  one_hot = (ids[None, :, :] == jnp.arange(NUM_BUCKETS, dtype=jnp.int32)[:, None, None])
  return jnp.einsum("dk,kij->dij", table, one_hot.astype(table.dtype))


def piecewise_index_cont(x: jax.Array) -> jax.Array:
  """Continuous piecewise index g~(x) (spec 4.5), element-wise and differentiable.

  g~(x) = x if |x| <= alpha,
          else sign(x) * min(beta, alpha + ln(|x|/alpha)/ln(gamma/alpha)*(beta-alpha)).
  The inside/outside test carries no gradient; the unused branch's log argument is made
  safe so the gradient never becomes NaN (e.g. at x = 0).  The min passes the gradient
  when the value equals beta (torch ``clip(max=beta)`` semantics).
  """
  x = jnp.asarray(x)
  ax = jnp.abs(x)
  inside = jax.lax.stop_gradient(ax <= ALPHA)
  safe = jnp.where(inside, jnp.asarray(ALPHA, x.dtype), ax)
  mag = ALPHA + jnp.log(safe / ALPHA) / _LOG_RATIO * (BETA - ALPHA)
  mag = jnp.where(mag > BETA, jnp.asarray(BETA, x.dtype), mag)
  return jnp.where(inside, x, jnp.sign(x) * mag)


def continuous_pixels(grid: int, shift: jax.Array,
                      dtype: Any = None) -> tuple[jax.Array, jax.Array]:
  """Sampling positions (in 7x7 table pixels) for the patch pairs, each (L, L).

  Returns (pix_b, pix_a): pix_b, from the ROW offset, indexes the LAST table axis;
  pix_a, from the column offset, the first axis.  pixel = ((u + 1) * 7 - 1) / 2 with
  u = clip(g~(d + shift), -beta, beta) / beta, i.e. 3 + 3.5 * g~ / 3.8 (align_corners=False).
  """
  shift = jnp.asarray(shift)
  if dtype is None:
    dtype = shift.dtype if jnp.issubdtype(shift.dtype, jnp.floating) else jnp.float32
  shift = shift.astype(dtype)
  drow, dcol = _patch_offsets(int(grid))

  def pix(d, s):
    g = piecewise_index_cont(jnp.asarray(d, dtype) + s)
    u = jnp.clip(g, -BETA, BETA) / BETA
    return ((u + 1) * SIDE - 1) / 2

  return pix(drow, shift[0]), pix(dcol, shift[1])


def _linear_weights(p: jax.Array) -> jax.Array:
  """Bilinear 1-D weights (..., 7) of a pixel position, zero padding outside [0, 6].

  Same arithmetic as torch grid_sample: p0 = floor(p) (no gradient), weight (p0 + 1 - p) on
  p0 and (p - p0) on p0 + 1; a neighbour outside the table contributes nothing.
  """
  p0 = jax.lax.stop_gradient(jnp.floor(p))
  w_hi = p - p0
  w_lo = (p0 + 1) - p
  i0 = p0.astype(jnp.int32)
  return (w_lo[..., None] * jax.nn.one_hot(i0, SIDE, dtype=p.dtype)
          + w_hi[..., None] * jax.nn.one_hot(i0 + 1, SIDE, dtype=p.dtype))


def continuous_table(table: jax.Array, grid: int, shift: jax.Array) -> jax.Array:
  """Continuous (interpolated) R (head_dim, 1+L, 1+L) for a (row, col) offset shift.

  Bilinear sampling of table[:, :49].reshape(hd, 7, 7) (T[:, a, b] = table[:, 7a + b]) at
  (a, b) = (pixel of col offset, pixel of row offset), zero padding; row 0 and column 0
  (cls) are table[:, 49].  Differentiable w.r.t. table and shift; computed in table.dtype.
  """
  dtype = table.dtype
  hd = table.shape[0]
  grid = int(grid)
  L = grid * grid
  pix_b, pix_a = continuous_pixels(grid, jnp.asarray(shift).astype(dtype), dtype)
  wa = _linear_weights(pix_a)                                        # (L, L, 7)  axis a
  wb = _linear_weights(pix_b)                                        # (L, L, 7)  axis b
  weights = (wa[..., :, None] * wb[..., None, :]).reshape(L, L, SIDE * SIDE)
  inner = jnp.einsum("dk,ijk->dij", table[:, :SIDE * SIDE], weights)  # (hd, L, L)
  cls = table[:, CLS_BUCKET]
  col0 = jnp.broadcast_to(cls[:, None, None], (hd, L, 1))
  row0 = jnp.broadcast_to(cls[:, None, None], (hd, 1, L + 1))
  return jnp.concatenate([row0, jnp.concatenate([col0, inner], axis=2)], axis=1)


# ----------------------------------------------------------------------------------------
# The logit term
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RPEOperands:
  """Everything the iRPE-K logit term needs besides the query: what an attention
  implementation (`adpe_jax.kernels.attention`) receives, e.g. from
  `adpe_jax.models.irpe.RelativePositionKey`.

  table: the raw ``lookup_table`` parameter (head_dim, 50), param dtype.
  adv: the raw adversary (``adv_token`` (head_dim,) / ``adv_table`` (head_dim, 50) /
    ``adv_shift`` (2,)), or None when no adversary is applied.
  query_mask: (B, T) bool, 1 = masked query row; None when no adversary is applied.
  grid: patch grid side (T = 1 + grid**2).
  lookup: the EFFECTIVE lookup ("continuous" for the coordinate adversary).
  adversary: the EFFECTIVE adversary ("none" when no mask is given).
  query: optional (B, T, H, hd) query for the RPE term when it is not the attention's
    (scaled) query, e.g. the fine-tune model's unscaled query (spec 9.2).
  """
  table: jax.Array
  adv: Optional[jax.Array]
  query_mask: Optional[jax.Array]
  grid: int
  lookup: str
  adversary: str
  query: Optional[jax.Array] = None

  def replace(self, **kw) -> "RPEOperands":
    return dataclasses.replace(self, **kw)


@functools.lru_cache(maxsize=None)
def _flat_bucket_ids_cached(grid: int) -> np.ndarray:
  ids = bucket_ids(grid)
  flat = (np.arange(ids.shape[0])[:, None] * NUM_BUCKETS + ids).astype(np.int32)
  flat.setflags(write=False)
  return flat


def integer_bias(qw: jax.Array, grid: int) -> jax.Array:
  """The integer lookup's logit term from QW = q W (..., T, 50): out[..., i, j] =
  QW[..., i, bucket(i, j)], a gather on the small QW (its transpose a scatter-add).

  Equal to contracting q with `integer_table` (R[:, i, j] = W[:, bucket(i, j)]), but the
  q W product is one (B*H*T, hd) x (hd, 50) matmul instead of T thin ones: 1.2-1.7x
  faster forward + backward on a 2-core CPU (`benchmarks/rpe_bias.py`).
  """
  *lead, t, k = qw.shape
  flat = jnp.asarray(_flat_bucket_ids_cached(int(grid)))
  return jnp.take(qw.reshape(*lead, t * k), flat, axis=-1, mode="clip")


def rpe_bias(q_scaled: jax.Array, ops: RPEOperands) -> jax.Array:
  """The logit term (B, H, T, T) from queries (B, H, T, hd): the reference computation
  used by the `xla` attention (`rpe_attention.rpe_attention_reference`) and by
  `adpe_jax.models.irpe.RelativePositionKey`.

  Integer lookup: QW = q W, then a gather (`integer_bias`); the embedding adversary's
  masked rows read q (W + A) = QW + q A, from one matmul against [W, A].  Continuous
  lookup: R materialised, one einsum; the coordinate adversary's masked rows take the
  shifted table's term, the other rows the unshifted one's.
  """
  dtype = q_scaled.dtype
  lookup = ops.lookup
  # Tables are built in q's dtype, except that the continuous geometry / bilinear
  # weights never go below float32 (bf16 pixel positions would be far too coarse).
  table_dtype = dtype if lookup == "integer" else jnp.promote_types(dtype, jnp.float32)
  w = ops.table.astype(table_dtype)
  adversary = ops.adversary
  if adversary == "coordinate" and lookup != "continuous":
    raise ValueError("the coordinate adversary needs the continuous lookup, got "
                     f"lookup={lookup!r}.")
  adv = None if adversary == "none" else ops.adv.astype(table_dtype)
  mask = None if adversary == "none" else jnp.asarray(ops.query_mask)[:, None, :, None]

  def contract(r):
    return jnp.einsum("bhid,dij->bhij", q_scaled, r.astype(dtype))

  if lookup == "integer":
    if adversary == "embedding":
      qw2 = jnp.einsum("bhid,dk->bhik", q_scaled, jnp.concatenate([w, adv], axis=1))
      qw = qw2[..., :NUM_BUCKETS] + mask.astype(dtype) * qw2[..., NUM_BUCKETS:]
      return integer_bias(qw, ops.grid)
    bias = integer_bias(jnp.einsum("bhid,dk->bhik", q_scaled, w), ops.grid)
  else:
    r_plain = continuous_table(w, ops.grid, jnp.zeros((2,), table_dtype))
    if adversary == "coordinate":
      return jnp.where(mask, contract(continuous_table(w, ops.grid, adv)), contract(r_plain))
    bias = contract(r_plain)
    if adversary == "embedding":
      return bias + mask.astype(dtype) * contract(continuous_table(adv, ops.grid,
                                                                    jnp.zeros((2,), table_dtype)))
  if adversary == "none":
    return bias
  # "embedding_faithful": the same vector in every bucket, a per-row constant q_i . a
  # (a no-op under softmax).
  delta = jnp.einsum("bhid,d->bhi", q_scaled, adv.astype(dtype))[..., None]
  return bias + mask.astype(dtype) * delta
