"""Deterministic random smooth images for smoke runs and throughput measurements (no files)."""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image

_SPLIT_TAGS = {"train": 0, "test": 1, "validation": 2, "val": 2}


class SyntheticSource:
  """`source[i] -> (uint8 (height, width, channels), int label)`, a function of (seed, split, i).

  Each image is a (8, 8) grid of random colours upsampled bilinearly to (height, width), i.e. smooth
  blobs with some structure to reconstruct; the label is random in [0, num_classes).
  """

  def __init__(self, split: str = "train", num_examples: int | None = None, height: int = 64,
               width: int | None = None, channels: int = 3, num_classes: int = 10, seed: int = 0):
    if channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {channels}")
    self.split = split
    if num_examples is None:
      num_examples = 1024 if split == "train" else 256
    self.num_examples = num_examples
    self.height, self.width = int(height), int(width if width is not None else height)
    self.channels = channels
    self.num_classes = num_classes
    self._tag = _SPLIT_TAGS.get(split, zlib.crc32(split.encode()) + 3)
    self._seed = seed

  def __len__(self) -> int:
    return self.num_examples

  def identity(self) -> dict:
    """`adpe_jax.data.identity`: a synthetic source is its size (its seed is config.seed)."""
    return {"kind": "synthetic", "split": self.split, "examples": self.num_examples,
            "classes": self.num_classes, "size": [self.height, self.width, self.channels]}

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    if not 0 <= index < self.num_examples:
      raise IndexError(index)
    seq = np.random.SeedSequence(self._seed, spawn_key=(self._tag, int(index)))
    rng = np.random.default_rng(seq)
    grid = rng.integers(0, 256, size=(8, 8, self.channels), dtype=np.uint8)
    label = int(rng.integers(self.num_classes))
    image = Image.fromarray(grid[..., 0] if self.channels == 1 else grid)
    array = np.asarray(image.resize((self.width, self.height), Image.BILINEAR))
    return array.reshape(self.height, self.width, self.channels), label
