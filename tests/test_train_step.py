"""The compiled train step: accumulation, 1-vs-4 devices, schedule and decay mask."""

import math

import jax
import numpy as np
import optax
import pytest

from adpe_jax import defaults, parallel
from adpe_jax.train import optimizer as optim
from adpe_jax.train.pretrain import build_training
from adpe_jax.train.state import build_model, create_train_state
from adpe_jax.train.step import make_train_step


def smoke_config():
  c = defaults.apply_smoke(defaults.base_config())
  c.blr = 1.5e-2  # large enough that a few steps move the loss visibly
  return c


@pytest.fixture(scope="module")
def fmnist_batches():
  """Three real multi-crop batches (2 crops x 8 Fashion-MNIST images) from the pipeline."""
  from adpe_jax import data
  c = smoke_config()
  pipe = data.PretrainPipeline(data.get_source("fashion_mnist", "train"), c.batch_size,
                               c.image_size, c.num_crops, seed=0, num_threads=2)
  batches = [pipe.get_batch(s) for s in range(3)]
  pipe.close()
  return batches


def test_accumulation_equals_one_large_batch(fmnist_batches):
  c = smoke_config()
  model = build_model(c)
  # Plain SGD with lr 1 makes the update the gradient itself (Adam's normalisation would
  # amplify round-off of near-zero gradient entries into O(lr) differences).
  tx = optax.sgd(1.0)
  noise = np.random.default_rng(0).random((16, 49)).astype(np.float32)
  batch = dict(fmnist_batches[0], noise=noise)
  key = jax.random.key(0)
  results = []
  for accum in (1, 4):
    state = create_train_state(model, tx, jax.random.key(1))
    step = jax.jit(make_train_step(model, tx, accum))
    for _ in range(2):
      state, metrics = step(state, batch, key)
    results.append((state, metrics))
  (s1, m1), (s4, m4) = results
  assert abs(float(m1["loss"]) - float(m4["loss"])) < 1e-5
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def _trajectory(config, mesh, batches):
  setup = build_training(config, mesh, total_steps=10, steps_per_epoch=5)
  state, step, key = setup["state"], setup["train_step"], setup["step_key"]
  losses = []
  for b in batches:
    state, m = step(state, parallel.global_batch(b, mesh), key)
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state.params)


def test_same_seed_same_trajectory_on_1_and_4_devices(fmnist_batches):
  c = smoke_config()
  c.accum_steps = 2
  l1, p1 = _trajectory(c, parallel.make_mesh(jax.devices()[:1]), fmnist_batches)
  l4, p4 = _trajectory(c, parallel.make_mesh(jax.devices()[:4]), fmnist_batches)
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  assert l1[-1] < l1[0]
  flat1 = jax.tree_util.tree_leaves_with_path(p1)
  flat4 = dict(jax.tree_util.tree_leaves_with_path(p4))
  for path, a in flat1:
    b = flat4[path]
    if jax.tree_util.keystr(path).endswith("['qkv']['bias']"):
      # The key bias has an exactly-zero gradient (softmax is shift-invariant per row);
      # Adam turns the round-off in it into O(lr) steps of either sign, so skip it.
      d = a.shape[0] // 3
      a, b = np.r_[a[:d], a[2 * d:]], np.r_[b[:d], b[2 * d:]]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_schedule_matches_original_formula():
  # The original: lr set per micro-step at t = it / iters_per_epoch (epochs); the optimizer
  # steps at micro-step accum-1 of each group (spec 3, Schedule).
  peak, min_lr, warm_epochs, epochs, iters, accum = 2.4e-3, 1e-5, 2, 10, 8, 4
  fn = optim.warmup_cosine(peak, min_lr, warm_epochs * iters / accum, epochs * iters / accum, accum)
  for s in range(0, epochs * iters // accum):
    it = s * accum + accum - 1
    t = it / iters
    if t < warm_epochs:
      expect = peak * t / warm_epochs
    else:
      expect = min_lr + (peak - min_lr) * 0.5 * (
          1 + math.cos(math.pi * (t - warm_epochs) / (epochs - warm_epochs)))
    assert abs(float(fn(s)) - expect) < 1e-6 * peak, s


def test_lr_scaling_counts_images():
  assert optim.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_decay_mask_follows_original_groups():
  c = smoke_config()
  c.model.pe = "rpe"
  model = build_model(c)
  params = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "masking": jax.random.key(0)},
      np.zeros((1, 28, 28, 3), np.float32))["params"])
  mask = optim.decay_mask(params)
  assert mask["cls_token"] and mask["mask_token"]          # 3-D: decayed (spec 9.14)
  assert mask["blocks_0"]["attn"]["qkv"]["kernel"]
  assert mask["blocks_0"]["attn"]["rpe_k"]["lookup_table"]  # RPE tables decayed
  assert not mask["blocks_0"]["attn"]["qkv"]["bias"]
  assert not mask["norm"]["scale"] and not mask["patch_embed"]["bias"]


def test_adamw_matches_torch_formula():
  """One AdamW step vs the torch AdamW update written out (decoupled decay first)."""
  c = smoke_config()
  tx = optax.adamw(0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05)
  p = {"w": np.array([1.0, -2.0], np.float32)}
  g = {"w": np.array([0.5, 0.25], np.float32)}
  upd, _ = tx.update(g, tx.init(p), p)
  new = optax.apply_updates(p, upd)["w"]
  m = 0.1 * g["w"] / (1 - 0.9)
  v = 0.05 * g["w"] ** 2 / (1 - 0.95)
  expect = p["w"] * (1 - 0.1 * 0.05) - 0.1 * m / (np.sqrt(v) + 1e-8)
  np.testing.assert_allclose(np.asarray(new), expect, rtol=1e-6)
  del c
