"""A folder of class sub-folders (ImageNet / torchvision ImageFolder layout), read lazily.

The folder may be local or remote (`gs://...`): it is read through `etils.epath`.

Ordering follows torchvision's `ImageFolder`: classes are the sorted sub-folder names, label = rank;
files are found recursively in sorted order and kept if their extension is an image extension.
A file that does not decode raises `BadImageError` naming it (adpe_jax.data.bad_images says what
the pipelines do with it); one that cannot be read raises a DataError naming it.
"""

from __future__ import annotations

import os

import numpy as np

from adpe_jax import storage
from adpe_jax.data import bad_images, images
from adpe_jax.data.identity import digest
from adpe_jax.errors import BadImageError, DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class FolderSource:
  """`source[i] -> (uint8 (H, W, 3) RGB, int label)` for DIR/<class>/**/<image>.

  If `DIR/<split>` exists it is used (so `folder:/data/imagenet` with split "train" reads
  /data/imagenet/train, the original's `--data_path` convention); otherwise DIR itself is read.
  """

  def __init__(self, root: str, split: str | None = None):
    root = storage.as_path(root)  # a local directory or gs://... (etils.epath)
    if split and (root / split).is_dir():
      root = root / split
    if not root.is_dir():
      raise DataError(f"Image folder {root} does not exist; expected the layout "
                      f"{root}/<class>/<image>.JPEG.")
    self.root = os.fspath(root)
    self.class_names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    self.num_classes = len(self.class_names)
    paths, labels = [], []
    for label, name in enumerate(self.class_names):
      walked = sorted(storage.walk(root / name), key=lambda t: os.fspath(t[0]))
      for dirpath, _, filenames in walked:
        prefix = os.fspath(dirpath).rstrip("/") + "/"  # one epath join per folder, not file
        for filename in sorted(filenames):
          if filename.lower().endswith(IMG_EXTENSIONS):
            paths.append(prefix + filename)
            labels.append(label)
    if not paths:
      raise DataError(f"Image folder {root} holds no images in class sub-folders "
                      f"(expected {root}/<class>/<image> with one of {IMG_EXTENSIONS}).")
    self.paths = paths
    self.labels = np.asarray(labels, np.int64)

  def __len__(self) -> int:
    return len(self.paths)

  def identity(self) -> dict:
    """Count, class names and a digest of the file list relative to the root, in order
    (`adpe_jax.data.identity`; no file is read)."""
    root = self.root.rstrip("/") + "/"
    return {"kind": "folder", "examples": len(self.paths), "classes": list(self.class_names),
            "files": digest(p[len(root):] if p.startswith(root) else p for p in self.paths)}

  def _read(self, index: int) -> bytes:
    path = self.paths[index]
    try:
      return storage.read_bytes(path)
    except OSError as e:
      raise DataError(f"Image file {path} (example {index}) cannot be read ({e.strerror or e}); "
                      f"a read error stops the run in any data.bad_images policy.") from e

  def encoded(self, index: int) -> tuple[bytes, int]:
    """The file's bytes, undecoded (the pipeline's JPEG fast paths, adpe_jax.data.jpeg)."""
    return self._read(index), int(self.labels[index])

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    # RGB as torchvision's default loader (grey, palette and CMYK become RGB; 16-bit scaled).
    path = self.paths[index]
    try:
      array = images.read_image(self._read(index), path)
    except images.UndecodableImageError as e:
      raise BadImageError(path, index, str(e), bad_images.check_command(self)) from None
    return array, int(self.labels[index])
