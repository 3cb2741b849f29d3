"""model.scan_blocks: the encoder / decoder blocks as one nn.scan each (issue 11).

The scanned model computes the unrolled one's function (same weights mapped by
`layout.to_scanned`, float64, every adversary kind); the layout conversions are exact
inverses; every per-tensor rule (adversary projection, PGD direction, weight decay, FSDP)
acts per block on stacked tensors; the lowered train loss does not grow with depth;
checkpoints of the scanned model export, convert and initialise a fine-tune as unrolled
ones do, and resuming with the other layout is refused in one sentence.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from adpe_jax import adversary as adv_lib
from adpe_jax import checkpoint, convert, export, parallel, weights
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax import layout
from adpe_jax.models.mae import MAEPlus
from adpe_jax.models.variants import model_kwargs
from adpe_jax.train import optimizer as optim
from adpe_jax.train.state import TrainState, build_model, init_variables
from adpe_jax.train.step import make_loss_fn, make_train_step
from adpe_jax.train.state import build_classifier, init_classifier_params

KINDS = [("ape", "none"), ("ape", "embedding"), ("ape", "coordinate"),
         ("rpe", "none"), ("rpe", "embedding"), ("rpe", "coordinate")]


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _models(pe, adv, **kw):
  kw = dict(image_size=28, patch_size=4, pe=pe, adversary=adv, **model_kwargs("test"), **kw)
  return MAEPlus(**kw), MAEPlus(scan_blocks=True, **kw)


def _live_variables(model, seed=0, dtype=np.float64):
  """Unrolled variables with every tensor non-trivial (RPE tables and adversaries start at
  zero, where some gradients vanish), as host numpy arrays of `dtype`."""
  v = jax.device_get(jax.jit(lambda k: init_variables(model, k))(jax.random.key(seed)))
  rng = np.random.default_rng(seed + 1)
  flat = traverse_util.flatten_dict(v)
  for k, x in flat.items():
    x = np.asarray(x, dtype)
    if k[-1] in ("lookup_table", "adv_shift", "adv_table", "adv_token", "bias"):
      x = x + rng.normal(0, 0.3, x.shape).astype(dtype)
    flat[k] = x
  return {"params": {}, "adversary": {}} | traverse_util.unflatten_dict(flat)


def _batch(n=2, dtype=np.float64, seed=3):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((n, 28, 28, 3)).astype(dtype), rng.random((n, 49)).astype(dtype)


def _assert_trees_close(a, b, rtol, atol=0.0):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert set(fa) == set(fb), set(fa) ^ set(fb)
  for k in fa:
    np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), rtol=rtol, atol=atol,
                               err_msg="/".join(k))


# -- (a) the same function ----------------------------------------------------------------

@pytest.mark.parametrize("pe,adv,remat", [k + ("none",) for k in KINDS]
                         + [("rpe", "coordinate", "block")],
                         ids=[f"{p}-{a}" for p, a in KINDS] + ["rpe-coordinate-remat"])
def test_scanned_model_equals_unrolled(pe, adv, remat, x64):
  """Loss, prediction, latent and the gradients w.r.t. params AND adversary, float64."""
  unrolled, scanned = _models(pe, adv, remat=remat)
  v = _live_variables(unrolled)
  vs = layout.to_scanned(v)
  assert layout.is_scanned(vs["params"]) and "blocks_0" not in vs["params"]
  if pe == "rpe" and adv != "none":
    assert layout.is_scanned(vs["adversary"])
  images, noise = _batch()

  def run(model, variables):
    def loss_fn(params, adversary):
      (loss, pred, _), inter = model.apply({"params": params, "adversary": adversary}, images,
                                           noise=noise, mutable=["intermediates"])
      return loss, (pred, inter["intermediates"]["latent"][0])
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
        variables["params"], variables["adversary"])

  (l0, (p0, z0)), g0 = run(unrolled, v)
  (l1, (p1, z1)), g1 = run(scanned, vs)
  assert p0.dtype == jnp.float64
  np.testing.assert_allclose(l1, l0, rtol=1e-12)
  np.testing.assert_allclose(p1, p0, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(z1, z0, rtol=1e-12, atol=1e-12)
  assert jax.tree.structure(g1) == jax.tree.structure((vs["params"], vs["adversary"]))
  g1 = layout.to_unrolled(g1)
  _assert_trees_close(g1[0], g0[0], rtol=1e-10, atol=1e-12)
  _assert_trees_close(g1[1], g0[1], rtol=1e-10, atol=1e-12)
  # Every gradient is live (a dropped adversary would give zeros on both sides).
  for k, g in traverse_util.flatten_dict({"p": g0[0], "a": g0[1]}).items():
    if k[-1] not in ("adv_token",) or pe == "ape":
      assert np.max(np.abs(g)) > 0, k
  # The frozen-encoder features (params only, no adversary) agree too.
  f0 = jax.jit(lambda p: unrolled.apply({"params": p}, images, method=MAEPlus.features))(v["params"])
  f1 = jax.jit(lambda p: scanned.apply({"params": p}, images, method=MAEPlus.features))(vs["params"])
  np.testing.assert_allclose(f1, f0, rtol=1e-12, atol=1e-12)


def test_scanned_init_has_the_unrolled_shapes_stacked():
  unrolled, scanned = _models("rpe", "coordinate")
  s0 = jax.eval_shape(lambda: init_variables(unrolled, jax.random.key(0)))
  s1 = jax.eval_shape(lambda: init_variables(scanned, jax.random.key(0)))
  want = jax.tree.map(lambda x: (x.shape, x.dtype), layout.to_scanned(s0))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), s1) == want
  flat = traverse_util.flatten_dict(s1)
  assert flat[("adversary", "blocks", "attn", "rpe_k", "adv_shift")].shape == (2, 2)
  assert flat[("adversary", "decoder_blocks", "attn", "rpe_k", "adv_shift")].shape == (1, 2)
  assert flat[("params", "blocks", "attn", "qkv", "kernel")].shape == (2, 32, 96)
  # Each block gets its own random init (split_rngs), as the unrolled blocks do.
  v = jax.jit(lambda k: init_variables(scanned, k))(jax.random.key(0))
  k = np.asarray(v["params"]["blocks"]["attn"]["qkv"]["kernel"])
  assert not np.array_equal(k[0], k[1])


# -- (b) exact inverses ---------------------------------------------------------------------

def test_layout_round_trip_is_exact():
  c = pretrain_config.seed_config("rpe", "coordinate", "smoke")
  c.model.scan_blocks = False
  model = build_model(c)
  v = jax.device_get(init_variables(model, jax.random.key(0)))
  v = jax.tree.map(lambda x: x + np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype), v)
  tx, adv_tx = optim.make_optimizers(c, 30, 32.0)
  # Optimizer states hold the same trees (Adam mu / nu; adamw's decay mask MaskedNodes).
  grads = jax.tree.map(lambda x: 0.1 * x, v["params"])
  opt = tx.update(grads, tx.init(v["params"]), v["params"])[1]
  adv_opt = adv_tx.update(v["adversary"], adv_tx.init(v["adversary"]), v["adversary"])[1]
  tree = {"variables": v, "opt": jax.device_get(opt), "adv_opt": jax.device_get(adv_opt)}
  scanned = layout.to_scanned(tree)
  back = layout.to_unrolled(scanned)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
  # The scanned tree is what the scanned model holds; unrolled trees pass unchanged.
  mu = scanned["opt"][0].mu
  assert mu["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 32, 96)
  np.testing.assert_array_equal(mu["blocks"]["mlp"]["fc1"]["bias"][1],
                                opt[0].mu["blocks_1"]["mlp"]["fc1"]["bias"])
  assert layout.to_unrolled(v) == v
  assert layout.to_scanned(scanned) == scanned
  with pytest.raises(ValueError, match="indices"):
    layout.to_scanned({"blocks_0": {"w": np.zeros(2)}, "blocks_2": {"w": np.zeros(2)}})


# -- per-block rules on stacked tensors -------------------------------------------------------

@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_projection_is_per_block_as_unrolled(norm):
  rng = np.random.default_rng(0)
  # Blocks inside and outside the ball: a projection of the whole stack would shrink
  # the small ones too.
  unrolled = {"adv_token": rng.normal(0, 3, (2,)).astype(np.float32)}
  for i, scale in enumerate((0.1, 5.0, 0.3, 2.0)):
    unrolled[f"blocks_{i}"] = {"attn": {"rpe_k": {
        "adv_shift": rng.normal(0, scale, (2,)).astype(np.float32),
        "adv_table": rng.normal(0, scale, (4, 50)).astype(np.float32)}}}
  unrolled["decoder_blocks_0"] = {"attn": {"rpe_k": {
      "adv_shift": np.array([3.0, -4.0], np.float32)}}}
  want = jax.device_get(adv_lib.project(unrolled, norm, 1.0))
  got = jax.device_get(jax.jit(lambda t: adv_lib.project(t, norm, 1.0))(layout.to_scanned(unrolled)))
  for a, b in zip(jax.tree.leaves(layout.to_unrolled(got)), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
  small = got["blocks"]["attn"]["rpe_k"]["adv_shift"][0]
  np.testing.assert_array_equal(small, unrolled["blocks_0"]["attn"]["rpe_k"]["adv_shift"])
  # Metrics: per block, under the unrolled names, whatever the layout.
  n0, n1 = adv_lib.adversary_norms(unrolled), adv_lib.adversary_norms(layout.to_scanned(unrolled))
  assert set(n0) == set(n1) and "adv_norm/blocks_3/attn/rpe_k/adv_shift" in n1
  for k in n0:
    np.testing.assert_allclose(n1[k], n0[k], rtol=1e-6)


def test_decay_mask_and_fsdp_rule_are_per_block():
  model, scanned = _models("rpe", "coordinate")
  p0 = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))["params"]
  p1 = jax.eval_shape(lambda: init_variables(scanned, jax.random.key(0)))["params"]
  assert optim.decay_mask(p1) == layout.to_scanned(optim.decay_mask(p0))
  assert not optim.decay_mask(p1)["blocks"]["norm1"]["scale"]     # (depth, D): a LN scale
  assert optim.decay_mask(p1)["blocks"]["attn"]["rpe_k"]["lookup_table"]
  # FSDP: one block's rule, the depth axis never sharded (here depth is the largest axis).
  mesh = parallel.make_mesh(jax.devices()[:4], data=1, fsdp=4)
  tree = {"blocks_0": {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32),
                       "b": jax.ShapeDtypeStruct((8,), jnp.float32)}}
  for i in range(1, 64):
    tree[f"blocks_{i}"] = tree["blocks_0"]
  s0 = parallel.state_shardings(mesh, tree, min_size=1)
  s1 = parallel.state_shardings(mesh, layout.to_scanned(tree), min_size=1)
  assert s0["blocks_0"]["w"].spec == P("fsdp", None)
  assert s1["blocks"]["w"].spec == P(None, "fsdp", None)
  assert s1["blocks"]["b"].spec == P(None)
  # The real params: stacked leaves keep their depth axis whole, per-block specs as unrolled.
  want = traverse_util.flatten_dict(parallel.state_shardings(mesh, p0, min_size=2 ** 10))
  got = traverse_util.flatten_dict(parallel.state_shardings(mesh, p1, min_size=2 ** 10))
  assert len(got) < len(want)
  for k, s in got.items():
    if k[0] in layout.PREFIXES:
      w = want[(f"{k[0]}_0",) + k[1:]].spec
      assert s.spec[0] is None and tuple(s.spec[1:]) == tuple(w), (k, s.spec, w)
    else:
      assert s.spec == want[k].spec, k
  assert any("fsdp" in tuple(s.spec) for k, s in got.items() if k[0] == "blocks")


def test_train_step_scanned_equals_unrolled(x64):
  """One full step (accumulation, PGD inner step, AdamW with its decay mask, adversary
  ascent with the L2 projection active): the same new state, block by block."""
  c = pretrain_config.seed_config("rpe", "coordinate", "smoke")
  c.adversary.norm, c.adversary.eps, c.adversary.lr = "l2", 0.05, 1.0
  c.adversary.inner_steps = 1
  c.weight_decay = 0.3
  states, metrics = {}, {}
  for scan in (False, True):
    c.model.scan_blocks = scan
    model = build_model(c)
    tx, adv_tx = optim.make_optimizers(c, 30, 32.0)
    lr_fn, adv_lr_fn = optim.schedules(c, 30, 32.0)
    v = _live_variables(model.clone(scan_blocks=False))
    if scan:
      v = layout.to_scanned(v)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                       adversary=v["adversary"], opt_state=tx.init(v["params"]),
                       adv_opt_state=adv_tx.init(v["adversary"]))
    step = jax.jit(make_train_step(model, tx, adv_tx, 2, lr_fn, adv_lr_fn, inner_steps=1,
                                   adv_norm="l2", adv_eps=0.05))
    images, noise = _batch(4)
    for _ in range(2):
      state, m = step(state, {"images": images, "noise": noise}, jax.random.key(5))
    states[scan], metrics[scan] = jax.device_get(state), jax.device_get(m)
  assert set(metrics[True]) == set(metrics[False])
  for k in metrics[False]:
    np.testing.assert_allclose(metrics[True][k], metrics[False][k], rtol=1e-9, err_msg=k)
  back = layout.to_unrolled(states[True])
  for field in ("params", "adversary", "opt_state", "adv_opt_state"):
    a, b = getattr(back, field), getattr(states[False], field)
    assert jax.tree.structure(a) == jax.tree.structure(b), field
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12, err_msg=field)
  # The projection was active: every block's shift sits on the eps sphere or inside it.
  shifts = states[True].adversary["blocks"]["attn"]["rpe_k"]["adv_shift"]
  assert np.all(np.linalg.norm(shifts, axis=-1) <= 0.05 + 1e-12)
  assert np.any(np.isclose(np.linalg.norm(shifts, axis=-1), 0.05))


# -- (d) compile size flat in depth ------------------------------------------------------------

def _lowered_size(depth, scan):
  model = MAEPlus(image_size=28, patch_size=4, embed_dim=32, depth=depth, num_heads=4,
                  decoder_embed_dim=32, decoder_depth=depth, decoder_num_heads=4, pe="rpe",
                  adversary="coordinate", scan_blocks=scan)
  shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
  batch = {"images": jax.ShapeDtypeStruct((2, 28, 28, 3), jnp.float32),
           "noise": jax.ShapeDtypeStruct((2, 49), jnp.float32)}
  loss = jax.value_and_grad(make_loss_fn(model), argnums=(0, 1))
  text = jax.jit(loss).lower(shapes["params"], shapes["adversary"], batch,
                             jax.random.key(0)).as_text()
  return len(text)


def test_lowered_train_loss_does_not_grow_with_depth():
  """A structural check (no timing): the StableHLO of value_and_grad of the loss at depth
  8 is about the size of depth 2's when scanned, and grows with depth when unrolled."""
  scan2, scan8 = _lowered_size(2, True), _lowered_size(8, True)
  unrolled2, unrolled8 = _lowered_size(2, False), _lowered_size(8, False)
  assert scan8 / scan2 < 1.3, (scan2, scan8)
  assert unrolled8 / unrolled2 > 2.0, (unrolled2, unrolled8)


# -- (e) checkpoints: export, convert, fine-tune init, resume refusal ----------------------------

@pytest.fixture(scope="module")
def scanned_run(tmp_path_factory):
  """A scanned pretraining checkpoint (RPE + coordinate, the seed smoke config) and its
  variables."""
  from adpe_jax.train.pretrain import run_metadata
  c = pretrain_config.seed_config("rpe", "coordinate", "smoke")
  assert c.model.scan_blocks
  v = _live_variables(build_model(c).clone(scan_blocks=False), dtype=np.float32)
  vs = layout.to_scanned(v)
  workdir = tmp_path_factory.mktemp("scanned")
  with checkpoint.Checkpointer(workdir, 1, metadata=run_metadata(c)) as ck:
    ck.maybe_save(1, {"params": vs["params"], "adversary": vs["adversary"]}, force=True)
  return dict(config=c, unrolled=v, scanned=vs, workdir=workdir)


def test_scanned_checkpoint_exports_and_converts_as_unrolled(scanned_run):
  c, v, vs = scanned_run["config"], scanned_run["unrolled"], scanned_run["scanned"]
  w = weights.load(scanned_run["workdir"])
  params, run = w.params, w.run
  assert layout.is_scanned(params)
  sd = export.timm_state_dict(params, run)
  want = export.timm_state_dict(v["params"], run)
  assert set(sd) == set(want) and "blocks.1.attn.qkv.weight" in sd
  assert all(np.array_equal(sd[k], want[k]) for k in sd)
  # The original's names: identical state dicts; from_torch gives the config's layout back.
  grid = build_model(c).grid
  t1, t0 = convert.to_torch(vs, grid), convert.to_torch(v, grid)
  assert set(t1) == set(t0) and all(np.array_equal(t1[k], t0[k]) for k in t0)
  shapes = lambda cfg: jax.eval_shape(  # noqa: E731
      lambda: init_variables(build_model(cfg), jax.random.key(0)))
  back = convert.from_torch(t1, shapes(c), grid=grid)
  assert layout.is_scanned(back["params"])
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(jax.device_get(vs))):
    assert np.array_equal(a, b)
  c0 = pretrain_config.seed_config("rpe", "coordinate", "smoke")
  c0.model.scan_blocks = False
  assert "blocks_0" in convert.from_torch(t1, shapes(c0), grid=grid)["params"]


def test_scanned_checkpoint_initialises_a_finetune(scanned_run):
  from adpe_jax.config import finetune as finetune_config
  c = finetune_config.recipe("base", "rpe", "smoke", rpe_lookup="continuous")
  c.image_size, c.init = 56, str(scanned_run["workdir"])
  model = build_classifier(c)
  fresh = jax.jit(lambda k: init_classifier_params(model, k))(jax.random.key(0))
  params, info = weights.init_classifier(c, model, fresh)
  assert info["init_adversary"] == "coordinate" and "blocks" not in params
  pre = scanned_run["unrolled"]["params"]
  for i in range(2):
    for name in ("qkv", "proj"):
      np.testing.assert_array_equal(params[f"blocks_{i}"]["attn"][name]["kernel"],
                                    pre[f"blocks_{i}"]["attn"][name]["kernel"])
    np.testing.assert_array_equal(params[f"blocks_{i}"]["attn"]["rpe_k"]["lookup_table"],
                                  pre[f"blocks_{i}"]["attn"]["rpe_k"]["lookup_table"])
  logits = jax.jit(lambda p, im: model.apply({"params": p}, im))(params, jnp.zeros((2, 56, 56, 3)))
  assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("saved_scan", [True, False])
def test_resuming_with_the_other_layout_is_refused(saved_scan, tmp_path):
  c = pretrain_config.seed_config("rpe", "coordinate", "smoke")
  c.model.scan_blocks = saved_scan
  v = jax.device_get(init_variables(build_model(c), jax.random.key(0)))
  with checkpoint.Checkpointer(tmp_path, 1, metadata={"k": 1}) as ck:
    ck.maybe_save(1, dict(v), force=True)
  other = layout.to_unrolled(v) if saved_scan else layout.to_scanned(v)
  with checkpoint.Checkpointer(tmp_path, 1, metadata={"k": 1}) as ck:
    with pytest.raises(checkpoint.CheckpointError) as err:
      ck.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), other))
    msg = str(err.value)
    assert str(tmp_path / "checkpoints" / "1") in msg
    assert f"model.scan_blocks={not saved_scan}" in msg and f"set model.scan_blocks={saved_scan}" in msg
    assert msg.count(". ") == 0, msg   # one sentence
    # The same layout restores.
    got = ck.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), v))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(v)):
    assert np.array_equal(a, b)
