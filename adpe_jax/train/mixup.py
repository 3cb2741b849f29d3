"""timm's Mixup / CutMix (batch mode) with label smoothing, and the soft-target
cross-entropy the fine-tune step minimises (spec 6); the per-step parameters are drawn by
`adpe_jax.data.finetune.mixup_params`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_targets(labels, num_classes: int, smoothing: float):
  """timm one_hot(on = 1 - s + s / K, off = s / K)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mix_batch(images, labels, lam, cutmix, box, num_classes: int, smoothing: float):
  """timm Mixup (batch mode) with given parameters: mixes each row with the flipped batch.

  images (N, H, W, 3), labels (N,) int; lam scalar; cutmix bool scalar; box (4,)
  (yl, yh, xl, xh).  Returns (mixed images, soft targets (N, K)).
  """
  flipped = images[::-1]
  h, w = images.shape[1:3]
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  inside = (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])
  lam_x = jnp.asarray(lam, images.dtype)
  blended = images * lam_x + flipped * (1 - lam_x)
  cut = jnp.where(inside[None, :, :, None], flipped, images)
  mixed = jnp.where(cutmix, cut, blended)
  y = smooth_targets(labels, num_classes, smoothing)
  return mixed, y * lam + y[::-1] * (1 - lam)


def soft_cross_entropy(logits, targets):
  return -(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)).sum(-1)
