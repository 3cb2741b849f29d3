"""2-D sin-cos table vs a plain-numpy construction written from the spec (2.2)."""

import math

import numpy as np
import pytest

from adpe_jax.models import posembed


def numpy_sincos(grid, dim):
  """Loop version: emb(n) = [sin(j w), cos(j w), sin(i w), cos(i w)], n = i*grid + j."""
  quarter = dim // 4
  out = np.zeros((1 + grid * grid, dim))
  for i in range(grid):
    for j in range(grid):
      n = i * grid + j
      for k in range(quarter):
        w = 1.0 / 10000 ** (k / quarter)
        out[1 + n, k] = math.sin(j * w)
        out[1 + n, quarter + k] = math.cos(j * w)
        out[1 + n, 2 * quarter + k] = math.sin(i * w)
        out[1 + n, 3 * quarter + k] = math.cos(i * w)
  return out


@pytest.mark.parametrize("grid,dim", [(7, 64), (14, 32), (7, 768)])
def test_table_matches_numpy_loop(grid, dim):
  np.testing.assert_allclose(posembed.sincos_table(grid, dim), numpy_sincos(grid, dim),
                             rtol=0, atol=1e-12)


def test_layout_first_half_is_column():
  t = posembed.sincos_table(7, 64)
  assert np.all(t[0] == 0)  # cls row
  # Patches in the same column (j) share the first half; same row (i) the second half.
  n_a, n_b = 1 + 2 * 7 + 3, 1 + 5 * 7 + 3   # (i=2, j=3) and (i=5, j=3)
  np.testing.assert_array_equal(t[n_a, :32], t[n_b, :32])
  assert not np.allclose(t[n_a, 32:], t[n_b, 32:])
  # Patch (0, 0): sin 0 = 0, cos 0 = 1.
  np.testing.assert_array_equal(t[1], np.r_[np.zeros(16), np.ones(16), np.zeros(16), np.ones(16)])


def test_continuous_coordinates_match_table_and_shift():
  cols, rows = posembed.grid_coordinates(7)
  emb = np.asarray(posembed.sincos_from_coords(cols.astype(np.float32), rows.astype(np.float32), 64))
  np.testing.assert_allclose(emb, posembed.sincos_table(7, 64)[1:], atol=1e-5)
  shifted = np.asarray(posembed.sincos_from_coords(np.float32(0.5), np.float32(-1.25), 64))
  w = 1.0 / 10000 ** (np.arange(16) / 16)
  np.testing.assert_allclose(shifted, np.r_[np.sin(0.5 * w), np.cos(0.5 * w),
                                            np.sin(-1.25 * w), np.cos(-1.25 * w)], atol=1e-6)


def test_resize_table_torch_bicubic_weights():
  # Hand-computed torch bicubic (A=-0.75, align_corners=False) weights for 7 -> 14.
  m = posembed._torch_bicubic_matrix(7, 14)
  np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)
  # Output 1: source (1 + 0.5) * 0.5 - 0.5 = 0.25 -> taps -1, 0, 1, 2 at t = 0.25.
  a, t = -0.75, 0.25
  w = [((a * x - 5 * a) * x + 8 * a) * x - 4 * a if 1 < x < 2 else ((a + 2) * x - (a + 3)) * x * x + 1
       for x in (1 + t, t, 1 - t, 2 - t)]
  expect = np.zeros(7)
  for k, wk in zip((-1, 0, 1, 2), w):
    expect[min(max(k, 0), 6)] += wk
  np.testing.assert_allclose(m[1], expect, atol=1e-12)
  t7 = posembed.sincos_table(7, 32)
  r = posembed.resize_table(t7, 14)
  assert r.shape == (197, 32)
  np.testing.assert_array_equal(r[0], t7[0])
  np.testing.assert_allclose(posembed.resize_table(t7, 7), t7, atol=1e-12)
