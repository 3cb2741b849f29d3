"""Counter-based random numbers in numpy: Threefry-2x32 (20 rounds), the hash behind jax.random.

Every random number of the input pipeline is a pure function of (seed, purpose, epoch,
example index, draw number), computed for a whole batch in a few vectorised numpy operations. A
numpy Generator per example would do the same job but costs 30-60 us to construct (SeedSequence
hashing), which at 28 px is more than the augmentation itself. `threefry2x32` is tested bit for
bit against `jax.extend.random.threefry_2x32` and the Random123 known-answer vectors.
"""

from __future__ import annotations

import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_MASK32 = (1 << 32) - 1


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(key: tuple[int, int], x0, x1) -> tuple[np.ndarray, np.ndarray]:
  """Threefry-2x32-20 of the counter words (x0, x1) under `key`: uint32 arrays, broadcast shape."""
  k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
  ks = (k0, k1, k0 ^ k1 ^ 0x1BD11BDA)
  x0, x1 = np.broadcast_arrays(np.asarray(x0, np.uint32), np.asarray(x1, np.uint32))
  shape = x0.shape
  x0, x1 = x0.reshape(-1).copy(), x1.reshape(-1).copy()  # 1-d: in-place uint32 adds wrap silently.
  x0 += np.uint32(ks[0])
  x1 += np.uint32(ks[1])
  for group in range(5):
    for r in _ROTATIONS[group % 2]:
      x0 += x1
      x1 = _rotl(x1, r)
      x1 ^= x0
    x0 += np.uint32(ks[(group + 1) % 3])
    x1 += np.uint32((ks[(group + 2) % 3] + group + 1) & _MASK32)
  return x0.reshape(shape), x1.reshape(shape)


def fold_in(key: tuple[int, int], *data: int) -> tuple[int, int]:
  """A new key from `key` and non-negative ints (each < 2**32), one Threefry call per int."""
  for d in data:
    if not 0 <= d <= _MASK32:
      raise ValueError(f"fold_in data must be in [0, 2**32), got {d}")
    y0, y1 = threefry2x32(key, np.uint32(0), np.uint32(d))
    key = (int(y0), int(y1))
  return key


def seed_key(seed: int) -> tuple[int, int]:
  """The root key of a non-negative seed below 2**64."""
  if not 0 <= seed < 1 << 64:
    raise ValueError(f"seed must be in [0, 2**64), got {seed}")
  return (seed & _MASK32, seed >> 32)


def uniforms(key: tuple[int, int], rows, num_draws: int) -> np.ndarray:
  """float64 (len(rows), num_draws) in [0, 1), 53 random bits; row r uses counters (rows[r], draw).

  Row values are typically example indices (< 2**32), so each example's numbers do not depend on
  which other examples share its batch.
  """
  rows = np.asarray(rows, np.int64)
  if rows.size and (rows.min() < 0 or rows.max() > _MASK32):
    raise ValueError("uniforms rows must be in [0, 2**32)")
  draws = np.arange(num_draws, dtype=np.uint32)
  hi, lo = threefry2x32(key, rows.astype(np.uint32)[:, None], draws[None, :])
  # genrand_res53: 27 + 26 bits.
  high27 = (hi >> np.uint32(5)).astype(np.float64)
  low26 = (lo >> np.uint32(6)).astype(np.float64)
  return (high27 * 67108864.0 + low26) / 9007199254740992.0
