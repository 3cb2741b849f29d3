"""Reconstruction pictures: perfect predictions give the original back, grey masked panel, PNG."""

import jax
import numpy as np
import pytest
from PIL import Image

from adpe_jax.config.pretrain import apply_smoke, base_config
from adpe_jax.models.mae import patchify
from adpe_jax.train import reconstruction as rec
from adpe_jax.train.state import build_model, init_params

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalised_images(n, size, seed=0):
  """Random uint8 images with some structure, ImageNet-normalised, and the uint8 originals."""
  rng = np.random.default_rng(seed)
  raw = rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8)
  raw[:, : size // 2] //= 2  # a darker half so patches differ in mean / std
  raw[0, :4, :4] = 77        # a constant patch: std 0, exercises the eps
  return ((raw.astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32), raw


def perfect_pred(images, patch):
  """The model's target: per-patch normalised pixels (ddof=1, eps 1e-6)."""
  t = patchify(images.astype(np.float64), patch)
  return ((t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True, ddof=1) + 1e-6)
          ).astype(np.float32)


def random_mask(n, l, seed=0):
  return (np.random.default_rng(seed).random((n, l)) < 0.75).astype(np.float32)


def panels(grid, rows, h, w):
  g = grid.reshape(rows, h, 3 * w, 3)
  return g[:, :, :w], g[:, :, w:2 * w], g[:, :, 2 * w:]


@pytest.mark.parametrize("n,size,patch,max_images", [(5, 28, 4, 8), (10, 32, 8, 8), (3, 16, 4, 2)])
def test_perfect_prediction_reconstructs_original(n, size, patch, max_images):
  images, raw = normalised_images(n, size)
  l = (size // patch) ** 2
  mask = random_mask(n, l)
  grid = rec.reconstruction_grid(images, perfect_pred(images, patch), mask, patch, max_images)
  rows = min(n, max_images)
  assert grid.dtype == np.uint8 and grid.shape == (rows * size, 3 * size, 3)
  original, masked, recon = panels(grid, rows, size, size)
  # De-normalisation recovers the uint8 input (up to float rounding).
  assert np.abs(original.astype(int) - raw[:rows]).max() <= 1
  assert np.abs(recon.astype(int) - original.astype(int)).max() <= 1
  # Masked panel: grey exactly on mask == 1 patches, the original elsewhere.
  pm = patchify(masked, patch)
  po = patchify(original, patch)
  m = mask[:rows].astype(bool)
  assert np.all(pm[m] == rec.GREY)
  np.testing.assert_array_equal(pm[~m], po[~m])


def test_wrong_prediction_only_changes_masked_patches():
  images, _ = normalised_images(2, 28)
  mask = random_mask(2, 49, seed=3)
  pred = np.random.default_rng(0).normal(size=(2, 49, 48)).astype(np.float32) * 3
  grid = rec.reconstruction_grid(images, pred, mask, 4)
  original, _, recon = panels(grid, 2, 28, 28)
  po, pr = patchify(original, 4), patchify(recon, 4)
  m = mask.astype(bool)
  np.testing.assert_array_equal(pr[~m], po[~m])
  assert np.abs(pr[m].astype(int) - po[m].astype(int)).mean() > 10


def test_mismatched_shapes_raise():
  images, _ = normalised_images(2, 28)
  with pytest.raises(ValueError):
    rec.reconstruction_grid(images, np.zeros((2, 49, 48)), np.zeros((2, 49)), 7)


def test_png_round_trip(tmp_path):
  images, _ = normalised_images(3, 28)
  grid = rec.reconstruction_grid(images, perfect_pred(images, 4), random_mask(3, 49), 4)
  path = tmp_path / "recon.png"
  rec.save_png(grid, path)
  with Image.open(path) as im:
    assert im.format == "PNG" and im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), grid)
  with pytest.raises(ValueError):
    rec.save_png(grid.astype(np.float32), tmp_path / "bad.png")


def test_pixel_predictions_are_shown_as_they_are():
  """norm_pix=False (model.norm_pix_loss=False): a prediction equal to the pixels of the
  patches gives the original back, with no per-patch de-normalisation."""
  images, raw = normalised_images(3, 28)
  mask = random_mask(3, 49)
  grid = rec.reconstruction_grid(images, patchify(images, 4), mask, 4, norm_pix=False)
  original, _, recon = panels(grid, 3, 28, 28)
  assert np.abs(recon.astype(int) - raw).max() <= 1
  # The same pixels read as normalised-patch units would be de-normalised: not the original.
  wrong = rec.reconstruction_grid(images, patchify(images, 4), mask, 4)
  assert np.abs(panels(wrong, 3, 28, 28)[2].astype(int) - raw).max() > 50


def test_reconstruct_with_smoke_model(tmp_path):
  model = build_model(apply_smoke(base_config()))
  params = jax.jit(init_params, static_argnums=0)(model, jax.random.PRNGKey(0))
  images, _ = normalised_images(4, 28)
  pred, mask = rec.reconstruct(model, params, images, jax.random.PRNGKey(1))
  assert pred.shape == (4, 49, 48) and pred.dtype == np.float32
  assert mask.shape == (4, 49)
  np.testing.assert_array_equal(mask.sum(1), 49 - int(49 * (1 - model.mask_ratio)))
  pred2, mask2 = rec.reconstruct(model, params, images, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(mask, mask2)
  grid = rec.reconstruction_grid(images, pred, mask, model.patch_size, max_images=3)
  assert grid.shape == (3 * 28, 3 * 28, 3)
  rec.save_png(grid, tmp_path / "model.png")
  # Visible patches of the reconstruction are the original's.
  original, _, recon = panels(grid, 3, 28, 28)
  vis = mask[:3] == 0
  np.testing.assert_array_equal(patchify(recon, 4)[vis], patchify(original, 4)[vis])
