"""The fused Pallas iRPE attention against its plain-jnp reference: forward and every
gradient (q, k, v, the table W, the per-bucket adversary table, the faithful token, the
coordinate shift), integer and continuous lookups, masked rows, odd lengths, float32 and
bfloat16, block sizes; one train step of an RPE-coordinate model; the pallas model against
the original PyTorch vectors; no (B, H, T, T) array outside the kernels; both kernels
lower for CUDA (Triton) and TPU (Mosaic); the config field.

As in jax's tests/pallas/gpu_ops_test.py, the kernel cases live in a class with an
INTERPRET flag: `TestRpeAttention` compiles the kernels (GPU / TPU only, skipped on CPU)
and `TestRpeAttentionInterpret` runs the same cases with `interpret=True` on any backend."""

import contextlib
import dataclasses
import re

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import traverse_util

from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.errors import ConfigError
from adpe_jax.kernels import irpe
from adpe_jax.kernels import attention as attn_lib
from adpe_jax.kernels import rpe_attention as fused
from adpe_jax.kernels.rpe_attention import BlockSizes, continuous_geometry
from adpe_jax import layout

ON_DEVICE = jax.default_backend() in ("gpu", "tpu")
B, H = 2, 2
# name: (grid, head_dim, lookup (None = no RPE), adversary, separate RPE query, block sizes)
CASES = {
    "ape": (3, 8, None, "none", False, None),
    "integer_unscaled_query": (3, 8, "integer", "none", True, None),
    "continuous": (4, 16, "continuous", "none", False, BlockSizes(block_q=16)),
    "integer_per_bucket": (4, 8, "integer", "embedding", False, None),
    "integer_faithful": (3, 8, "integer", "embedding_faithful", False, None),
    "coordinate": (4, 16, "continuous", "coordinate", False, BlockSizes(16, block_q_bwd=32)),
}


def make_inputs(name, dtype=jnp.float32, seed=0):
  grid, d, lookup, adv, sep, _ = CASES[name]
  t = 1 + grid * grid                      # 10 or 17: odd, not a power of two
  rng = np.random.default_rng(seed)
  q, k, v, qr = (rng.standard_normal((B, t, H, d)) for _ in range(4))
  q = q * d ** -0.5
  c = rng.standard_normal((B, t, H, d))    # the loss's random projection of the output
  mask = rng.random((B, t)) < 0.5
  mask[:, 1], mask[:, 2] = True, False     # masked and visible rows in every example
  table = rng.normal(0, 0.5, (d, irpe.NUM_BUCKETS))
  advv = {"none": None, "embedding": rng.normal(0, 0.5, (d, irpe.NUM_BUCKETS)),
          "embedding_faithful": rng.normal(0, 0.5, d),
          "coordinate": np.array([0.37, -0.81])}[adv]
  arrays = {"q": q, "k": k, "v": v}
  if sep:
    arrays["qr"] = qr
  if lookup is not None:
    arrays["table"] = table
  if advv is not None:
    arrays["adv"] = advv
  arrays = {n: jnp.asarray(x, dtype if n in ("q", "k", "v", "qr") else jnp.float32)
            for n, x in arrays.items()}
  return arrays, jnp.asarray(c, jnp.float32), jnp.asarray(mask)


def loss_fn(name, impl, c, mask, interpret=None):
  grid, _, lookup, adv, _, block_sizes = CASES[name]

  def loss(arrays):
    ops = None
    if lookup is not None:
      masked = adv != "none"
      ops = irpe.RPEOperands(table=arrays["table"], adv=arrays.get("adv"),
                             query_mask=mask if masked else None, grid=grid, lookup=lookup,
                             adversary=adv, query=arrays.get("qr"))
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    if impl == "pallas":
      out = fused.rpe_attention(q, k, v, ops, block_sizes=block_sizes, interpret=interpret)
    else:
      out = fused.rpe_attention_reference(q, k, v, ops)
    return jnp.sum(out.astype(jnp.float32) * c), out

  return loss


def run(name, impl, dtype=jnp.float32, interpret=None):
  arrays, c, mask = make_inputs(name, dtype)
  f = jax.jit(jax.value_and_grad(loss_fn(name, impl, c, mask, interpret), has_aux=True))
  # No TF32 on a GPU: the float32 tolerances are for float32 matmuls.
  with jax.default_matmul_precision("highest") if ON_DEVICE else contextlib.nullcontext():
    (_, out), grads = f(arrays)
  return jax.device_get(out), jax.device_get(grads)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def test_continuous_geometry_reproduces_the_reference_table():
  grid, tp, shift = 4, 32, jnp.asarray([0.37, -0.81])
  t = 1 + grid * grid
  table = np.random.default_rng(1).standard_normal((3, irpe.NUM_BUCKETS))
  ids, ws = map(np.asarray, continuous_geometry(grid, tp, shift, jnp.float32))
  got = np.zeros((3, tp, tp))
  for cnr in range(4):
    got += np.where(ids[cnr] >= 0, ws[cnr], 0.0)[None] * table[:, np.maximum(ids[cnr], 0)]
  want = np.asarray(irpe.continuous_table(jnp.asarray(table, jnp.float32), grid, shift))
  np.testing.assert_allclose(got[:, :t, :t], want, rtol=1e-5, atol=1e-5)
  assert np.all(ids[:, t:, :] == -1) and np.all(ids[:, :, t:] == -1) and np.all(ws[:, t:] == 0)


def _square_intermediates(jaxpr, b, h, sizes):
  """Shapes (b, h, n, n) / (b, n, h, n)-like with n in `sizes`, outside pallas_call."""
  found = []
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      shape = tuple(getattr(var.aval, "shape", ()))
      if len(shape) == 4 and shape[:2] == (b, h) and shape[2] in sizes and shape[3] in sizes:
        found.append((eqn.primitive.name, shape))
    if eqn.primitive.name == "pallas_call":
      continue  # inside the kernel: VMEM / SRAM tiles are fine
    for sub in _sub_jaxprs(list(eqn.params.values())):
      found += _square_intermediates(sub, b, h, sizes)
  return found


def _sub_jaxprs(values):
  for v in values:
    if hasattr(v, "eqns"):
      yield v
    elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):  # ClosedJaxpr
      yield v.jaxpr
    elif isinstance(v, (tuple, list)):
      yield from _sub_jaxprs(v)


class TestRpeAttention:
  """The kernel against the reference, compiled for this GPU / TPU (INTERPRET = False;
  skipped on CPU) or in the Pallas interpreter (the subclass, any backend)."""

  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _needs_device(self):
    if not self.INTERPRET and not ON_DEVICE:
      pytest.skip("compiled Pallas kernels need a GPU or TPU; TestRpeAttentionInterpret "
                  "runs these cases here")

  @pytest.fixture(scope="class")
  def results(self, request):
    """Each (case, impl, dtype) compiled and run once for the whole class."""
    interpret = request.cls.INTERPRET
    cache = {}

    def get(name, impl, dtype=jnp.float32):
      key = (name, impl, jnp.dtype(dtype).name)
      if key not in cache:
        cache[key] = run(name, impl, dtype, interpret)
      return cache[key]

    return get

  @pytest.mark.parametrize("name", sorted(CASES))
  def test_float32_forward_and_every_gradient_match_the_reference(self, name, results):
    out_p, g_p = results(name, "pallas")
    out_x, g_x = results(name, "xla")
    assert out_p.dtype == out_x.dtype == np.float32 and out_p.shape == out_x.shape
    assert rel_err(out_p, out_x) < 1e-5
    assert set(g_p) == set(g_x)
    for n in g_x:
      if n == "adv" and CASES[name][3] == "embedding_faithful":
        continue  # a no-op under softmax: its gradient is round-off (next test)
      assert np.max(np.abs(g_x[n])) > 1e-3, n        # a real gradient, not zero by construction
      assert rel_err(g_p[n], g_x[n]) < 1e-5, (n, rel_err(g_p[n], g_x[n]))

  def test_faithful_token_gradient_is_round_off_in_both(self, results):
    _, g_p = results("integer_faithful", "pallas")
    _, g_x = results("integer_faithful", "xla")
    assert np.max(np.abs(g_p["adv"])) < 1e-5 and np.max(np.abs(g_x["adv"])) < 1e-5
    assert np.max(np.abs(g_p["table"])) > 1e-3

  @pytest.mark.parametrize("name", ["coordinate", "integer_per_bucket"])
  def test_bfloat16_matches_the_reference(self, name, results):
    out_p, g_p = results(name, "pallas", jnp.bfloat16)
    out_x, g_x = results(name, "xla", jnp.bfloat16)
    out_32, _ = results(name, "xla")
    assert out_p.dtype == jnp.bfloat16
    assert rel_err(out_p, out_x) < 1.5e-2
    assert rel_err(out_p, out_32) < 1.5e-2   # and as close to the float32 result
    for n in g_x:
      assert rel_err(g_p[n], g_x[n]) < 1.5e-2, (n, rel_err(g_p[n], g_x[n]))

  def test_no_batch_head_square_array_outside_the_kernel(self):
    name = "coordinate"
    arrays, c, mask = make_inputs(name)
    t = arrays["q"].shape[1]
    sizes = {t, 32}
    for impl in ("pallas", "xla"):
      f = jax.value_and_grad(loss_fn(name, impl, c, mask, self.INTERPRET), has_aux=True)
      jaxpr = jax.make_jaxpr(f)(arrays)
      found = _square_intermediates(jaxpr.jaxpr, B, H, sizes)
      if impl == "pallas":
        assert str(jaxpr).count("pallas_call[") == 2  # the forward and the backward kernel
        assert not found, found
      else:
        assert found  # the check sees the reference's logits, so it is not vacuous

  def test_block_sizes_must_divide_the_padded_length(self):
    arrays, c, mask = make_inputs("continuous")            # T = 17 -> 32
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    for bad, field in ((BlockSizes(12), "block_q=12"), (BlockSizes(16, 12), "block_q_bwd=12")):
      with pytest.raises(ValueError, match=f"block_sizes.{field} must divide the padded "
                                           "length 32"):
        fused.rpe_attention(q, k, v, None, block_sizes=bad, interpret=self.INTERPRET)


class TestRpeAttentionInterpret(TestRpeAttention):
  INTERPRET = True


def test_default_block_sizes_per_backend():
  """Hand-computed: TPU takes the whole padded length; elsewhere 8192 // Tp rows, at
  least 16, at most Tp (T 10 -> 16, 50 -> 64, 197 -> 256, 257 -> 512)."""
  assert BlockSizes.get_default(50, "tpu") == BlockSizes(block_q=64)
  assert BlockSizes.get_default(197, "tpu") == BlockSizes(block_q=256)
  assert BlockSizes.get_default(10, "gpu") == BlockSizes(block_q=16)
  assert BlockSizes.get_default(50, "gpu") == BlockSizes(block_q=64)
  assert BlockSizes.get_default(197, "gpu") == BlockSizes(block_q=32)
  assert BlockSizes.get_default(257, "gpu") == BlockSizes(block_q=16)
  assert BlockSizes.get_default(50, "cpu") == BlockSizes(block_q=64)
  with pytest.raises(dataclasses.FrozenInstanceError):
    BlockSizes(16).block_q = 32


def _target_device(backend: str):
  """The context a cross-platform lowering needs: jax >= 0.11 lowers Triton on a CPU host
  only for an abstract GPU device named by the abstract mesh (an H100 here); a 1 x 1
  (data, fsdp) mesh, so the kernel's shard_map over the batch is the identity."""
  if backend != "gpu" or not hasattr(jax.sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="gpu")
  mesh = jax.sharding.AbstractMesh((1, 1), ("data", "fsdp"), abstract_device=device)
  return jax.sharding.use_abstract_mesh(mesh)


@pytest.mark.parametrize("platform,backend", [("cuda", "gpu"), ("tpu", "tpu")])
def test_kernels_lower_for_gpu_triton_and_tpu_mosaic(platform, backend):
  """Cross-platform lowering on this CPU: every primitive of both kernels has a Triton /
  Mosaic TPU lowering rule and the block shapes pass their checks, at the real shapes
  (T 50 -> 64 and 197 -> 256, head_dim 64 and 80 -> 128, bf16).  Compiling the Triton /
  Mosaic module to device code needs the device (benchmarks/gpu_check.sh).

  The forward alone lowers to one kernel call; the gradient to the backward kernel's call
  (jax 0.10 also keeps the forward's, jax >= 0.11 drops it when no residual of it is used:
  the gradient of a sum needs none)."""
  target = "xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
  for (b, h, t, d), kind in [((256, 12, 50, 64), "coordinate"), ((64, 12, 197, 80), "embedding")]:
    grid = int(round((t - 1) ** 0.5))
    sds = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    advs = {"coordinate": jax.ShapeDtypeStruct((2,), jnp.float32),
            "embedding": jax.ShapeDtypeStruct((d, irpe.NUM_BUCKETS), jnp.float32)}

    def loss(q, k, v, table, adv, kind=kind, grid=grid, b=b, t=t):
      ops = irpe.RPEOperands(table=table, adv=adv, query_mask=jnp.ones((b, t), bool), grid=grid,
                             lookup="continuous" if kind == "coordinate" else "integer",
                             adversary=kind)
      out = fused.rpe_attention(q, k, v, ops, backend=backend, interpret=False)
      return jnp.sum(out.astype(jnp.float32))

    args = (sds, sds, sds, jax.ShapeDtypeStruct((d, irpe.NUM_BUCKETS), jnp.float32), advs[kind])
    texts = []
    for f in (jax.jit(loss), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))):
      try:
        with _target_device(backend):
          texts.append(f.trace(*args).lower(lowering_platforms=(platform,)).as_text())
      except ValueError as e:
        if "Cannot lower pallas_call on platform" in str(e):
          pytest.skip(f"this jaxlib has no {platform} Pallas lowering")
        raise
    forward, gradient = texts
    assert forward.count(target) == 1, (t, d)
    # The backward kernel: dq, dk, dv and the table's gradient come out of one call.
    assert gradient.count(target) in (1, 2), (t, d)
    assert re.search(r"%\w+:[4-9] = [^\n]*" + re.escape(target), gradient), (t, d)


def _capture(sign):
  """SGD with lr 1 (sign -1: ascent) that also keeps the last gradient as its state."""
  return optax.GradientTransformation(
      lambda p: jax.tree.map(jnp.zeros_like, p),
      lambda g, s, p=None: (jax.tree.map(lambda x: sign * x, g), g))


def test_train_step_pallas_equals_xla():
  from adpe_jax.train.state import build_model, init_variables, TrainState
  from adpe_jax.train.step import make_train_step
  out = {}
  n = 4
  rng = np.random.default_rng(0)
  images = rng.standard_normal((n, 28, 28, 3)).astype(np.float32)
  noise = rng.random((n, 49)).astype(np.float32)
  batch = {"images": images, "noise": noise}
  for impl in ("xla", "pallas"):
    c = pretrain_config.seed_config("rpe", "coordinate", "smoke")
    c.model.attention_impl = impl
    model = build_model(c)
    variables = jax.device_get(jax.jit(init_variables, static_argnums=0)(model, jax.random.key(0)))
    r = np.random.default_rng(1)
    flat = traverse_util.flatten_dict(variables)
    for k, v in flat.items():  # tables and shifts start at zero: make every gradient live
      if k[-1] in ("lookup_table", "adv_shift"):
        flat[k] = r.normal(0, 0.5, v.shape).astype(np.float32)
    variables = traverse_util.unflatten_dict(flat)
    tx, adv_tx = _capture(1.0), _capture(-1.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       adversary=variables["adversary"], opt_state=tx.init(variables["params"]),
                       adv_opt_state=adv_tx.init(variables["adversary"]))
    step = make_train_step(model, tx, adv_tx, 1)
    jaxpr = str(jax.make_jaxpr(step)(state, batch, jax.random.key(2)))
    # (forward + backward) kernels per scanned stack (encoder, decoder) on the pallas
    # path, none on xla (unrolled: 3 layers x 2).
    assert jaxpr.count("pallas_call[") == (4 if impl == "pallas" else 0), impl
    out[impl] = jax.device_get(jax.jit(step)(state, batch, jax.random.key(2)))
  (sx, mx), (sp, mp) = out["xla"], out["pallas"]
  assert abs(mp["loss"] - mx["loss"]) < 1e-5 * abs(mx["loss"])
  for field in ("opt_state", "adv_opt_state", "params", "adversary"):  # gradients, new state
    gx = traverse_util.flatten_dict(getattr(sx, field))
    gp = traverse_util.flatten_dict(getattr(sp, field))
    assert set(gx) == set(gp)
    for k in gx:
      assert np.max(np.abs(gx[k])) > 0, (field, k)
      assert rel_err(gp[k], gx[k]) < 1e-5, (field, k, rel_err(gp[k], gx[k]))
  shifts = [k for k in traverse_util.flatten_dict(layout.to_unrolled(sx.adv_opt_state))
            if k[-1] == "adv_shift"]
  assert len(shifts) == 3  # 2 encoder + 1 decoder layers, each with its own shift


@pytest.mark.parametrize("name", ["rpe_adv0", "rpe_adv2"])
def test_pallas_model_matches_the_original_pytorch(name, monkeypatch):
  """tests/test_fidelity.py's comparison with the original code (same weights, images and
  noise; loss, prediction, latent and every gradient), with attention_impl=pallas:
  integer lookup in float64 (1e-10) and the coordinate adversary in float32 (2e-5)."""
  import test_fidelity as fid
  from adpe_jax.train.state import build_model
  reference_config = fid.reference_config

  def pallas_config(n):
    c = reference_config(n)
    c.model.attention_impl = "pallas"
    return c

  monkeypatch.setattr(fid, "reference_config", pallas_config)
  assert build_model(fid.reference_config(name)).attention_impl == "pallas"
  with jax.enable_x64(True):
    fid.test_matches_original(name, None)


def test_config_field_and_auto_resolution():
  c = pretrain_config.seed_config("rpe", "coordinate", "smoke")
  assert c.model.attention_impl == "auto"
  pretrain_config.validate(c)
  c.model.attention_impl = "triton"
  with pytest.raises(ConfigError, match="model.attention_impl"):
    pretrain_config.validate(c)
  assert attn_lib.resolve_impl("auto") == "xla"  # CPU
  assert attn_lib._auto_impl("gpu", "9.0") == "pallas"
  assert attn_lib._auto_impl("gpu", "8.0") == "pallas"
  assert attn_lib._auto_impl("gpu", "7.5") == "xla"
  assert attn_lib._auto_impl("tpu", "") == "xla"
  with pytest.raises(ValueError):
    attn_lib.resolve_impl("bogus")


def test_auto_falls_back_to_xla_when_the_kernel_does_not_build(monkeypatch):
  """Under `auto` the kernel is compiled once on tiny shapes first; a failure means xla."""
  from adpe_jax import parallel
  monkeypatch.setattr(attn_lib, "_auto_impl", lambda *a: "pallas")   # as on a CUDA GPU
  attn_lib._pallas_builds.cache_clear()
  with jax.set_mesh(parallel.make_mesh()):   # several devices: auto needs a mesh
    assert attn_lib._pallas_builds() and attn_lib.resolve_impl("auto") == "pallas"

    def broken(*a, **k):
      raise RuntimeError("Triton lowering failed")
    monkeypatch.setattr(fused, "rpe_attention", broken)
    attn_lib._pallas_builds.cache_clear()
    assert attn_lib.resolve_impl("auto") == "xla"
    assert attn_lib.resolve_impl("pallas") == "pallas"   # an explicit choice is kept
  attn_lib._pallas_builds.cache_clear()
