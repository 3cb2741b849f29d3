"""The random-access `Source` interface and `get_source`, which builds one from a name.

A source is anything with `len(source)` and `source[i] -> (image, label)`, where image is uint8
(H, W, C) with C = 1 (grey) or 3 (RGB) and label an int; `num_classes` is an attribute. The pipeline
only ever asks for single examples by index, from several threads at once.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Protocol

import numpy as np

from adpe_jax import storage
from adpe_jax.data import bad_images
from adpe_jax.errors import DataError
from adpe_jax.data.fashion_mnist import FashionMnistSource
from adpe_jax.data.folder import FolderSource
from adpe_jax.data.synthetic import SyntheticSource


class Source(Protocol):
  num_classes: int | None

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    ...


class ArraySource:
  """An in-memory source: images uint8 (N, H, W) or (N, H, W, C), labels int (N,)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None = None,
               num_classes: int | None = None):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
      raise ValueError(
          f"ArraySource wants uint8 (N, H, W[, C]) images, got {images.dtype} {images.shape}")
    self.images = images
    if labels is None:
      labels = np.zeros(len(images), np.int64)
    self.labels = np.asarray(labels, np.int64)
    if num_classes is None:
      num_classes = int(self.labels.max(initial=0)) + 1
    self.num_classes = num_classes

  def __len__(self) -> int:
    return self.images.shape[0]

  def identity(self) -> dict:
    """`adpe_jax.data.identity`: count, classes and a digest of the labels (in memory)."""
    return {"kind": "arrays", "examples": len(self), "classes": int(self.num_classes),
            "labels": hashlib.sha256(self.labels.tobytes()).hexdigest()[:32]}

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    image = self.images[index]
    return (image[:, :, None] if image.ndim == 2 else image), int(self.labels[index])


def get_source(name: str, split: str = "train", data_dir: str | None = None, **options) -> Source:
  """Builds a source from a name.

  Names:
    "fashion_mnist"            Debian's IDX files in `data_dir`
                               (default /usr/share/datasets/fashion-mnist).
    "folder:<path>"            <path>/<split>/<class>/<img> if that exists,
                               else <path>/<class>/<img>; a relative <path> is taken
                               under `data_dir` when one is given.
    "folder"                   the same with <path> = `data_dir` (config: data.source="folder",
                               data.dir=<path>).
    "prepared:<path>"          a directory written by `python -m adpe_jax.tools.prepare`
                               (ArrayRecord of bounded-side JPEGs); a relative <path> is
                               taken under `data_dir`.
    "tfds:<name>"              tfds dataset (options: manual_dir, download, image_key, label_key);
                               `data_dir` is the tfds data dir.
    "synthetic"                random smooth images; options num_examples, height, width, channels,
    "synthetic:<H>x<W>"        num_classes, seed (the name's size sets height and width).
  """
  kind, _, arg = name.partition(":")
  if kind == "fashion_mnist" and not arg:
    return FashionMnistSource(split, data_dir=data_dir, **options)
  if kind == "folder":
    if not (arg or data_dir):
      raise DataError("Dataset name 'folder' needs a root: use 'folder:<path>' or set the data "
                      "dir (config field data.dir).")
    # A relative <path> is taken under data_dir; an absolute or gs://... one as it is.
    root = arg or data_dir
    if data_dir and arg and not storage.is_remote(arg):
      root = os.fspath(storage.as_path(data_dir) / arg)
    return FolderSource(root, split=split, **options)
  if kind == "prepared" and arg:
    root = arg
    if data_dir and not storage.is_remote(arg):  # an absolute <path> stays as it is
      root = os.fspath(storage.as_path(data_dir) / arg)
    from adpe_jax.data.prepare import PreparedSource  # noqa: PLC0415 (keeps `-m ...prepare` clean)
    return PreparedSource(root)
  if kind == "tfds" and arg:
    # Imported here: keeps tensorflow_datasets out of `import adpe_jax.data`.
    from adpe_jax.data.tfds_source import TfdsSource  # noqa: PLC0415 (tensorflow_datasets)
    return TfdsSource(arg, split=split, data_dir=data_dir, **options)
  if kind == "synthetic":
    if arg:
      match = re.fullmatch(r"(\d+)(?:x(\d+))?", arg)
      if not match:
        raise DataError(
            f"Synthetic source name {name!r} should be 'synthetic' or 'synthetic:<H>x<W>'.")
      options.setdefault("height", int(match.group(1)))
      options.setdefault("width", int(match.group(2) or match.group(1)))
    return SyntheticSource(split, **options)
  raise DataError(f"Unknown dataset name {name!r}; use 'fashion_mnist', 'folder:<path>', "
                  f"'folder' (root in data.dir), 'prepared:<path>', 'tfds:<name>' or "
                  f"'synthetic[:<H>x<W>]'.")


def from_config(config, split: str, name: str | None = None) -> Source:
  """The source `name` (default `config.data.source`) of a task config, split `split`.

  `config.data.dir` belongs to `config.data.source`: another source (e.g. the pretraining
  k-NN's `eval.knn_source`) uses its own default location.  A synthetic source takes its
  size from `data.num_examples` (default 1024), its seed from `config.seed` and, where the
  config has one, `data.num_classes`.
  """
  name = name or config.data.source
  options = {}
  if name.startswith("synthetic"):
    options = dict(num_examples=config.data.get("num_examples", 0) or 1024, seed=config.seed)
    if "num_classes" in config.data:
      options["num_classes"] = config.data.num_classes
  data_dir = (config.data.dir or None) if name == config.data.source else None
  return get_source(name, split, data_dir, **options)


def eval_source(config, split: str, name: str | None = None) -> Source:
  """`from_config(config, split, name)` read through the config's bad-image policy
  (data.bad_images: `adpe_jax.data.bad_images.Substituting`): the eval sets' sources."""
  source = from_config(config, split, name)
  own = (name or config.data.source) == config.data.source
  return bad_images.with_policy(source, config.data, own_source=own)


class Subset:
  """Examples `indices` of a source, itself a source."""

  def __init__(self, source: Source, indices):
    self.source, self.indices = source, indices
    self.num_classes = getattr(source, "num_classes", None)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.source[int(self.indices[i])]


def spread(source: Source, count: int) -> Source:
  """`count` examples of `source` spread evenly over it (example i * len // count, i <
  count), or the whole source when count <= 0 or >= its length: the eval sets' subsets
  (eval.max_examples, eval.knn_*_examples, eval.heldout_examples), so that a split stored
  class by class (an ImageNet-like folder) gives every class its share rather than the
  first classes all of it.  Deterministic: the same examples on every process and run."""
  total = len(source)
  if count <= 0 or count >= total:
    return source
  return Subset(source, np.arange(count, dtype=np.int64) * total // count)
