"""Whole labelled splits as arrays, with the deterministic eval transform (k-NN, linear probes)."""

from __future__ import annotations

import concurrent.futures

import numpy as np
from PIL import Image

from adpe_jax.data import multicrop
from adpe_jax.data.pipeline import default_num_threads


def center_resize(image: np.ndarray, image_size: int, crop_fraction: float = 1.0) -> np.ndarray:
  """uint8 (H, W, C) -> uint8 (image_size, image_size, C).

  torchvision's eval transform: Resize(round-down image_size / crop_fraction) of the shorter side,
  bicubic, then CenterCrop(image_size). crop_fraction 0.875 is the fine-tune eval (256 -> 224);
  1.0 (default) resizes the shorter side straight to image_size. An image already at the target
  size is returned unchanged.
  """
  height, width = image.shape[:2]
  short_size = int(image_size / crop_fraction)
  if (height, width) == (image_size, image_size) and short_size == image_size:
    return image
  # torchvision Resize(int): the shorter side becomes short_size, the longer keeps the aspect
  # (rounded down).
  if height <= width:
    new_h, new_w = short_size, int(short_size * width / height)
  else:
    new_h, new_w = int(short_size * height / width), short_size
  grey = image.shape[2] == 1
  pil = Image.fromarray(np.ascontiguousarray(image[:, :, 0] if grey else image))
  if (new_h, new_w) != (height, width):
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
  # torchvision CenterCrop offsets.
  top = int(round((new_h - image_size) / 2.0))
  left = int(round((new_w - image_size) / 2.0))
  out = np.asarray(pil)[top:top + image_size, left:left + image_size]
  return out[:, :, None] if grey else out


def labelled_arrays(source, image_size: int, max_examples: int | None = None,
                    crop_fraction: float = 1.0,
                    num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The first `max_examples` (default all) examples of `source`, eval-transformed.

  Returns:
    images: float32 (N, image_size, image_size, 3), ImageNet-normalised, grey repeated to 3
      channels.
    labels: int32 (N,).
  """
  n = len(source) if max_examples is None else min(max_examples, len(source))
  images = np.empty((n, image_size, image_size, 3), np.float32)
  labels = np.empty((n,), np.int32)
  source_images = getattr(source, "images", None)
  if (isinstance(source_images, np.ndarray) and source_images.ndim in (3, 4)
      and source_images.shape[1:3] == (image_size, image_size) and crop_fraction == 1.0):
    # Fast path (e.g. Fashion-MNIST at its own size): nothing to resize.
    arrays = source_images[:n, :, :, None] if source_images.ndim == 3 else source_images[:n]
    multicrop.normalize(np.ascontiguousarray(arrays), images)
    labels[:] = source.labels[:n]
    return images, labels

  def fill(rows: range) -> None:
    crops = np.empty((len(rows), image_size, image_size, 3), np.uint8)
    for j, i in enumerate(rows):
      image, labels[i] = source[i]
      crops[j] = center_resize(image, image_size, crop_fraction)
    multicrop.normalize(crops, images[rows.start:rows.stop])

  num_threads = num_threads or default_num_threads()
  chunk = 256
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    futures = [pool.submit(fill, range(lo, min(lo + chunk, n))) for lo in range(0, n, chunk)]
    for future in futures:
      future.result()
  return images, labels
