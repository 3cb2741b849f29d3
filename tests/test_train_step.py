"""The compiled train step: accumulation, 1-vs-4 devices, schedule and decay mask."""

import math

import jax
import numpy as np
import optax
import pytest

from adpe_jax import parallel
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.train import optimizer as optim
from adpe_jax.train.pretrain import build_training
from adpe_jax.train.state import build_model, create_train_state
from adpe_jax.train.step import make_train_step


def smoke_config():
  c = pretrain_config.apply_smoke(pretrain_config.base_config())
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
  c.adversary.kind = "coordinate"   # the adversary's gradient is accumulated too
  model = build_model(c)
  # Plain SGD with lr 1 makes the update the gradient itself (Adam's normalisation would
  # amplify round-off of near-zero gradient entries into O(lr) differences).
  tx = optax.sgd(1.0)
  adv_tx = optax.sgd(-100.0)       # ascent; large: the shift's gradient is small
  noise = np.random.default_rng(0).random((16, 49)).astype(np.float32)
  batch = dict(fmnist_batches[0], noise=noise)
  key = jax.random.key(0)
  results = []
  for accum in (1, 4):
    state = create_train_state(model, tx, adv_tx, jax.random.key(1))
    step = jax.jit(make_train_step(model, tx, adv_tx, accum))
    for _ in range(2):
      state, metrics = step(state, batch, key)
    results.append((state, metrics))
  (s1, m1), (s4, m4) = results
  assert abs(float(m1["loss"]) - float(m4["loss"])) < 1e-5
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  shift1, shift4 = np.asarray(s1.adversary["adv_token"]), np.asarray(s4.adversary["adv_token"])
  assert np.all(np.abs(shift1) > 1e-4)
  np.testing.assert_allclose(shift1, shift4, rtol=1e-4, atol=1e-7)


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


def test_optimizers_match_torch_adamw_and_the_original_ascent():
  """Two steps of `make_optimizers` vs the original's update written out: torch AdamW
  (decoupled decay first, bias-corrected moments) with the schedule's lr and the decay
  mask on the model; the original's adv_optimizer (lr -adv_lr, then L2 projection) on the
  adversary."""
  c = smoke_config()
  c.warmup_epochs, c.blr, c.adversary.lr = 1.0, 0.4, 0.8   # peak lr 0.0125, adv 0.025
  c.weight_decay, c.b1, c.b2 = 0.05, 0.9, 0.95
  c.adversary.norm, c.adversary.eps = "l2", 0.02
  tx, adv_tx = optim.make_optimizers(c, total_steps=20, steps_per_epoch=4)
  lr_fn, adv_lr_fn = optim.schedules(c, 20, 4)
  params = {"dense": {"kernel": np.array([[1.0, -2.0], [0.5, 3.0]], np.float32),
                      "bias": np.array([0.3, -0.1], np.float32)}}
  adv = {"adv_shift": np.array([0.01, 0.015], np.float32)}   # |a| 0.018: the ball binds
  grads = [({"dense": {"kernel": np.array([[0.5, 0.25], [-1.0, 2.0]], np.float32),
                       "bias": np.array([0.1, -0.2], np.float32)}},
            {"adv_shift": np.array([0.3, 0.4], np.float32)}),
           ({"dense": {"kernel": np.array([[-0.2, 0.7], [0.1, -0.4]], np.float32),
                       "bias": np.array([0.05, 0.3], np.float32)}},
            {"adv_shift": np.array([-0.1, 0.6], np.float32)})]
  s, a = tx.init(params), adv_tx.init(adv)
  p, q = params, adv
  # the reference, in float64
  ref_p = {k: np.asarray(v, np.float64) for k, v in params["dense"].items()}
  ref_a = np.asarray(adv["adv_shift"], np.float64)
  m = {k: 0.0 for k in ref_p}
  v = {k: 0.0 for k in ref_p}
  ma = va = 0.0
  for t, (g, ga) in enumerate(grads, start=1):
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    ua, a = adv_tx.update(ga, a, q)
    q = optax.apply_updates(q, ua)
    lr, alr = float(lr_fn(t - 1)), float(adv_lr_fn(t - 1))
    assert lr > 0 and alr > 0
    for k in ref_p:
      gk = np.asarray(g["dense"][k], np.float64)
      decay = 0.05 if k == "kernel" else 0.0              # biases are not decayed
      ref_p[k] = ref_p[k] * (1 - lr * decay)
      m[k] = 0.9 * m[k] + 0.1 * gk
      v[k] = 0.95 * v[k] + 0.05 * gk ** 2
      ref_p[k] = ref_p[k] - lr * (m[k] / (1 - 0.9 ** t)) / (
          np.sqrt(v[k] / (1 - 0.95 ** t)) + 1e-8)
      np.testing.assert_allclose(np.asarray(p["dense"][k]), ref_p[k], rtol=2e-6, atol=1e-7)
    gk = np.asarray(ga["adv_shift"], np.float64)
    ma = 0.9 * ma + 0.1 * gk
    va = 0.95 * va + 0.05 * gk ** 2
    ref_a = ref_a + alr * (ma / (1 - 0.9 ** t)) / (np.sqrt(va / (1 - 0.95 ** t)) + 1e-8)
    ref_a = ref_a * min(0.02, np.linalg.norm(ref_a)) / np.linalg.norm(ref_a)
    np.testing.assert_allclose(np.asarray(q["adv_shift"]), ref_a, rtol=2e-6, atol=1e-8)
  assert np.linalg.norm(np.asarray(q["adv_shift"])) == pytest.approx(0.02, rel=1e-5)
