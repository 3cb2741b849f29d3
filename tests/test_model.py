"""MAE+ model: masking, loss, parameter count, MAE path -- against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adpe_jax import parallel
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.models.mae import (MAEPlus, mask_from_noise, norm_pix_loss, num_kept, patchify,
                                  unpatchify)
from adpe_jax.models.variants import model_kwargs
from adpe_jax.train.state import build_model, init_params


def smoke_config(**model):
  c = pretrain_config.apply_smoke(pretrain_config.base_config())
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


def test_pixel_loss_without_normalisation_matches_numpy(fmnist_images):
  """model.norm_pix_loss=False: MAE's loss without --norm_pix_loss, the MSE against the
  (ImageNet-normalised) pixels of the masked patches."""
  rng = np.random.default_rng(1)
  t = np.asarray(patchify(fmnist_images[:4].astype(np.float64), 4))
  pred = rng.normal(size=t.shape)
  mask = (rng.random((4, 49)) > 0.3).astype(np.float64)
  expect = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
  with jax.enable_x64(True):
    got = float(norm_pix_loss(jnp.asarray(pred), jnp.asarray(t), jnp.asarray(mask),
                              normalize=False))
  assert abs(got - expect) < 1e-12 * expect


def test_model_norm_pix_loss_false_predicts_pixels(fmnist_images):
  """The model's own flag: its loss is the pixel MSE of its own prediction and mask."""
  from adpe_jax.config.pretrain import apply_smoke, base_config
  from adpe_jax.train.state import build_model, init_params
  c = apply_smoke(base_config())
  c.model.norm_pix_loss = False
  model = build_model(c)
  assert model.norm_pix_loss is False
  images = jnp.asarray(fmnist_images[:4], jnp.float32)
  params = init_params(model, jax.random.key(0))
  loss, pred, mask = model.apply({"params": params}, images, rngs={"masking": jax.random.key(1)})
  t = np.asarray(patchify(np.asarray(images), 4), np.float64)
  m = np.asarray(mask, np.float64)
  expect = (((np.asarray(pred, np.float64) - t) ** 2).mean(-1) * m).sum() / m.sum()
  np.testing.assert_allclose(float(loss), expect, rtol=1e-5)


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


# -- the adversary as its own variable collection ------------------------------------------
ADVERSARY_SHAPES = {
    # (pe, kind, rpe_embedding): {path in "adversary": shape} at the smoke size (D 32, hd 8)
    ("ape", "none", "per_bucket"): {},
    ("ape", "embedding", "per_bucket"): {("adv_token",): (1, 1, 32)},
    ("ape", "coordinate", "per_bucket"): {("adv_token",): (2,)},
    ("rpe", "embedding", "faithful"): {("blocks_0", "attn", "rpe_k", "adv_token"): (8,)},
    ("rpe", "embedding", "per_bucket"): {("blocks_0", "attn", "rpe_k", "adv_table"): (8, 50)},
    ("rpe", "coordinate", "per_bucket"): {("blocks_0", "attn", "rpe_k", "adv_shift"): (2,)},
}


@pytest.mark.parametrize("pe,kind,emb", sorted(ADVERSARY_SHAPES))
def test_init_returns_params_and_adversary_collections(pe, kind, emb):
  from flax import traverse_util
  from adpe_jax.train.state import init_variables
  c = smoke_config(pe=pe)
  c.adversary.kind, c.adversary.rpe_embedding = kind, emb
  model = build_model(c)
  raw = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "masking": jax.random.key(1)},
      jnp.zeros((1, 28, 28, 3))))
  assert set(raw) == ({"params"} if kind == "none" else {"params", "adversary"})
  variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
  adv = traverse_util.flatten_dict(variables["adversary"])
  want = ADVERSARY_SHAPES[(pe, kind, emb)]
  if pe == "rpe" and kind != "none":
    # one per attention layer: 2 encoder + 1 decoder blocks at the smoke size
    layers = {"blocks_0", "blocks_1", "decoder_blocks_0"}
    assert {k[0] for k in adv} == layers
    adv = {k: v for k, v in adv.items() if k[0] == "blocks_0"}
  assert {k: v.shape for k, v in adv.items()} == want
  # No adversary tensor among the params, whatever its name.
  params = traverse_util.flatten_dict(variables["params"])
  assert not any(k[-1] in ("adv_token", "adv_table", "adv_shift") for k in params)
  assert ("mask_token",) in params or (pe, kind) == ("ape", "embedding")


def test_features_need_params_only_and_masked_forward_needs_adversary(fmnist_images):
  from adpe_jax.train.state import init_variables
  for pe in ("ape", "rpe"):
    c = smoke_config(pe=pe)
    c.adversary.kind = "coordinate"
    model = build_model(c)
    variables = jax.jit(init_variables, static_argnums=0)(model, jax.random.key(0))
    f = jax.jit(lambda p, x: model.apply({"params": p}, x, method=MAEPlus.features))(
        variables["params"], fmnist_images[:2])
    assert f.shape == (2, 32)
    with pytest.raises(Exception, match="adversary"):
      jax.eval_shape(lambda p, x: model.apply({"params": p}, x, rngs={"masking": jax.random.key(0)}),
                     variables["params"], fmnist_images[:2])


def test_ape_coordinate_shift_survives_bfloat16():
  """A small shift of masked patches' coordinates must move their sin-cos PE in bf16 too.

  Independent expectation: numpy float64 sin-cos of the shifted coordinates, cast to bf16.
  bf16 coordinates near column 6 are spaced 1/32, so 6 + 0.01 would round back to 6.
  """
  from adpe_jax.models import posembed
  from adpe_jax.models.mae import encoder_input_pe
  grid, dim = 7, 32
  mask = np.zeros((1, grid * grid), bool)
  mask[0, 6] = mask[0, 48] = True                       # (row 0, col 6) and (row 6, col 6)
  shift = jnp.asarray([0.01, -0.01], jnp.float32)
  got = np.asarray(jax.jit(encoder_input_pe, static_argnums=(0, 1, 4))(
      grid, dim, jnp.asarray(mask), shift, jnp.bfloat16).astype(jnp.float32), np.float64)
  cols, rows = posembed.grid_coordinates(grid)
  omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
  def emb(c, r):
    return np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega),
                           np.cos(r * omega)])
  for n in range(grid * grid):
    c, r = cols[n] + 0.01 * mask[0, n], rows[n] - 0.01 * mask[0, n]
    want = np.asarray(jnp.asarray(emb(c, r), jnp.bfloat16).astype(jnp.float32), np.float64)
    np.testing.assert_array_equal(got[0, n], want, err_msg=f"patch {n}")
  unshifted = np.asarray(posembed.sincos_table(grid, dim)[1:])
  assert np.max(np.abs(got[0, 6] - unshifted[6])) > 5e-3   # the shift is visible


def test_gelu_exact_is_the_erf_gelu_in_each_dtype():
  """vit.gelu_exact: float64 = x/2 erfc(-x/sqrt 2) to round-off (the fidelity contract);
  float32 = x/2 (1 + erf(x/sqrt 2)), torch's float32 formula, within its float32 rounding of
  the exact value, and torch's float32 GELU (not the tanh approximation)."""
  import math
  from adpe_jax.models.vit import gelu_exact
  x = np.linspace(-9.0, 9.0, 3601)
  want = np.array([v / 2 * math.erfc(-v / math.sqrt(2)) for v in x])
  with jax.enable_x64(True):
    got64 = np.asarray(jax.jit(gelu_exact)(jnp.asarray(x, jnp.float64)))
  np.testing.assert_allclose(got64, want, rtol=1e-13, atol=1e-300)
  got32 = np.asarray(jax.jit(gelu_exact)(jnp.asarray(x, jnp.float32)), np.float64)
  x32 = x.astype(np.float32).astype(np.float64)
  want32 = np.array([v / 2 * (1 + math.erf(v / math.sqrt(2))) for v in x32])
  # float32 rounding of x/2 (1 + erf): a few ulps of 1 times |x| (1 + erf cancels for x < 0)
  assert np.all(np.abs(got32 - want32) <= 4e-7 * np.maximum(1.0, np.abs(x32)))
  try:
    import torch
  except ImportError:
    return
  t = torch.nn.functional.gelu(torch.from_numpy(x.astype(np.float32))).numpy()
  np.testing.assert_allclose(got32, t, rtol=0, atol=2e-6)
