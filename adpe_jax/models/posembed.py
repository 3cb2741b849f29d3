"""2-D sin-cos positional embeddings from continuous coordinates (spec 2.2, 4.3).

The table is fixed (never trained).  It is computed from *continuous* (column, row)
coordinates so that the APE coordinate adversary can shift the coordinates of masked
patches and differentiate through sin/cos.

Layout (faithful to the original / MAE): for a patch at row i, column j and
d = dim // 2, omega_k = 10000 ** (-k / (d / 2)):

    emb = [sin(j * omega), cos(j * omega), sin(i * omega), cos(i * omega)]

i.e. the FIRST half of the dimensions encodes the column, the second half the row.
Tokens are row-major: n = i * grid + j.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp


def _omega(dim: int) -> np.ndarray:
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}.")
  quarter = dim // 4
  return 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)


def grid_coordinates(grid: int) -> tuple[np.ndarray, np.ndarray]:
  """(column, row) float64 coordinates of the grid*grid patches, each (L,), row-major."""
  n = np.arange(grid * grid)
  return (n % grid).astype(np.float64), (n // grid).astype(np.float64)


def sincos_from_coords(cols, rows, dim: int):
  """Differentiable sin-cos embedding of continuous coordinates.

  Args:
    cols, rows: (..., L) column and row coordinates (any float dtype).
    dim: embedding width, divisible by 4.
  Returns:
    (..., L, dim) in the coordinates' dtype.
  """
  cols = jnp.asarray(cols)
  rows = jnp.asarray(rows)
  omega = jnp.asarray(_omega(dim), cols.dtype)
  oc = cols[..., None] * omega
  orow = rows[..., None] * omega
  return jnp.concatenate([jnp.sin(oc), jnp.cos(oc), jnp.sin(orow), jnp.cos(orow)], axis=-1)


def sincos_table(grid: int, dim: int, cls_token: bool = True) -> np.ndarray:
  """Fixed (1+L, dim) float64 numpy table; row 0 is the all-zero cls row when cls_token."""
  omega = _omega(dim)
  cols, rows = grid_coordinates(grid)
  oc = cols[:, None] * omega
  orow = rows[:, None] * omega
  table = np.concatenate([np.sin(oc), np.cos(oc), np.sin(orow), np.cos(orow)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table


def resize_table(table: np.ndarray, new_grid: int) -> np.ndarray:
  """Bicubically resize a (1+G*G, D) table to (1+new_grid**2, D), keeping the cls row.

  Faithful to the original's fine-tune `interpolate_pos_embed` (torch F.interpolate,
  bicubic, align_corners=False, A = -0.75, border clamping) -- spec 6 and 9.12.  This is
  NOT the same as jax.image.resize('bicubic') (Keys A = -0.5), so it is done in numpy.
  """
  table = np.asarray(table, np.float64)
  old = int(round(np.sqrt(table.shape[0] - 1)))
  if old * old + 1 != table.shape[0]:
    raise ValueError(f"position table with {table.shape[0]} rows is not 1 + a square grid.")
  grid = table[1:].reshape(old, old, -1)
  m = _torch_bicubic_matrix(old, new_grid)
  out = np.einsum("ai,bj,ijd->abd", m, m, grid)
  return np.concatenate([table[:1], out.reshape(new_grid * new_grid, -1)], axis=0)


def _torch_bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """(n_out, n_in) interpolation matrix of torch's bicubic, align_corners=False."""

  def cubic(x):
    x = abs(x)
    if x <= 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
      return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0

  m = np.zeros((n_out, n_in))
  scale = n_in / n_out
  for o in range(n_out):
    src = (o + 0.5) * scale - 0.5
    base = int(np.floor(src))
    t = src - base
    for k in range(-1, 3):
      idx = min(max(base + k, 0), n_in - 1)
      m[o, idx] += cubic(k - t)
  return m
