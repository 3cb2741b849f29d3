"""The four adversaries: gradients vs finite differences, ascent vs descent, projection,
the faithful no-op, FLOPs of the simultaneous step, and every seed config training."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from adpe_jax import adversary as adv_lib
from adpe_jax import defaults
from adpe_jax.train import optimizer as optim
from adpe_jax.train.pretrain import train_and_evaluate
from adpe_jax.train.state import build_model, create_train_state, init_params
from adpe_jax.train.step import make_adversary_gap, make_train_step, pgd_inner_ascent

ROOT = pathlib.Path(__file__).resolve().parent.parent
KINDS = [("ape", "embedding", "faithful"), ("ape", "coordinate", "faithful"),
         ("rpe", "embedding", "per_bucket"), ("rpe", "coordinate", "faithful")]


def config_for(pe, kind, rpe_embedding="per_bucket", norm="none", eps=1.0):
  c = defaults.apply_smoke(defaults.base_config())
  c.model.pe, c.adversary.kind, c.adversary.rpe_embedding = pe, kind, rpe_embedding
  c.adversary.norm, c.adversary.eps = norm, eps
  return c


@pytest.fixture(scope="module")
def images():
  from adpe_jax import data
  x, _ = data.labelled_arrays(data.get_source("fashion_mnist", "test"), 28, max_examples=8)
  return x


def randomised_params(model, seed=0, dtype=np.float32):
  """Init params with every zero-initialised tensor (RPE tables, adversaries) randomised."""
  params = init_params(model, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.device_get(params))
  for k, v in flat.items():
    v = np.asarray(v, dtype)
    if k[-1] in ("lookup_table", "adv_table", "adv_token", "adv_shift"):
      v = rng.normal(0, 0.3, v.shape).astype(dtype)
    flat[k] = v
  return traverse_util.unflatten_dict(flat)


def loss_at(model, params, images, noise):
  return model.apply({"params": params}, images, noise=noise)[0]


@pytest.mark.parametrize("pe,kind,emb", KINDS)
def test_adversary_gradient_equals_finite_difference(pe, kind, emb, images):
  with jax.enable_x64(True):
    model = build_model(config_for(pe, kind, emb))
    params = randomised_params(model, dtype=np.float64)
    x = images[:4].astype(np.float64)
    noise = np.random.default_rng(1).random((4, 49)).astype(np.float32)
    adv, flat = {}, traverse_util.flatten_dict(params)
    adv = {k: v for k, v in flat.items() if adv_lib.is_adversary_path(k)}
    assert adv, "variant has no adversary"

    def f(a):
      merged = dict(flat)
      merged.update(a)
      return loss_at(model, traverse_util.unflatten_dict(merged), x, noise)

    g = jax.jit(jax.grad(f))(adv)
    rng = np.random.default_rng(2)
    direction = {k: rng.normal(size=v.shape) for k, v in adv.items()}
    h = 1e-5
    plus = {k: adv[k] + h * direction[k] for k in adv}
    minus = {k: adv[k] - h * direction[k] for k in adv}
    fd = (float(f(plus)) - float(f(minus))) / (2 * h)
    analytic = sum(float(np.sum(np.asarray(g[k]) * direction[k])) for k in adv)
    assert abs(analytic) > 1e-6
    assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic)), (fd, analytic)


def test_faithful_rpe_embedding_is_a_no_op_and_per_bucket_is_not(images):
  with jax.enable_x64(True):
    x = images[:4].astype(np.float64)
    noise = np.random.default_rng(1).random((4, 49)).astype(np.float32)
    norms = {}
    for emb in ("faithful", "per_bucket"):
      model = build_model(config_for("rpe", "embedding", emb))
      params = randomised_params(model, dtype=np.float64)
      g = jax.grad(lambda p: loss_at(model, p, x, noise))(params)
      norms[emb] = max(float(np.max(np.abs(v))) for v in adv_lib.adversary_leaves(g).values())
    assert norms["faithful"] < 1e-13
    assert norms["per_bucket"] > 1e-4


@pytest.mark.parametrize("pe,kind,emb", KINDS)
def test_adversary_step_raises_loss_model_step_lowers_it(pe, kind, emb, images):
  c = config_for(pe, kind, emb)
  c.blr = c.adversary.lr = 0.05
  c.warmup_epochs = 0.0
  model = build_model(c)
  params = randomised_params(model)
  tx = optim.make_optimizer(c, total_steps=100, steps_per_epoch=10)
  state = create_train_state(model, tx, jax.random.key(0)).replace(params=params)
  state = state.replace(opt_state=tx.init(params))
  noise = np.random.default_rng(3).random((8, 49)).astype(np.float32)
  batch = {"images": images, "noise": noise}
  new, _ = jax.jit(make_train_step(model, tx, 1))(state, batch, jax.random.key(0))
  old_flat = traverse_util.flatten_dict(params)
  new_flat = traverse_util.flatten_dict(jax.device_get(new.params))
  adv_only = traverse_util.unflatten_dict(
      {k: new_flat[k] if adv_lib.is_adversary_path(k) else v for k, v in old_flat.items()})
  model_only = traverse_util.unflatten_dict(
      {k: v if adv_lib.is_adversary_path(k) else new_flat[k] for k, v in old_flat.items()})
  l0 = float(loss_at(model, params, images, noise))
  assert float(loss_at(model, adv_only, images, noise)) > l0
  assert float(loss_at(model, model_only, images, noise)) < l0


@pytest.mark.parametrize("pe,kind,emb,norm,eps", [k + ("l2", 0.05) for k in KINDS] + [
    ("ape", "embedding", "faithful", "linf", 0.02), ("rpe", "coordinate", "faithful", "linf", 0.02)])
def test_projection_holds_after_every_update(pe, kind, emb, norm, eps, images):
  c = config_for(pe, kind, emb, norm=norm, eps=eps)
  c.adversary.lr = 0.5
  c.warmup_epochs = 0.0
  model = build_model(c)
  tx = optim.make_optimizer(c, total_steps=100, steps_per_epoch=10)
  # Natural init: RPE tables and adversaries start at exactly zero (spec 9.4: the
  # original's L2 projection turns the zero RPE-coordinate adversary into NaN).
  state = create_train_state(model, tx, jax.random.key(0))
  step = jax.jit(make_train_step(model, tx, 1))
  for i in range(4):
    state, _ = step(state, {"images": images}, jax.random.key(i))
    for name, v in adv_lib.adversary_leaves(state.params).items():
      v = np.asarray(v)
      assert np.all(np.isfinite(v)), (name, i)
      size = np.linalg.norm(v) if norm == "l2" else np.max(np.abs(v))
      assert size <= eps * (1 + 1e-5), (name, i, size)


def test_l2_projection_of_zero_is_zero_not_nan():
  z = {"adv_shift": jnp.zeros(2)}
  out = adv_lib.project(z, "l2", 1.0)
  np.testing.assert_array_equal(np.asarray(out["adv_shift"]), 0.0)
  v = {"adv_token": jnp.array([3.0, 4.0])}
  np.testing.assert_allclose(np.asarray(adv_lib.project(v, "l2", 1.0)["adv_token"]), [0.6, 0.8])
  np.testing.assert_allclose(np.asarray(adv_lib.project(v, "linf", 3.5)["adv_token"]), [3.0, 3.5])


def test_pgd_inner_ascent_raises_loss_within_ball(images):
  c = config_for("ape", "coordinate", norm="linf", eps=0.5)
  model = build_model(c)
  params = init_params(model, jax.random.key(0))
  noise = np.random.default_rng(3).random((8, 49)).astype(np.float32)
  batch = {"images": images, "noise": noise}

  def loss_fn(p, b, k):
    del k
    return loss_at(model, p, b["images"], b["noise"])

  perturbed = pgd_inner_ascent(loss_fn, params, batch, None, steps=3, norm="linf", eps=0.5,
                               step_size=0.25)
  shift = np.asarray(perturbed["adv_token"])
  assert np.max(np.abs(shift)) <= 0.5 + 1e-6 and np.any(shift != 0)
  assert float(loss_fn(perturbed, batch, None)) > float(loss_fn(params, batch, None))


def test_adversary_gap_is_zero_at_zero_adversary(images):
  model = build_model(config_for("rpe", "coordinate"))
  params = init_params(model, jax.random.key(0))
  gap = make_adversary_gap(model)({**params}, {"images": images}, jax.random.key(0))
  assert float(gap) == 0.0


def _step_flops(pe, kind):
  """Analytic FLOPs of the lowered train step at ViT-B widths (depth 1 + 1)."""
  c = config_for(pe, kind)
  c.model.variant, c.model.patch_size, c.image_size = "base", 16, 112
  model = build_model(c).clone(depth=1, decoder_depth=1)
  tx = optim.make_optimizer(c, total_steps=10, steps_per_epoch=1)
  state = jax.eval_shape(lambda: create_train_state(model, tx, jax.random.key(0)))
  batch = {"images": jax.ShapeDtypeStruct((8, 112, 112, 3), jnp.float32)}
  lowered = jax.jit(make_train_step(model, tx, 1)).lower(state, batch, jax.random.key(0))
  return lowered.cost_analysis()["flops"]


@pytest.mark.parametrize("pe,kind", [("ape", "embedding"), ("ape", "coordinate"),
                                     ("rpe", "embedding"), ("rpe", "coordinate")])
def test_simultaneous_step_costs_no_extra_pass(pe, kind):
  base = _step_flops(pe, "none")
  with_adv = _step_flops(pe, kind)
  assert with_adv <= base * 1.02, (with_adv / base)


def load_config(name, arg):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("vit*.py")))
def test_every_seed_config_trains(name, tmp_path):
  c = load_config(name, "smoke")
  c.total_steps, c.log_every_steps = 4, 2
  out = train_and_evaluate(c, str(tmp_path))
  losses = [r["loss"] for r in out["history"]]
  assert len(losses) == 2 and all(np.isfinite(losses))
  if c.adversary.kind != "none":
    assert any(k.startswith("adv_norm/") for k in out["history"][-1])
