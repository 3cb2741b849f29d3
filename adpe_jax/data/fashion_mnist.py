"""Fashion-MNIST from the IDX files that Debian's `dataset-fashion-mnist` installs.

tfds' own `fashion_mnist` builder rejects these files (Debian re-gzips them, so the checksums
differ), so we parse the IDX format directly: a header `00 00 <dtype> <ndim>`, `ndim`
big-endian uint32 dimensions, then the raw big-endian data.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from adpe_jax.errors import DataError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# IDX type byte -> numpy dtype (big-endian where multi-byte).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot")


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (gzipped if the name ends in .gz) as an array of its shape and dtype."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    raise DataError(f"IDX file {path} does not exist.") from None
  except (OSError, EOFError) as e:
    raise DataError(f"IDX file {path} could not be read ({e}).") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise DataError(f"IDX file {path} has no valid IDX header (got magic bytes {raw[:4].hex()}).")
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  ndim = raw[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(raw) != expected:
    raise DataError(
        f"IDX file {path} holds {len(raw)} bytes but its header {shape} implies {expected}.")
  data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
  return data.astype(dtype.newbyteorder("="), copy=True)


class FashionMnistSource:
  """Random-access Fashion-MNIST split: `source[i] -> (uint8 (28, 28, 1), int label)`.

  Attributes:
    images: uint8 (N, 28, 28), the whole split in memory (47 MB for train).
    labels: int64 (N,), values 0..9.
  """

  num_classes = 10
  class_names = CLASS_NAMES

  def __init__(self, split: str = "train", data_dir: str | None = None):
    if split not in _FILES:
      raise DataError(f"Fashion-MNIST has splits {sorted(_FILES)}, not {split!r}.")
    data_dir = data_dir or DEFAULT_DIR
    paths = [os.path.join(data_dir, name) for name in _FILES[split]]
    for path in paths:
      if not os.path.isfile(path):
        raise DataError(
            f"Fashion-MNIST file {path} is missing: run `apt-get install dataset-fashion-mnist` "
            f"or put the four *-ubyte.gz files in {data_dir} (or pass another data_dir).")
    self.split = split
    self.data_dir = data_dir
    self.images = read_idx(paths[0])
    self.labels = read_idx(paths[1]).astype(np.int64)
    if self.images.ndim != 3 or self.labels.shape != self.images.shape[:1]:
      raise DataError(f"Fashion-MNIST files in {data_dir} disagree: images {self.images.shape}, "
                      f"labels {self.labels.shape}.")

  def __len__(self) -> int:
    return self.images.shape[0]

  def identity(self) -> dict:
    """`adpe_jax.data.identity`: the split, its count and the class names."""
    return {"kind": "fashion_mnist", "split": self.split, "examples": len(self),
            "classes": list(self.class_names)}

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.images[index, :, :, None], int(self.labels[index])
