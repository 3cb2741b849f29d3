"""Tests for the iRPE math (adpe_jax.kernels.irpe) and module (adpe_jax.models.irpe) against independent plain-numpy / plain-Python references."""

import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from adpe_jax.kernels import irpe
from adpe_jax.models.irpe import RelativePositionKey

ALPHA, BETA, GAMMA = 1.9, 3.8, 15.2


# ---------------------------------------------------------------------------------------
# Plain-Python references (written from the spec formulas, not from the module)
# ---------------------------------------------------------------------------------------

def ref_g_int(x: int) -> int:
  """Spec 5.2 integer piecewise index of a scalar."""
  if abs(x) <= ALPHA:
    return int(round(x))
  v = round(ALPHA + math.log(abs(x) / ALPHA) / math.log(GAMMA / ALPHA) * (BETA - ALPHA))
  return int(math.copysign(1, x) * int(min(BETA, v)))


def ref_bucket_ids(grid: int) -> np.ndarray:
  L = grid * grid
  out = np.empty((L + 1, L + 1), dtype=np.int64)
  for i in range(L + 1):
    for j in range(L + 1):
      if i == 0 or j == 0:
        out[i, j] = 49
        continue
      ri, ci = divmod(i - 1, grid)
      rj, cj = divmod(j - 1, grid)
      out[i, j] = (ref_g_int(ri - rj) + 3) * 7 + (ref_g_int(ci - cj) + 3)
  return out


def ref_g_cont(x: float) -> float:
  """Spec 4.5 continuous piecewise index of a scalar."""
  if abs(x) <= ALPHA:
    return x
  return math.copysign(1, x) * min(BETA, ALPHA + math.log(abs(x) / ALPHA) / math.log(GAMMA / ALPHA) * (BETA - ALPHA))


def ref_pixel(d: float) -> float:
  """torch grid_sample, align_corners=False: pixel = ((u + 1) * size - 1) / 2, u = clip(g)/beta."""
  u = max(-BETA, min(BETA, ref_g_cont(d))) / BETA
  return ((u + 1) * 7 - 1) / 2


def ref_bilinear(img: np.ndarray, x: float, y: float) -> np.ndarray:
  """Zero-padded bilinear sample of img (C, H, W) at pixel (x along W, y along H)."""
  x0, y0 = math.floor(x), math.floor(y)
  out = np.zeros(img.shape[0], dtype=np.float64)
  for yy, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
    for xx, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
      if 0 <= yy < img.shape[1] and 0 <= xx < img.shape[2]:
        out += wy * wx * img[:, yy, xx]
  return out


def ref_continuous_table(table: np.ndarray, grid: int, shift) -> np.ndarray:
  hd = table.shape[0]
  img = table[:, :49].reshape(hd, 7, 7)
  L = grid * grid
  out = np.empty((hd, L + 1, L + 1))
  out[:, 0, :] = table[:, 49:50]
  out[:, :, 0] = table[:, 49:50]
  for i in range(L):
    ri, ci = divmod(i, grid)
    for j in range(L):
      rj, cj = divmod(j, grid)
      # grid_sample reads (x, y) = (row offset, col offset): row -> last (W) axis.
      x = ref_pixel(ri - rj + shift[0])
      y = ref_pixel(ci - cj + shift[1])
      out[:, 1 + i, 1 + j] = ref_bilinear(img, x, y)
  return out


def ref_attention_loss(q, k, v, bias, c):
  logits = np.einsum("bhid,bhjd->bhij", q, k) + bias
  logits = logits - logits.max(-1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(-1, keepdims=True)
  return float(np.sum(np.einsum("bhij,bhjd->bhid", p, v) * c))


def jax_attention_loss(q, k, v, bias, c):
  logits = jnp.einsum("bhid,bhjd->bhij", q, k) + bias
  p = jax.nn.softmax(logits, axis=-1)
  return jnp.sum(jnp.einsum("bhij,bhjd->bhid", p, v) * c)


def rand_qkv(rng, b, h, t, hd):
  q, k, v, c = (rng.standard_normal((b, h, t, hd)) for _ in range(4))
  return q * hd ** -0.5, k, v, c


def rand_mask(rng, b, grid):
  m = np.zeros((b, 1 + grid * grid), dtype=bool)
  m[:, 1:] = rng.random((b, grid * grid)) < 0.6
  m[:, 1] = True   # at least one masked row
  m[:, 2] = False  # at least one visible patch row
  return m


# ---------------------------------------------------------------------------------------
# Integer buckets
# ---------------------------------------------------------------------------------------

def test_offset_to_g_table():
  expected = {0: 0, 1: 1, 2: 2, 3: 2}
  expected.update({d: 3 for d in range(4, 14)})
  offs = np.arange(-13, 14)
  got = irpe.piecewise_index_int(offs)
  for d, g in zip(offs, got):
    assert g == np.sign(d) * expected[abs(int(d))], (d, g)
    assert ref_g_int(int(d)) == g


@pytest.mark.parametrize("grid", [7, 14])
def test_bucket_ids_vs_double_loop(grid):
  got = irpe.bucket_ids(grid)
  assert got.dtype == np.int32 and got.shape == (1 + grid * grid,) * 2
  np.testing.assert_array_equal(got, ref_bucket_ids(grid))
  assert got.min() == 0 and got.max() == 49 == irpe.NUM_BUCKETS - 1
  assert irpe.bucket_ids(grid) is got  # cached


# ---------------------------------------------------------------------------------------
# Continuous lookup
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [7, 14])
@pytest.mark.parametrize("shift", [(0.0, 0.0), (0.37, -1.21)])
def test_continuous_table_vs_numpy_sampler(grid, shift):
  rng = np.random.default_rng(0)
  table = rng.standard_normal((3, 50))
  want = ref_continuous_table(table, grid, shift)
  with jax.enable_x64(True):
    fn = jax.jit(irpe.continuous_table, static_argnums=1)
    got = fn(jnp.asarray(table), grid, jnp.asarray(shift, jnp.float64))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def test_zero_shift_pixel_coordinates_match_spec():
  spec = {0: 3.0, 1: 3 + 0.921, 2: 3 + 1.793, 3: 3 + 2.134, 6: 3 + 2.718}
  spec.update({-d: 6 - p for d, p in spec.items()})
  grid = 7
  # Table encoding its own index: channel 0 = b (last 7x7 axis), channel 1 = a (first axis).
  a, b = np.divmod(np.arange(49), 7)
  table = np.zeros((2, 50))
  table[0, :49], table[1, :49] = b, a
  table[:, 49] = -5.0
  with jax.enable_x64(True):
    r = np.asarray(irpe.continuous_table(jnp.asarray(table), grid, jnp.zeros(2)))
    pix_b, pix_a = (np.asarray(p) for p in irpe.continuous_pixels(grid, jnp.zeros(2, jnp.float64)))
  np.testing.assert_array_equal(r[:, 0, :], -5.0)
  np.testing.assert_array_equal(r[:, :, 0], -5.0)
  n = np.arange(grid * grid)
  drow = (n // grid)[:, None] - (n // grid)[None, :]
  dcol = (n % grid)[:, None] - (n % grid)[None, :]
  for d, p in spec.items():
    # Interior pixels: bilinear of a linear ramp returns the pixel itself.
    np.testing.assert_allclose(r[0, 1:, 1:][drow == d], p, atol=1e-3)   # ROW offset -> last axis
    np.testing.assert_allclose(r[1, 1:, 1:][dcol == d], p, atol=1e-3)   # col offset -> first axis
    np.testing.assert_allclose(pix_b[drow == d], p, atol=1e-3)
    np.testing.assert_allclose(pix_a[dcol == d], p, atol=1e-3)


def test_piecewise_index_cont_values_and_grads():
  xs = np.array([0.0, 0.5, -1.9, 2.5, -3.0, 7.0, -20.0, 15.2 + 1e-3])
  with jax.enable_x64(True):
    g = irpe.piecewise_index_cont(jnp.asarray(xs))
    np.testing.assert_allclose(np.asarray(g), [ref_g_cont(x) for x in xs], rtol=1e-14)
    grads = np.asarray(jax.vmap(jax.grad(irpe.piecewise_index_cont))(jnp.asarray(xs)))
  assert np.all(np.isfinite(grads))
  for x, gr in zip(xs, grads):
    if abs(x) <= ALPHA:
      want = 1.0
    elif abs(x) > GAMMA:
      want = 0.0  # clipped at beta
    else:
      want = (BETA - ALPHA) / (math.log(GAMMA / ALPHA) * abs(x))
    assert gr == pytest.approx(want, rel=1e-12, abs=1e-15), x


# ---------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------

B, H, HD = 2, 2, 4


def _params(module, q, mask, **overrides):
  """Both collections ("params": the table, "adversary": adv_*), zero-initialised, with
  `overrides` put where init placed them."""
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.asarray(q), None if mask is None else jnp.asarray(mask))
  out = {col: dict(variables.get(col, {})) for col in ("params", "adversary")}
  for col in out.values():
    for name, val in col.items():
      assert np.all(np.asarray(val) == 0), name   # zero init, like the original
  for name, val in overrides.items():
    col = next(c for c in out.values() if name in c)
    col[name] = jnp.asarray(val)
  return out


@pytest.mark.parametrize("grid", [3, 4])
def test_integer_bias_vs_numpy(grid):
  rng = np.random.default_rng(1)
  t = 1 + grid * grid
  q = rng.standard_normal((B, H, t, HD))
  w = rng.standard_normal((HD, 50))
  mod = RelativePositionKey(head_dim=HD, grid=grid)
  with jax.enable_x64(True):
    variables = _params(mod, q, None, lookup_table=w)
    assert set(variables["params"]) == {"lookup_table"} and not variables["adversary"]
    got = np.asarray(mod.apply(variables, jnp.asarray(q)))
  want = np.einsum("bhid,dij->bhij", q, w[:, ref_bucket_ids(grid)])
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  # float32 in -> float32 out
  got32 = mod.apply({"params": {"lookup_table": jnp.asarray(w, jnp.float32)}}, jnp.asarray(q, jnp.float32))
  assert got32.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got32), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grid", [3, 7])
def test_integer_table_and_gather_form_vs_numpy(grid):
  """`integer_table` (R materialised by a one-hot matmul, the benchmark's reference form)
  is W[:, bucket]; `integer_bias` (q W, then a gather) equals contracting q with it."""
  rng = np.random.default_rng(2)
  t = 1 + grid * grid
  w = rng.standard_normal((HD, 50))
  q = rng.standard_normal((2, 3, t, HD))
  ids = ref_bucket_ids(grid)
  with jax.enable_x64(True):
    r = np.asarray(jax.jit(irpe.integer_table, static_argnums=1)(jnp.asarray(w), grid))
    got = np.asarray(jax.jit(irpe.integer_bias, static_argnums=1)(
        jnp.einsum("bhid,dk->bhik", jnp.asarray(q), jnp.asarray(w)), grid))
  np.testing.assert_array_equal(r, w[:, ids])
  np.testing.assert_allclose(got, np.einsum("bhid,dij->bhij", q, w[:, ids]), rtol=1e-12,
                             atol=1e-12)


def test_continuous_lookup_module_vs_numpy():
  rng = np.random.default_rng(2)
  grid = 4
  q = rng.standard_normal((B, H, 1 + grid * grid, HD))
  w = rng.standard_normal((HD, 50))
  mod = RelativePositionKey(head_dim=HD, grid=grid, lookup="continuous")
  with jax.enable_x64(True):
    got = np.asarray(mod.apply({"params": {"lookup_table": jnp.asarray(w)}}, jnp.asarray(q)))
  want = np.einsum("bhid,dij->bhij", q, ref_continuous_table(w, grid, (0.0, 0.0)))
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_embedding_working_variant_bias_vs_numpy():
  rng = np.random.default_rng(3)
  grid = 3
  q = rng.standard_normal((B, H, 1 + grid * grid, HD))
  mask = rand_mask(rng, B, grid)
  w, a = rng.standard_normal((2, HD, 50))
  mod = RelativePositionKey(head_dim=HD, grid=grid, adversary="embedding")
  with jax.enable_x64(True):
    variables = _params(mod, q, mask, lookup_table=w, adv_table=a)
    got = np.asarray(mod.apply(variables, jnp.asarray(q), jnp.asarray(mask)))
  ids = ref_bucket_ids(grid)
  want = (np.einsum("bhid,dij->bhij", q, w[:, ids])
          + mask[:, None, :, None] * np.einsum("bhid,dij->bhij", q, a[:, ids]))
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_coordinate_bias_vs_numpy_and_forces_continuous():
  rng = np.random.default_rng(4)
  grid = 3
  q = rng.standard_normal((B, H, 1 + grid * grid, HD))
  mask = rand_mask(rng, B, grid)
  w = rng.standard_normal((HD, 50))
  shift = np.array([0.43, -0.71])
  mod = RelativePositionKey(head_dim=HD, grid=grid, adversary="coordinate")  # lookup default
  with jax.enable_x64(True):
    variables = _params(mod, q, mask, lookup_table=w, adv_shift=shift)
    got = np.asarray(mod.apply(variables, jnp.asarray(q), jnp.asarray(mask)))
  r0 = ref_continuous_table(w, grid, (0.0, 0.0))
  rs = ref_continuous_table(w, grid, shift)
  want = np.where(mask[:, None, :, None],
                  np.einsum("bhid,dij->bhij", q, rs), np.einsum("bhid,dij->bhij", q, r0))
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _grad_setup(seed, grid=3):
  rng = np.random.default_rng(seed)
  t = 1 + grid * grid
  q, k, v, c = rand_qkv(rng, B, H, t, HD)
  return rng, grid, q, k, v, c, rand_mask(rng, B, grid)


def test_faithful_embedding_is_noop_and_working_variant_is_not():
  rng, grid, q, k, v, c, mask = _grad_setup(5)
  w = rng.standard_normal((HD, 50))
  with jax.enable_x64(True):
    qj, kj, vj, cj, mj = map(jnp.asarray, (q, k, v, c, mask))

    faithful = RelativePositionKey(head_dim=HD, grid=grid, adversary="embedding_faithful")
    a = rng.standard_normal(HD)
    fv = _params(faithful, q, mask, lookup_table=w, adv_token=a)
    assert fv["adversary"]["adv_token"].shape == (HD,)

    def loss_f(a):
      return jax_attention_loss(qj, kj, vj, faithful.apply(dict(fv, adversary=a), qj, mj), cj)

    gf = jax.jit(jax.grad(loss_f))(fv["adversary"])["adv_token"]
    assert np.max(np.abs(np.asarray(gf))) < 1e-12
    # The bias itself is non-trivially changed (a per-row constant) ...
    bias = np.asarray(faithful.apply(fv, qj, mj))
    want = (np.einsum("bhid,dij->bhij", q, w[:, ref_bucket_ids(grid)])
            + mask[:, None, :, None] * np.einsum("bhid,d->bhi", q, a)[..., None])
    np.testing.assert_allclose(bias, want, rtol=1e-12, atol=1e-12)
    # ... but the attention loss is not.
    base = ref_attention_loss(q, k, v, np.einsum("bhid,dij->bhij", q, w[:, ref_bucket_ids(grid)]), c)
    assert float(loss_f(fv["adversary"])) == pytest.approx(base, rel=1e-12)

    working = RelativePositionKey(head_dim=HD, grid=grid, adversary="embedding")
    wv = _params(working, q, mask, lookup_table=w)   # adv_table left at zero

    def loss_w(a):
      return jax_attention_loss(qj, kj, vj, working.apply(dict(wv, adversary=a), qj, mj), cj)

    gw = np.asarray(jax.jit(jax.grad(loss_w))(wv["adversary"])["adv_table"])
    assert gw.shape == (HD, 50) and np.max(np.abs(gw)) > 1e-3


def test_coordinate_gradient_matches_finite_difference():
  rng, grid, q, k, v, c, mask = _grad_setup(6)
  w = rng.standard_normal((HD, 50))
  shift = np.array([0.29, -0.53])
  mod = RelativePositionKey(head_dim=HD, grid=grid, lookup="continuous", adversary="coordinate")
  with jax.enable_x64(True):
    qj, kj, vj, cj, mj = map(jnp.asarray, (q, k, v, c, mask))
    def loss(s, table):
      v = {"params": {"lookup_table": table}, "adversary": {"adv_shift": s}}
      return jax_attention_loss(qj, kj, vj, mod.apply(v, qj, mj), cj)

    loss = jax.jit(loss)
    g = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(shift), jnp.asarray(w)))
    eps = 1e-6
    fd = np.array([(float(loss(jnp.asarray(shift + eps * e), jnp.asarray(w)))
                    - float(loss(jnp.asarray(shift - eps * e), jnp.asarray(w)))) / (2 * eps)
                   for e in np.eye(2)])
    assert np.all(np.abs(g) > 1e-4)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
    # Zero table (the original's init): the shift gradient is exactly 0 (spec 9.4).
    g0 = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(shift), jnp.zeros((HD, 50))))
    np.testing.assert_array_equal(g0, 0.0)


def test_param_names_and_validation():
  grid = 2
  q = jnp.zeros((1, 1, 5, HD))
  m = jnp.zeros((1, 5), bool)
  for adv, name, shape in [("embedding_faithful", "adv_token", (HD,)),
                           ("embedding", "adv_table", (HD, 50)),
                           ("coordinate", "adv_shift", (2,))]:
    mod = RelativePositionKey(head_dim=HD, grid=grid, adversary=adv)
    v = jax.eval_shape(mod.init, jax.random.PRNGKey(0), q, m)
    assert set(v) == {"params", "adversary"}
    assert set(v["params"]) == {"lookup_table"}
    assert set(v["adversary"]) == {name} and v["adversary"][name].shape == shape
    # The adversary exists even when initialised without a mask ...
    v2 = jax.eval_shape(mod.init, jax.random.PRNGKey(0), q)
    assert jax.tree.map(lambda x: x.shape, v2) == jax.tree.map(lambda x: x.shape, v)
    # ... and is neither needed nor read without one (frozen-encoder features).
    zeros = {"lookup_table": jnp.zeros((HD, 50))}
    assert mod.apply({"params": zeros}, q).shape == (1, 1, 5, 5)
    with pytest.raises(Exception, match="adversary"):
      mod.apply({"params": zeros}, q, m)
  for bad in [dict(grid=grid, adversary="bogus"), dict(grid=grid, lookup="bogus"), dict(grid=3)]:
    with pytest.raises(ValueError):
      jax.eval_shape(RelativePositionKey(head_dim=HD, **bad).init, jax.random.PRNGKey(0), q)


def test_bfloat16_queries_keep_dtype_and_accurate_geometry():
  rng = np.random.default_rng(7)
  grid = 3
  q = rng.standard_normal((1, 1, 1 + grid * grid, HD))
  mask = rand_mask(rng, 1, grid)
  w = rng.standard_normal((HD, 50))
  shift = np.array([0.43, -0.71])
  mod = RelativePositionKey(head_dim=HD, grid=grid, adversary="coordinate")
  p = {"params": {"lookup_table": jnp.asarray(w, jnp.float32)},
       "adversary": {"adv_shift": jnp.asarray(shift, jnp.float32)}}
  got = jax.jit(mod.apply)(p, jnp.asarray(q, jnp.bfloat16), jnp.asarray(mask))
  assert got.dtype == jnp.bfloat16
  qb = np.asarray(jnp.asarray(q, jnp.bfloat16).astype(jnp.float32), np.float64)
  want = np.where(mask[:, None, :, None],
                  np.einsum("bhid,dij->bhij", qb, ref_continuous_table(w, grid, shift)),
                  np.einsum("bhid,dij->bhij", qb, ref_continuous_table(w, grid, (0.0, 0.0))))
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=0.02, atol=0.05)
