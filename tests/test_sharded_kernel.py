"""The fused kernel on a mesh: under shard_map over the batch axes it computes what the XLA
attention computes -- losses and every gradient of a few train steps on `data=4` and
`data=2, fsdp=2` (the iRPE tables FSDP-sharded), for the RPE-coordinate and the
per-bucket RPE embedding adversaries -- each device running the kernel on its own rows
(no all-gather of q, k, v; the Triton kernel of a step lowered for 8 GPUs sees the
per-device batch); a batch the mesh does not divide; `auto` on a multi-device CUDA mesh.

Interpret mode on 4 fake CPU devices (tests/conftest.py).  The two-process (2 x 2) run
with `pallas` against 1 x 4 is in tests/test_multihost.py."""

import re

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import traverse_util
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from adpe_jax import parallel
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.kernels import attention as attn_lib
from adpe_jax.kernels import irpe
from adpe_jax.kernels import rpe_attention as fused
from adpe_jax.train.state import TrainState, build_model, init_variables
from adpe_jax.train.step import make_train_step

MIN_SIZE = 256   # FSDP-shard the smoke model's (8, 50) iRPE tables too
STEPS = 2
# configs/vitb_rpe_coord.py:smoke and configs/vitb_rpe_embed.py:smoke (per-bucket table)
KINDS = ("coordinate", "embedding")
MESHES = {"data4": dict(data=4), "data2_fsdp2": dict(data=2, fsdp=2)}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _capture(sign, lr=0.05):
  """SGD with `lr` (sign -1: ascent) whose state is the last gradient, so the state after
  each step holds that step's gradients."""
  return optax.GradientTransformation(
      lambda p: jax.tree.map(jnp.zeros_like, p),
      lambda g, s, p=None: (jax.tree.map(lambda x: sign * lr * x, g), g))


def smoke(kind, impl):
  c = pretrain_config.seed_config("rpe", kind, "smoke")
  c.model.attention_impl = impl
  return c


def initial_variables(model):
  """The model's initial variables with the zero-initialised tables and adversaries made
  random, so that every gradient is live from the first step (spec 9.4)."""
  variables = jax.device_get(jax.jit(init_variables, static_argnums=0)(model, jax.random.key(0)))
  r = np.random.default_rng(1)
  flat = traverse_util.flatten_dict(variables)
  for k, v in flat.items():
    if k[-1] in ("lookup_table", "adv_shift", "adv_table"):
      flat[k] = r.normal(0, 0.5, v.shape).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def batches():
  """STEPS batches of 16 crops (smoke: 8 images x 2 crops) with their mask noise."""
  rng = np.random.default_rng(0)
  return [{"images": rng.standard_normal((16, 28, 28, 3)).astype(np.float32),
           "noise": rng.random((16, 49)).astype(np.float32)} for _ in range(STEPS)]


def trajectory(kind, impl, mesh, batches):
  """(losses, per-step gradients {field: flat dict}, compiled HLO text) of STEPS steps."""
  c = smoke(kind, impl)
  model = build_model(c)
  variables = initial_variables(model)
  tx, adv_tx = _capture(1.0), _capture(-1.0)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     adversary=variables["adversary"], opt_state=tx.init(variables["params"]),
                     adv_opt_state=adv_tx.init(variables["adversary"]))
  shardings = parallel.state_shardings(mesh, state, MIN_SIZE)
  state = jax.device_put(state, shardings)
  repl = parallel.replicated(mesh)
  step = jax.jit(parallel.under_mesh(make_train_step(model, tx, adv_tx, c.accum_steps), mesh),
                 in_shardings=(shardings, parallel.batch_sharding(mesh), repl),
                 out_shardings=(shardings, repl))
  key = jax.random.key(2)
  compiled = step.lower(state, parallel.global_batch(batches[0], mesh), key).compile()
  losses, grads = [], []
  for b in batches:
    state, m = compiled(state, parallel.global_batch(b, mesh), key)
    losses.append(float(m["loss"]))
    grads.append({f: traverse_util.flatten_dict(jax.device_get(getattr(state, f)))
                  for f in ("opt_state", "adv_opt_state")})
  return losses, grads, compiled.as_text(), state


@pytest.fixture(scope="module")
def xla_reference(batches):
  """The XLA attention, data parallel over 4 devices: what every layout must reproduce."""
  mesh = parallel.make_mesh(data=4)
  return {kind: trajectory(kind, "xla", mesh, batches) for kind in KINDS}


# The headline adversary on both meshes, the per-bucket table (FSDP-sharded too) on the
# FSDP one: each interpret-mode step compiles in ~15 s on 2 cores, so not the full grid.
@pytest.mark.parametrize("kind,mesh_name", [("coordinate", "data4"),
                                            ("coordinate", "data2_fsdp2"),
                                            ("embedding", "data2_fsdp2")])
def test_sharded_pallas_steps_equal_xla(kind, mesh_name, batches, xla_reference):
  mesh = parallel.make_mesh(**MESHES[mesh_name])
  lp, gp, hlo, state = trajectory(kind, "pallas", mesh, batches)
  lx, gx, _, _ = xla_reference[kind]
  np.testing.assert_allclose(lp, lx, rtol=1e-5)
  tables = 0
  for s in range(STEPS):
    for field in ("opt_state", "adv_opt_state"):
      assert set(gp[s][field]) == set(gx[s][field])
      for k, want in gx[s][field].items():
        assert np.max(np.abs(want)) > 0, (s, field, k)
        assert rel_err(gp[s][field][k], want) < 2e-5, (s, field, k,
                                                       rel_err(gp[s][field][k], want))
        tables += k[-1] in ("lookup_table", "adv_shift", "adv_table")
  # both stacks' iRPE tables and adversaries are among the compared gradients
  assert tables == STEPS * 4, tables
  if mesh_name == "data2_fsdp2":   # the tables (and the per-bucket adversary) were sharded
    flat = traverse_util.flatten_dict({"p": state.params, "a": state.adversary})
    specs = [tuple(v.sharding.spec) for k, v in flat.items()
             if k[-1] in ("lookup_table", "adv_table")]
    assert len(specs) == (4 if kind == "embedding" else 2), specs
    assert all("fsdp" in s for s in specs), specs
  else:
    # Everything but the batch is replicated on data=4: an all-gather could only be the
    # kernel's operands gathered to run it whole on every device.
    assert "all-gather" not in hlo


def test_a_batch_the_mesh_does_not_divide_is_padded():
  """6 rows on 4 devices (set with jax.set_mesh): padded to 8 inside, the same function
  and gradients as the reference."""
  b, t, h, d, grid = 6, 10, 2, 8, 3
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
  table = jnp.asarray(rng.normal(0, 0.5, (d, irpe.NUM_BUCKETS)), jnp.float32)
  adv = jnp.asarray(rng.normal(0, 0.5, (d, irpe.NUM_BUCKETS)), jnp.float32)
  mask = jnp.asarray(rng.random((b, t)) < 0.5)

  def loss(q, k, v, table, adv, impl):
    ops = irpe.RPEOperands(table=table, adv=adv, query_mask=mask, grid=grid, lookup="integer",
                           adversary="embedding")
    out = attn_lib.attention(q, k, v, ops, impl=impl)
    return jnp.sum(jnp.sin(out)), out

  mesh = parallel.make_mesh(data=4)
  got = {}
  for impl in ("xla", "pallas"):
    with jax.set_mesh(mesh):
      got[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True),
                          static_argnums=5)(q, k, v, table, adv, impl)
  ((_, ox), gx), ((_, op), gp) = got["xla"], got["pallas"]
  assert op.shape == (b, t, h, d)
  assert rel_err(op, ox) < 1e-5
  for a, e in zip(gp, gx):
    assert rel_err(a, e) < 1e-5


def _triton_calls(text):
  return [l for l in text.splitlines() if "custom_call @__gpu$xla.gpu.triton" in l]


def test_step_lowered_for_8_gpus_runs_the_kernel_on_the_per_device_batch():
  """The pretraining step traced on an abstract 8-GPU (data=8) mesh and lowered for CUDA
  from this CPU: each Triton kernel (forward and backward, both stacks) is launched on
  16 / 8 = 2 rows -- grid (2, heads) and operands of 2 rows -- inside the manual
  (shard_map) region, and no all-gather is asked for."""
  c = smoke("coordinate", "pallas")
  model = build_model(c)
  tx, adv_tx = optax.sgd(0.1), optax.sgd(-0.1)
  variables = jax.eval_shape(lambda k: init_variables(model, k), jax.random.key(0))
  state = jax.eval_shape(lambda v: TrainState(
      step=jnp.zeros((), jnp.int32), params=v["params"], adversary=v["adversary"],
      opt_state=tx.init(v["params"]), adv_opt_state=adv_tx.init(v["adversary"])), variables)
  gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                    platform="cuda")
  mesh = AbstractMesh((8, 1), parallel.BATCH_AXES, axis_types=(AxisType.Auto,) * 2,
                      abstract_device=gpu)
  repl, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(parallel.BATCH_AXES))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state)
  batch = {"images": jax.ShapeDtypeStruct((16, 28, 28, 3), jnp.float32, sharding=rows),
           "noise": jax.ShapeDtypeStruct((16, 49), jnp.float32, sharding=rows)}
  step = jax.jit(parallel.under_mesh(make_train_step(model, tx, adv_tx, 1), mesh))
  try:
    text = step.trace(state, batch, jax.random.key(0)).lower(
        lowering_platforms=("cuda",)).as_text()
  except ValueError as e:
    if "Cannot lower pallas_call on platform" in str(e):
      pytest.skip("this jaxlib has no CUDA Pallas lowering")
    raise
  calls = _triton_calls(text)
  assert len(calls) == 4, len(calls)       # fwd + bwd per scanned stack (encoder, decoder)
  for line in calls:
    assert re.search(r"grid_x = 2 : i32", line), line[:300]
    operand_types = line.rsplit(": (", 1)[1]
    q_like = re.findall(r"tensor<(\d+)x4x64x16x", operand_types)   # (rows, H, Tp, dp)
    assert q_like and set(q_like) == {"2"}, operand_types[:300]
  assert "sdy.manual_computation" in text or "SPMDFullToShardShape" in text
  assert "all_gather" not in text


def test_auto_picks_pallas_on_a_multi_device_cuda_mesh(monkeypatch):
  """`auto` on (mocked) CUDA devices: pallas with a mesh in context (set_mesh, or traced
  under parallel.under_mesh inside jit, where the build probe must still run), xla with
  none on several devices, below compute capability 8.0, and on TPU."""
  mesh = parallel.make_mesh(data=2, fsdp=2)
  monkeypatch.setattr(attn_lib, "_platform", lambda: ("gpu", "9.0"))
  attn_lib._pallas_builds.cache_clear()
  assert attn_lib.resolve_impl("auto") == "xla"           # 4 devices, no mesh in context
  with jax.set_mesh(mesh):
    assert attn_lib.resolve_impl("auto") == "pallas"
  seen = []

  def traced(x):
    seen.append(attn_lib.resolve_impl("auto"))
    return x

  attn_lib._pallas_builds.cache_clear()   # the probe's first run inside a trace
  jax.jit(parallel.under_mesh(traced, mesh))(jnp.ones(2))
  assert seen == ["pallas"]
  for platform in (("gpu", "7.5"), ("tpu", "")):
    monkeypatch.setattr(attn_lib, "_platform", lambda p=platform: p)
    with jax.set_mesh(mesh):
      assert attn_lib.resolve_impl("auto") == "xla", platform
  attn_lib._pallas_builds.cache_clear()


def test_shard_map_compat_sums_replicated_gradients():
  """The compat shard_map (replication check off) sums a replicated input's cotangent over
  the devices: d/dw sum_i x_i w = sum_i x_i, computed from four per-device parts."""
  mesh = parallel.make_mesh(data=4)
  x = jnp.arange(8.0)

  def f(w):
    y = attn_lib.shard_map(lambda xs, w: xs * w, mesh=mesh, in_specs=(P(parallel.BATCH_AXES),
                           P()), out_specs=P(parallel.BATCH_AXES))(x, w)
    return jnp.sum(y)

  assert float(jax.jit(jax.grad(f))(jnp.float32(3.0))) == pytest.approx(float(x.sum()))


def test_triton_deprecation_warning_is_not_an_error():
  """jax 0.11's warning at each Triton lowering is ignored even under an "error" filter;
  any other DeprecationWarning still is one."""
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fused._launch(10, None, "gpu", False, False)    # what a kernel traced for a GPU does
    warnings.warn("The Pallas Triton backend is deprecated and will be removed in a future "
                  "JAX version.", DeprecationWarning)
    with pytest.raises(DeprecationWarning):
      warnings.warn("something else is deprecated", DeprecationWarning)


def test_the_pretraining_step_is_traced_on_its_mesh():
  """build_training's step (what train_and_evaluate compiles) runs the kernel under
  shard_map over its mesh, in both stacks, forward and backward."""
  from adpe_jax.train.pretrain import _batch_spec, build_training
  c = smoke("coordinate", "pallas")
  mesh = parallel.make_mesh(data=4)
  setup = build_training(c, mesh, total_steps=2, steps_per_epoch=1)
  jaxpr = str(setup["train_step"].trace(setup["state"], _batch_spec(
      c, parallel.batch_sharding(mesh)), setup["step_key"]).jaxpr)
  # fwd + bwd kernels per scanned stack; a shard_map around each (its transpose too)
  assert jaxpr.count("pallas_call[") == 4 and jaxpr.count("shard_map[") >= 4
