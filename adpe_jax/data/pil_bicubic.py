"""Pillow's bicubic resize of uint8 images, vectorised over a batch of differently sized crops.

`Image.resize(size, Image.BICUBIC)` costs ~20 us of call overhead per crop, which dominates at
28 px.
This computes the same result for a whole batch with two batched matmuls. It transcribes Pillow's
`src/libImaging/Resample.c`:
  - separable passes with an 8-bit rounding between them: horizontal then vertical, except that
    Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as many
    pixels as the width (`ImagingResampleInner`); the order changes the rounding, so we follow the
    installed Pillow (the original ran Pillow 8, i.e. always horizontal first; the difference is at
    most one grey level on a few pixels);
  - filter: Keys cubic with a = -0.5 and support 2, widened by the scale factor when downscaling
    (antialiasing);
  - per output pixel, weights at (x + xmin - center + 0.5) / filterscale, normalised to sum 1, then
    converted to fixed point with 22 fractional bits (round half away from zero);
  - out = clip((2**21 + sum(pixel * weight)) >> 22, 0, 255).
The sums are integers below 2**53, so float64 matmul computes them exactly in any order. The result
equals Pillow's bit for bit (tests/test_data.py checks it against Pillow on random crops), provided
Pillow's C code is compiled without fused multiply-add contraction, which is the case for the x86-64
wheels.
"""

from __future__ import annotations

import functools

import numpy as np
import PIL

_PRECISION_BITS = 22  # Pillow: 32 - 8 - 2.
_PILLOW_VERSION = tuple(int(p) for p in PIL.__version__.split(".")[:2] if p.isdigit())


def vertical_pass_first(in_h, in_w, out_h: int, out_w: int) -> np.ndarray:
  """Which crops the installed Pillow resizes vertically first (bool, broadcast shape)."""
  in_h, in_w = np.asarray(in_h), np.asarray(in_w)
  if _PILLOW_VERSION < (13, 0):
    return np.zeros(np.broadcast(in_h, in_w).shape, bool)
  shrink_h = in_h - out_h
  return (shrink_h > 0) & (shrink_h > (in_w - out_w) * 2)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
  """Pillow's bicubic_filter (a = -0.5), same operation order."""
  a = -0.5
  x = np.abs(x)
  inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
  outer = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def resample_matrices(in_sizes: np.ndarray, out_size: int, max_in: int) -> np.ndarray:
  """Fixed-point weights as float64 (n, out_size, max_in): row o of item i resamples a line of
  length in_sizes[i] (columns beyond it are 0) to output pixel o, as Pillow's precompute_coeffs and
  normalize_coeffs_8bpc do."""
  in_sizes = np.asarray(in_sizes, np.int64)
  n = in_sizes.shape[0]
  scale = in_sizes.astype(np.float64)[:, None] / out_size                  # (n, 1)
  filterscale = np.maximum(scale, 1.0)
  support = 2.0 * filterscale
  ss = 1.0 / filterscale
  center = (np.arange(out_size) + 0.5)[None, :] * scale                    # (n, out)
  xmin = np.maximum(np.trunc(center - support + 0.5), 0.0).astype(np.int64)
  xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_sizes[:, None]) - xmin
  ksize = int(np.ceil(support.max())) * 2 + 1 if n else 1
  weights = []
  total = np.zeros((n, out_size))
  for x in range(ksize):  # sequential sum, in Pillow's order.
    w = np.where(x < xmax, _keys_cubic(((x + xmin) - center + 0.5) * ss), 0.0)
    weights.append(w)
    total = total + w
  matrices = np.zeros((n, out_size, max_in))
  rows_n = np.arange(n)[:, None]
  rows_o = np.arange(out_size)[None, :]
  for x, w in enumerate(weights):
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    scaled = w * (1 << _PRECISION_BITS)
    fixed = np.trunc(np.where(w < 0, -0.5 + scaled, 0.5 + scaled))
    valid = x < xmax
    cols = np.where(valid, xmin + x, 0)
    matrices[np.broadcast_to(rows_n, cols.shape)[valid], np.broadcast_to(rows_o, cols.shape)[valid],
             cols[valid]] = fixed[valid]  # distinct x -> distinct columns: plain assignment.
  return matrices


@functools.lru_cache(maxsize=64)
def _matrix_table(out_size: int, max_in: int) -> np.ndarray:
  """resample_matrices for input lengths 0..max_in: (max_in + 1, out_size, max_in), read-only."""
  table = resample_matrices(np.arange(max_in + 1), out_size, max_in)
  table.flags.writeable = False
  return table


def _round_clip8(sums: np.ndarray) -> np.ndarray:
  """In place: clip((sums + 2**21) >> 22, 0, 255), exact for the integer-valued float64 sums."""
  sums += 1 << (_PRECISION_BITS - 1)
  sums *= 1.0 / (1 << _PRECISION_BITS)
  np.floor(sums, out=sums)
  return np.clip(sums, 0, 255, out=sums)


def resize_bicubic(crops: np.ndarray, heights: np.ndarray, widths: np.ndarray, size: int,
                   flip: np.ndarray | None = None) -> np.ndarray:
  """Pillow-exact bicubic resize of crop i = crops[i, :heights[i], :widths[i]] to (size, size).

  Args:
    crops: uint8 (n, max_h, max_w, C); pixels outside each crop's (height, width) are ignored.
    flip: optional bool (n,): mirror these results left-right (done by reversing the weight rows).
  Returns:
    uint8 (n, size, size, C).
  """
  n, max_h, max_w, channels = crops.shape
  heights, widths = np.asarray(heights), np.asarray(widths)
  side = max(max_h, max_w)
  table = _matrix_table(size, side)
  out = np.empty((n, size, size, channels), np.uint8)
  vertical_first = vertical_pass_first(heights, widths, size, size)
  for order in (False, True):
    idx = np.nonzero(vertical_first == order)[0]
    if not idx.size:
      continue
    wx = table[widths[idx], :, :max_w]                                  # (m, size, max_w)
    if flip is not None:
      wx = np.where(flip[idx, None, None], wx[:, ::-1], wx)
    wx = wx.transpose(0, 2, 1)[:, None]                                 # (m, 1, max_w, size)
    wy = table[heights[idx], :, :max_h][:, None]                        # (m, 1, size, max_h)
    x = crops[idx].transpose(0, 3, 1, 2).astype(np.float64)             # (m, C, max_h, max_w)
    if order:
      resized = _round_clip8(_round_clip8(wy @ x) @ wx)
    else:
      resized = _round_clip8(wy @ _round_clip8(x @ wx))
    out[idx] = resized.transpose(0, 2, 3, 1)
  return out
