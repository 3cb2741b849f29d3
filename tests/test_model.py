"""MAE+ model: masking, loss, parameter count, MAE path -- against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adpe_jax import defaults, parallel
from adpe_jax.models import MAEPlus, model_kwargs, norm_pix_loss, patchify, unpatchify
from adpe_jax.models.mae import mask_from_noise, num_kept
from adpe_jax.train.state import build_model, init_params


def smoke_config(**model):
  c = defaults.apply_smoke(defaults.base_config())
  for k, v in model.items():
    c.model[k] = v
  return c


@pytest.fixture(scope="module")
def fmnist_images():
  """16 real Fashion-MNIST images, normalised, grey repeated to 3 channels, NHWC."""
  from adpe_jax import data
  images, _ = data.labelled_arrays(data.get_source("fashion_mnist", "test"), 28, max_examples=16)
  return images


def test_num_kept_is_floor():
  assert num_kept(49, 0.75) == 12      # spec 9.11: 37 of 49 masked
  assert num_kept(196, 0.75) == 49
  assert num_kept(64, 0.75) == 16


def test_mask_from_noise_is_argsort_split():
  rng = np.random.default_rng(0)
  noise = rng.random((6, 49)).astype(np.float32)
  mask, ids_shuffle = mask_from_noise(jnp.asarray(noise), 12)
  mask = np.asarray(mask)
  for n in range(6):
    order = np.argsort(noise[n], kind="stable")
    expect = np.ones(49, bool)
    expect[order[:12]] = False
    np.testing.assert_array_equal(mask[n], expect)
    np.testing.assert_array_equal(np.asarray(ids_shuffle[n]), order)


def test_masks_exact_count_and_differ_across_samples_and_devices(fmnist_images):
  c = smoke_config()
  model = build_model(c)
  params = init_params(model, jax.random.key(0))
  mesh = parallel.make_mesh()
  assert mesh.size == 4
  # The same image repeated on every device: any mask equality would come from the RNG.
  images = np.repeat(fmnist_images[:1], 8, axis=0)
  images = jax.device_put(images, parallel.batch_sharding(mesh))
  fn = jax.jit(lambda p, x, k: model.apply({"params": p}, x, rngs={"masking": k})[2])
  mask = np.asarray(fn(params, images, jax.random.key(3)))
  assert mask.shape == (8, 49)
  np.testing.assert_array_equal(mask.sum(1), 37)
  rows = {tuple(r) for r in mask.astype(int)}
  assert len(rows) == 8  # every sample (two per device) has its own mask
  # Same key, one device: the same global masks (noise drawn at global batch shape).
  mask1 = np.asarray(fn(params, jax.device_put(np.asarray(images), jax.devices()[0]),
                        jax.random.key(3)))
  np.testing.assert_array_equal(mask, mask1)


def test_noise_defines_mask(fmnist_images):
  c = smoke_config()
  model = build_model(c)
  params = init_params(model, jax.random.key(0))
  noise = np.random.default_rng(1).random((4, 49)).astype(np.float32)
  _, _, mask = model.apply({"params": params}, fmnist_images[:4], noise=noise)
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(mask_from_noise(noise, 12)[0]))


def test_loss_matches_numpy(fmnist_images):
  rng = np.random.default_rng(0)
  images = fmnist_images[:4].astype(np.float64)
  target = patchify(images, 4)
  pred = rng.normal(size=target.shape)
  mask = (rng.random((4, 49)) > 0.3).astype(np.float64)
  # numpy, written out: unbiased variance over the p*p*3 values, eps 1e-6.
  t = np.asarray(target)
  mean = t.mean(-1, keepdims=True)
  var = ((t - mean) ** 2).sum(-1, keepdims=True) / (t.shape[-1] - 1)
  tn = (t - mean) / np.sqrt(var + 1e-6)
  per = ((pred - tn) ** 2).mean(-1)
  expect = (per * mask).sum() / mask.sum()
  with jax.enable_x64(True):
    got = float(norm_pix_loss(jnp.asarray(pred), jnp.asarray(t), jnp.asarray(mask)))
  assert abs(got - expect) < 1e-12 * expect


def test_patchify_order_and_inverse(fmnist_images):
  x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
  p = np.asarray(patchify(x, 4))
  assert p.shape == (2, 4, 48)
  # patch 1 = grid row 0, col 1; element (r, c, ch) = x[n, r, 4 + c, ch]
  np.testing.assert_array_equal(p[0, 1].reshape(4, 4, 3), x[0, 0:4, 4:8])
  np.testing.assert_array_equal(p[1, 2].reshape(4, 4, 3), x[1, 4:8, 0:4])
  np.testing.assert_array_equal(np.asarray(unpatchify(patchify(fmnist_images, 4), 4)),
                                fmnist_images)


def count_mae_plus_params(d, depth, dec_d, dec_depth, patch, mlp_ratio=4):
  """Trainable parameters of the original's MAE+ from spec 2.1/2.2 (pos embeds frozen)."""
  def block(w):
    h = int(w * mlp_ratio)
    return 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (w * h + h) + (h * w + w)
  enc = (3 * patch * patch * d + d) + d + d + depth * block(d) + 2 * d   # patch, cls, mask, norm
  dec = (d * dec_d + dec_d) + dec_depth * block(dec_d) + 2 * dec_d + (dec_d * patch * patch * 3
                                                                       + patch * patch * 3)
  return enc + dec


@pytest.mark.parametrize("variant,patch", [("base", 16), ("large", 16), ("huge", 14)])
def test_parameter_count_equals_original(variant, patch):
  kw = model_kwargs(variant)
  model = MAEPlus(image_size=112, patch_size=patch, **kw)
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  expect = count_mae_plus_params(kw["embed_dim"], kw["depth"], kw["decoder_embed_dim"],
                                 kw["decoder_depth"], patch)
  assert n == expect
  if variant == "base":
    # facebookresearch/mae's mae_vit_base_patch16 has 111,907,840 parameters at 224 px,
    # of which the frozen pos embeds are 197*768 + 197*512 = 252,160: 111,655,680
    # trainable.  MAE+ swaps MAE's decoder mask token (512) for an encoder one (768).
    assert n == 111_907_840 - 252_160 - 512 + 768


def test_plain_mae_path_runs_and_masks(fmnist_images):
  c = smoke_config(encoder_sees_mask_tokens=False)
  model = build_model(c)
  params = init_params(model, jax.random.key(0))
  assert "mask_token" not in params and "decoder_mask_token" in params
  (loss, pred, mask), inter = model.apply({"params": params}, fmnist_images[:4],
                                         rngs={"masking": jax.random.key(0)},
                                         mutable=["intermediates"])
  assert inter["intermediates"]["latent"][0].shape == (4, 1 + 12, 32)  # visible tokens only
  assert pred.shape == (4, 49, 48) and np.isfinite(float(loss))
  np.testing.assert_array_equal(np.asarray(mask).sum(1), 37)


def test_features_shape(fmnist_images):
  for pe in ("ape", "rpe"):
    c = smoke_config(pe=pe)
    model = build_model(c)
    params = init_params(model, jax.random.key(0))
    f = model.apply({"params": params}, fmnist_images[:3], method=MAEPlus.features)
    assert f.shape == (3, 32) and np.all(np.isfinite(np.asarray(f)))


def test_bfloat16_compute_keeps_float32_params_and_loss(fmnist_images):
  c32, c16 = smoke_config(pe="rpe"), smoke_config(pe="rpe", dtype="bfloat16")
  m32, m16 = build_model(c32), build_model(c16)
  params = init_params(m32, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(init_params(m16, jax.random.key(0))))
  noise = np.random.default_rng(0).random((8, 49)).astype(np.float32)
  l32, p32, _ = m32.apply({"params": params}, fmnist_images[:8], noise=noise)
  l16, p16, _ = m16.apply({"params": params}, fmnist_images[:8], noise=noise)
  assert p16.dtype == jnp.bfloat16 and l16.dtype == jnp.float32
  assert abs(float(l16) - float(l32)) < 0.02 * float(l32)
