"""The four adversaries: gradients vs finite differences, ascent vs descent, projection,
the faithful no-op, the loss gap, FLOPs of the simultaneous step, and every seed config's
own geometry training."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from adpe_jax import adversary as adv_lib
from adpe_jax import parallel
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.kernels import irpe
from adpe_jax import layout
from adpe_jax.train import optimizer as optim
from adpe_jax.train.pretrain import build_training
from adpe_jax.train.state import build_model, create_train_state, init_variables
from adpe_jax.train.step import make_adversary_gap, make_train_step, pgd_inner_ascent

ROOT = pathlib.Path(__file__).resolve().parent.parent
KINDS = [("ape", "embedding", "faithful"), ("ape", "coordinate", "faithful"),
         ("rpe", "embedding", "per_bucket"), ("rpe", "coordinate", "faithful")]


def config_for(pe, kind, rpe_embedding="per_bucket", norm="none", eps=1.0):
  c = pretrain_config.apply_smoke(pretrain_config.base_config())
  c.model.pe, c.adversary.kind, c.adversary.rpe_embedding = pe, kind, rpe_embedding
  c.adversary.norm, c.adversary.eps = norm, eps
  return c


@pytest.fixture(scope="module")
def images():
  from adpe_jax import data
  x, _ = data.labelled_arrays(data.get_source("fashion_mnist", "test"), 28, max_examples=8)
  return x


def randomised(model, seed=0, dtype=np.float32):
  """(params, adversary) at init with every zero-initialised tensor (RPE tables and
  adversaries) randomised, so no gradient is zero by construction."""
  variables = jax.device_get(jax.jit(init_variables, static_argnums=0)(model, jax.random.key(seed)))
  rng = np.random.default_rng(seed)
  out = []
  for col in ("params", "adversary"):
    flat = traverse_util.flatten_dict(variables[col])
    for k, v in flat.items():
      v = np.asarray(v, dtype)
      if k[-1] == "lookup_table" or col == "adversary":
        v = rng.normal(0, 0.3, v.shape).astype(dtype)
      flat[k] = v
    out.append(traverse_util.unflatten_dict(flat) if flat else {})
  return tuple(out)


def loss_at(model, params, adversary, images, noise):
  return model.apply({"params": params, "adversary": adversary}, images, noise=noise)[0]


@pytest.mark.parametrize("pe,kind,emb", KINDS)
def test_adversary_gradient_equals_finite_difference(pe, kind, emb, images):
  with jax.enable_x64(True):
    model = build_model(config_for(pe, kind, emb))
    params, adv = randomised(model, dtype=np.float64)
    x = images[:4].astype(np.float64)
    noise = np.random.default_rng(1).random((4, 49)).astype(np.float32)
    assert jax.tree.leaves(adv), "variant has no adversary"

    f = jax.jit(lambda a: loss_at(model, params, a, x, noise))
    g = jax.jit(jax.grad(lambda a: loss_at(model, params, a, x, noise)))(adv)
    rng = np.random.default_rng(2)
    direction = jax.tree.map(lambda v: rng.normal(size=v.shape), adv)
    h = 1e-5
    plus = jax.tree.map(lambda a, d: a + h * d, adv, direction)
    minus = jax.tree.map(lambda a, d: a - h * d, adv, direction)
    fd = (float(f(plus)) - float(f(minus))) / (2 * h)
    analytic = sum(float(np.sum(np.asarray(a) * b))
                   for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(direction)))
    assert abs(analytic) > 1e-6
    assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic)), (fd, analytic)


def test_faithful_rpe_embedding_is_a_no_op_and_per_bucket_is_not(images):
  with jax.enable_x64(True):
    x = images[:4].astype(np.float64)
    noise = np.random.default_rng(1).random((4, 49)).astype(np.float32)
    norms = {}
    for emb in ("faithful", "per_bucket"):
      model = build_model(config_for("rpe", "embedding", emb))
      params, adv = randomised(model, dtype=np.float64)
      g = jax.jit(jax.grad(lambda a: loss_at(model, params, a, x, noise)))(adv)
      norms[emb] = max(float(np.max(np.abs(v))) for v in jax.tree.leaves(g))
    assert norms["faithful"] < 1e-13
    assert norms["per_bucket"] > 1e-4


def _state(c, model, params, adversary):
  tx, adv_tx = optim.make_optimizers(c, total_steps=100, steps_per_epoch=10)
  state = create_train_state(model, tx, adv_tx, jax.random.key(0))
  return tx, adv_tx, state.replace(params=params, adversary=adversary,
                                   opt_state=tx.init(params), adv_opt_state=adv_tx.init(adversary))


@pytest.mark.parametrize("pe,kind,emb", KINDS)
def test_adversary_step_raises_loss_model_step_lowers_it(pe, kind, emb, images):
  c = config_for(pe, kind, emb)
  c.blr = c.adversary.lr = 0.05
  c.warmup_epochs = 0.0
  model = build_model(c)
  params, adv = randomised(model)
  tx, adv_tx, state = _state(c, model, params, adv)
  noise = np.random.default_rng(3).random((8, 49)).astype(np.float32)
  batch = {"images": images, "noise": noise}
  new, _ = jax.jit(make_train_step(model, tx, adv_tx, 1))(state, batch, jax.random.key(0))
  loss = jax.jit(lambda p, a: loss_at(model, p, a, images, noise))
  l0 = float(loss(params, adv))
  assert float(loss(params, new.adversary)) > l0     # the adversary ascended
  assert float(loss(new.params, adv)) < l0           # the model descended


@pytest.mark.parametrize("pe,kind,emb,norm,eps", [k + ("l2", 0.05) for k in KINDS] + [
    ("ape", "embedding", "faithful", "linf", 0.02), ("rpe", "coordinate", "faithful", "linf", 0.02)])
def test_projection_holds_after_every_update(pe, kind, emb, norm, eps, images):
  c = config_for(pe, kind, emb, norm=norm, eps=eps)
  c.adversary.lr = 0.5
  c.warmup_epochs = 0.0
  model = build_model(c)
  tx, adv_tx = optim.make_optimizers(c, total_steps=100, steps_per_epoch=10)
  # Natural init: RPE tables and adversaries start at exactly zero (spec 9.4: the
  # original's L2 projection turns the zero RPE-coordinate adversary into NaN).
  state = create_train_state(model, tx, adv_tx, jax.random.key(0))
  step = jax.jit(make_train_step(model, tx, adv_tx, 1))
  for i in range(4):
    state, _ = step(state, {"images": images}, jax.random.key(i))
    for name, v in adv_lib.named_leaves(state.adversary).items():
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


def test_adversary_fractions_are_the_size_over_eps_per_block():
  """adv_frac/<tensor>: |v|_2 / eps under l2, max |v| / eps under linf, per block of a
  scanned stack under the unrolled names; none without a bound."""
  tree = {"blocks": {"attn": {"rpe_k": {"adv_shift": jnp.array([[0.3, 0.4], [0.0, -1.5]])}}},
          "adv_token": jnp.array([3.0, -4.0])}
  l2 = {k: float(v) for k, v in adv_lib.adversary_fractions(tree, "l2", 2.0).items()}
  assert l2 == pytest.approx({"adv_frac/blocks_0/attn/rpe_k/adv_shift": 0.25,
                              "adv_frac/blocks_1/attn/rpe_k/adv_shift": 0.75,
                              "adv_frac/adv_token": 2.5})
  linf = {k: float(v) for k, v in adv_lib.adversary_fractions(tree, "linf", 2.0).items()}
  assert linf == pytest.approx({"adv_frac/blocks_0/attn/rpe_k/adv_shift": 0.2,
                                "adv_frac/blocks_1/attn/rpe_k/adv_shift": 0.75,
                                "adv_frac/adv_token": 2.0})
  assert adv_lib.adversary_fractions(tree, "none", 2.0) == {}


def _config_file(name, arg=None):
  spec = importlib.util.spec_from_file_location(
      name, pathlib.Path(__file__).resolve().parent.parent / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_adversary_budget_is_the_sum_of_its_rate_and_sets_the_demo():
  """The budget against a hand sum of the warmup-cosine schedule; the demo's rate gives
  1.5 eps (the rule configs/demo.py states), the seed recipe's 150 eps."""
  c = _config_file("demo")
  total, per_epoch = c.total_steps, 60000 // c.batch_size
  base = c.adversary.lr * c.batch_size / 256
  warmup = c.warmup_epochs * per_epoch
  expect = 0.0
  for t in range(total):
    u = t + (c.accum_steps - 1) / c.accum_steps   # the original's micro-step position
    expect += (base * u / warmup if u < warmup else
               base * 0.5 * (1 + np.cos(np.pi * (u - warmup) / (total - warmup))))
  got = optim.adversary_budget(c, total, per_epoch)
  assert got == pytest.approx(expect, rel=1e-5)
  assert got / c.adversary.eps == pytest.approx(1.5, rel=1e-3)
  assert optim.adversary_lr_for_budget(c, total, per_epoch, 1.5) == pytest.approx(
      c.adversary.lr, rel=1e-3)
  seed = _config_file("vitb_rpe_coord")
  per_epoch = 1281167 // seed.batch_size
  assert optim.adversary_budget(seed, int(seed.total_epochs * per_epoch), per_epoch) / (
      seed.adversary.eps) == pytest.approx(150, rel=0.01)


def test_pgd_inner_ascent_raises_loss_within_ball(images):
  c = config_for("ape", "coordinate", norm="linf", eps=0.5)
  model = build_model(c)
  variables = jax.jit(init_variables, static_argnums=0)(model, jax.random.key(0))
  params, adv = variables["params"], variables["adversary"]
  noise = np.random.default_rng(3).random((8, 49)).astype(np.float32)
  batch = {"images": images, "noise": noise}

  def loss_fn(p, a, b, k):
    del k
    return loss_at(model, p, a, b["images"], b["noise"])

  perturbed = jax.jit(lambda a: pgd_inner_ascent(loss_fn, params, a, batch, None, steps=3,
                                                 norm="linf", eps=0.5, step_size=0.25))(adv)
  shift = np.asarray(perturbed["adv_token"])
  assert np.max(np.abs(shift)) <= 0.5 + 1e-6 and np.any(shift != 0)
  assert float(loss_fn(params, perturbed, batch, None)) > float(loss_fn(params, adv, batch, None))


def test_adversary_gap_equals_two_explicit_forwards(images):
  """gap = loss(adversary) - loss(zero adversary) with the step's masks; positive for an
  adversary one ascent step away from zero."""
  c = config_for("ape", "coordinate")
  model = build_model(c)
  variables = jax.jit(init_variables, static_argnums=0)(model, jax.random.key(0))
  params, zero = variables["params"], variables["adversary"]
  key = jax.random.key(7)
  mkey = jax.random.fold_in(key, 0)  # the train step's micro-batch-0 masking key

  def explicit(a):  # the masks come from the "masking" rng, as in the train step
    return model.apply({"params": params, "adversary": a}, images,
                       rngs={"masking": mkey})[0]

  g = jax.jit(jax.grad(explicit))(zero)["adv_token"]
  assert float(jnp.linalg.norm(g)) > 0
  adv = {"adv_token": 0.3 * g / jnp.linalg.norm(g)}
  gap = float(jax.jit(make_adversary_gap(model))(params, adv, {"images": images}, key))
  want = float(explicit(adv)) - float(explicit(zero))
  assert gap > 1e-5
  # Two float32 losses near 1 differ in rounding by a few 1e-8 between programs.
  assert gap == pytest.approx(want, rel=1e-5, abs=5e-7)
  # An adversary on the other side lowers the loss: the gap changes sign.
  down = {"adv_token": -adv["adv_token"]}
  assert float(jax.jit(make_adversary_gap(model))(params, down, {"images": images}, key)) < 0


def _step_flops(pe, kind):
  """FLOPs of the lowered train step at ViT-B widths (depth 1 + 1), XLA's count."""
  c = config_for(pe, kind)
  c.model.variant, c.model.patch_size, c.image_size = "base", 16, 112
  model = build_model(c).clone(depth=1, decoder_depth=1)
  tx, adv_tx = optim.make_optimizers(c, total_steps=10, steps_per_epoch=1)
  state = jax.eval_shape(lambda: create_train_state(model, tx, adv_tx, jax.random.key(0)))
  batch = {"images": jax.ShapeDtypeStruct((8, 112, 112, 3), jnp.float32)}
  lowered = jax.jit(make_train_step(model, tx, adv_tx, 1)).lower(state, batch, jax.random.key(0))
  return lowered.cost_analysis()["flops"]


@pytest.mark.parametrize("pe,kind", [("ape", "embedding"), ("ape", "coordinate"),
                                     ("rpe", "embedding"), ("rpe", "coordinate")])
def test_simultaneous_step_costs_no_extra_pass(pe, kind):
  base = _step_flops(pe, "none")
  with_adv = _step_flops(pe, kind)
  assert with_adv <= base * 1.02, (with_adv / base)


# -- every seed config, at its own geometry ---------------------------------------------------
def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


SEED_CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("vit*.py"))


@pytest.fixture(scope="module")
def fmnist_112():
  """8 real Fashion-MNIST images at the seed configs' 112 px (2 crops of 4 images)."""
  from adpe_jax import data
  x, _ = data.labelled_arrays(data.get_source("fashion_mnist", "train"), 112, max_examples=8)
  return x


@pytest.mark.parametrize("name", SEED_CONFIGS)
def test_every_seed_config_geometry_trains(name, fmnist_112):
  """Each seed config's own image size, patch, grid, RPE buckets and adversary, at a tiny
  width: a few steps on a fixed batch (fixed masks) lower the loss and move the adversary."""
  c = load_config(name)
  patch = {"vitb": 16, "vitl": 16, "vith": 14}[name[:4]]
  grid = 112 // patch
  assert (c.image_size, c.model.patch_size) == (112, patch)
  # Shrink only the width / depth (the "test" variant), nothing of the geometry.
  c.model.variant = "test"
  c.batch_size, c.num_crops, c.accum_steps = 4, 2, 2
  c.warmup_epochs = 0.0
  c.blr = c.adversary.lr = 1e-3 * 256 / c.batch_size     # lr 1e-3 for both sides
  mesh = parallel.make_mesh(jax.devices()[:1])
  setup = build_training(c, mesh, total_steps=100, steps_per_epoch=10)
  model, state = setup["model"], setup["state"]
  assert (model.image_size, model.patch_size, model.grid) == (112, patch, grid)
  if c.model.pe == "rpe":
    ids = irpe.bucket_ids(grid)
    assert ids.shape == (1 + grid * grid,) * 2 and len(np.unique(ids)) == irpe.NUM_BUCKETS
    params = layout.to_unrolled(state.params)   # the seed configs scan their blocks
    assert params["blocks_0"]["attn"]["rpe_k"]["lookup_table"].shape == (8, irpe.NUM_BUCKETS)
  has_adv = c.adversary.kind != "none"
  assert bool(jax.tree.leaves(state.adversary)) == has_adv
  noise = np.random.default_rng(0).random((8, grid * grid)).astype(np.float32)
  batch = parallel.global_batch({"images": fmnist_112, "noise": noise}, mesh)
  losses = []
  for _ in range(5):
    state, metrics = setup["train_step"](state, batch, setup["step_key"])
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 1e-3, losses
  if has_adv:
    norms = [float(v) for k, v in metrics.items() if k.startswith("adv_norm/")]
    assert norms and max(norms) > 0, metrics


def test_demo_smoke_runs_end_to_end_with_the_rpe_coordinate_adversary(tmp_path):
  """`make demo`'s config at :smoke size through train_and_evaluate: RPE + coordinate
  adversary, L2 projection, Fashion-MNIST, loss gap and per-layer norms logged,
  reconstructions and k-NN at the end."""
  import json
  from adpe_jax.train.pretrain import train_and_evaluate
  c = load_config("demo", "smoke")
  c.log_every_steps = 5
  out = train_and_evaluate(c, str(tmp_path))
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == "finished" and summary["steps"] == 10
  assert 0.1 < summary["knn_top1"] <= 1.0 and "knn_top1_random_init" in summary
  last = out["history"][-1]
  shifts = {k: v for k, v in last.items() if k.startswith("adv_norm/") and k.endswith("adv_shift")}
  model = build_model(c)
  assert len(shifts) == model.depth + model.decoder_depth    # one per attention layer
  assert all(0.0 <= v <= c.adversary.eps * (1 + 1e-5) for v in shifts.values())
  assert "adv_loss_gap" in last and np.isfinite(last["adv_loss_gap"])
  assert (tmp_path / "reconstructions.png").exists()
