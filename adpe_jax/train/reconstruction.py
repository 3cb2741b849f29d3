"""MAE-style reconstruction pictures: [original | masked | reconstruction] per row.

  pred, mask = reconstruct(model, params, images, key, adversary=state.adversary)
  grid = reconstruction_grid(images, pred, mask, patch)        # uint8 (rows*H, 3*W, 3)
  save_png(grid, "recon.png")
  Reconstructions(...)       # the pretraining evaluator "reconstructions" (train/evaluate.py)

`pred` is in normalised-patch units (the norm-pixel loss target), so each predicted
patch is de-normalised with the mean / std (ddof=1, eps 1e-6) of the same patch of the
original image, as MAE's visualisation does; a model trained with
model.norm_pix_loss=False predicts pixel values (`norm_pix=False`), shown as they are.
The reconstruction panel shows visible patches from the original and predicted patches
where mask == 1; the masked panel shows the original with masked patches a flat grey (uint8 128).
"""

from __future__ import annotations

import functools
import io

import jax
import numpy as np
from PIL import Image

from adpe_jax import storage
from adpe_jax.models.mae import MAEPlus, patchify, unpatchify

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
GREY = 128
PATCH_EPS = 1e-6


def denormalize(images) -> np.ndarray:
  """ImageNet-normalised float (..., 3) -> uint8 in [0, 255] (rounded, clipped)."""
  x = np.asarray(images, np.float32) * IMAGENET_STD + IMAGENET_MEAN
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def reconstruction_grid(images, pred, mask, patch: int, max_images: int = 8,
                        norm_pix: bool = True) -> np.ndarray:
  """uint8 (rows*H, 3*W, 3): one row per image, [original, masked, reconstruction].

  images: (N, H, W, 3) ImageNet-normalised; pred: (N, L, p*p*3) normalised-patch
  predictions (norm_pix=False: in the images' units); mask: (N, L), 1 = masked;
  rows = min(N, max_images).
  """
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  rows = min(n, max_images)
  images = images[:rows]
  pred = np.asarray(pred, np.float32)[:rows]
  mask = np.asarray(mask)[:rows] > 0.5
  target = patchify(images, patch)                                   # (R, L, p*p*3)
  if pred.shape != target.shape or mask.shape != target.shape[:2]:
    raise ValueError(f"pred {pred.shape} / mask {mask.shape} do not match the patches "
                     f"{target.shape} of images {images.shape} with patch {patch}")
  if norm_pix:
    mean = target.mean(-1, keepdims=True)
    std = np.sqrt(target.var(-1, keepdims=True, ddof=1) + PATCH_EPS)
    pred = pred * std + mean
  recon = np.where(mask[..., None], pred, target)
  recon = unpatchify(recon, patch, c)

  original = denormalize(images)
  pixel_mask = unpatchify(np.broadcast_to(mask[..., None], target.shape), patch, c)
  masked = np.where(pixel_mask, np.uint8(GREY), original)
  panels = np.concatenate([original, masked, denormalize(recon)], axis=2)  # (R, H, 3W, 3)
  return np.ascontiguousarray(panels.reshape(rows * h, 3 * w, c))


def save_png(array, path) -> None:
  """Writes a uint8 (H, W, 3) or (H, W) array as a PNG (local or gs://..., via epath)."""
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f"expected uint8, got {array.dtype}")
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  storage.write_bytes(path, buffer.getvalue())


@functools.lru_cache(maxsize=None)
def _apply_fn(model: MAEPlus):
  def f(params, adversary, images, key):
    _, pred, mask = model.apply({"params": params, "adversary": adversary}, images,
                                rngs={"masking": key})
    return pred, mask
  return jax.jit(f)


def reconstruct(model: MAEPlus, params, images, key, adversary=None
                ) -> tuple[np.ndarray, np.ndarray]:
  """One masked forward pass: (pred (N, L, p*p*3) float32, mask (N, L) float32) as numpy.

  `adversary`: the "adversary" collection the model trains with (the APE embedding
  adversary is the mask token itself); None = the model has none.
  """
  pred, mask = _apply_fn(model)(params, adversary or {}, np.asarray(images, np.float32), key)
  return np.asarray(pred, np.float32), np.asarray(mask, np.float32)


class Reconstructions:
  """The evaluator "reconstructions" (pretraining): the grid of the first batch's first 8
  crops every eval.recon_every_steps and at the end, also saved as
  WORKDIR/reconstructions.png.  `images() -> (N, H, W, 3) normalised float or None`: the
  crops, taken by the task's step from its first host batch (None before it)."""
  key = ""
  name = "reconstructions"

  def __init__(self, config, model, step_key, workdir, every_steps: int, images):
    self.config, self.model, self.rng, self.workdir = config, model, step_key, workdir
    self.every_steps, self.at_end = every_steps, True
    self.images = images

  def run(self, state, step: int) -> dict:
    del step
    images = self.images()
    if images is None:
      return {}
    pred, mask = reconstruct(self.model, state.params, images, self.rng,
                             adversary=state.adversary)
    grid = reconstruction_grid(images, pred, mask, self.config.model.patch_size,
                               norm_pix=self.config.model.get("norm_pix_loss", True))
    if jax.process_index() == 0:
      zoom = max(1, 112 // self.config.image_size)  # small crops (28 px) enlarged for the eye
      save_png(grid.repeat(zoom, 0).repeat(zoom, 1),
               storage.resolve(self.workdir) / "reconstructions.png")
    return {"reconstructions": np.asarray(grid)}
