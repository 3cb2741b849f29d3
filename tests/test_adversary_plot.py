"""The adversary's pictures: pixels where a hand computation puts them."""

from __future__ import annotations

import numpy as np

from adpe_jax.train import adversary_plot as ap


def _is(pixel, color):
  return tuple(int(v) for v in pixel) == tuple(color)


def test_trajectory_draws_each_fraction_at_its_height():
  # One tensor at 0.5 of its bound from step 0 to 100: the panel (x 50..660, y 40..240)
  # spans 0 .. 1.05 (the bound and 5 %), so the line sits at y = 240 - 200 * 0.5 / 1.05.
  records = [{"step": s, "adv_frac/blocks_0/attn/rpe_k/adv_shift": 0.5, "adv_loss_gap": 0.0}
             for s in range(0, 101, 10)]
  img = ap.trajectory(records, width=720)
  y = 240 - 200 * 0.5 / 1.05
  column = img[:, 355]
  rows = [r for r in range(img.shape[0]) if _is(column[r], ap.COLORS[0])]
  assert rows and all(abs(r - y) <= 1.5 for r in rows if r < 250), (rows, y)
  # The dashed bound at 1.0 (y = 240 - 200 / 1.05 = 49.5) and nothing of the colour above it.
  assert not [r for r in rows if r < 100]


def test_displacement_arrow_goes_by_the_shift_in_patch_units():
  # A 3 x 3 grid, cells of 22 px under a 28 px heading, one masked patch (row 1, col 1), RPE
  # order (row, col): a shift of +1 row draws from its centre (16 + 33, 44 + 33) down to
  # (49, 99).
  mask = np.zeros(9, bool)
  mask[4] = True
  img = ap.displacement({"blocks_0/attn/rpe_k/adv_shift": np.array([1.0, 0.0])}, 3, mask,
                        "row_col", cell=22)
  red = ap.COLORS[3]
  assert _is(img[89, 49], red) and _is(img[98, 49], red)     # on the arrow
  assert not _is(img[89, 60], red)                           # beside it
  assert _is(img[44 + 5, 16 + 5], (255, 255, 255))           # an unmasked patch stays white
  assert _is(img[44 + 22 + 3, 16 + 22 + 3], (200, 200, 200))  # the masked one is grey
  # APE order (col, row): the same numbers move it right instead.
  img = ap.displacement({"adv_token": np.array([1.0, 0.0])}, 3, mask, "col_row", cell=22)
  assert _is(img[77, 60], red) and not _is(img[89, 49], red)
