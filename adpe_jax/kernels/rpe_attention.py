"""Fused iRPE-K attention in Pallas: q.k^T + the contextual RPE term, float32 softmax,
times v, and a `jax.custom_vjp` backward giving the gradients of q, k, v, the RPE table
W, the per-bucket adversary table, the faithful adversary token and the coordinate
adversary's shift -- without a (B, H, T, T) tensor in HBM in either pass.

The computation, per (batch b, head h), with qr the RPE query (normally q itself):

    S[i, j] = q_i . k_j + sum_c w_c(i, j) QW_i[id_c(i, j)],   QW_i = qr_i @ (W + m_i A)
    out = softmax_f32(S) v

* integer lookup: one "corner", id = bucket(i, j), weight 1 (no weight input at all);
* continuous lookup (spec 4.5 / 5.5): four bilinear corners of the 7x7 table with ids
  7a + b (-1 where zero padding applies) and weights w_c (0 there); cls pairs read bucket
  49 with weight 1.  The coordinate adversary gives masked query rows (m_i = 1) a second
  geometry, ids and weights of the offsets shifted by `adv_shift`;
* per-bucket embedding adversary: A (hd, 50) added to W for masked rows (the QW_i above);
* faithful embedding adversary (the original's no-op, spec 4.4): m_i qr_i . a added to
  every logit of row i, carried as lane 52 of the extended table.

Kernel inputs: bucket / corner ids and weights, NOT a precomputed bias.  The geometry
(ids (C, T, T) int32, weights (C, T, T) float32, C = 1 or 4) depends on neither the batch
nor the head, so it is one small array per layer (1 MiB per array at T = 197 -> 256),
read from L2 by every program, and the shifted geometry is just a second such array
selected per row by the query mask.  A precomputed bias is q-dependent -- exactly the
(B, H, T, T) tensor we must not write -- and a precomputed R = W[:, ids] is (hd, T, T) per
layer, hd times the ids, and would turn the RPE term into a (T x hd) . (hd x T)
contraction per ROW instead of the single (T x hd) @ (hd x 64) matmul QW = qr @ W done
in-kernel.  The gather
QW_i[id_c(i, j)] is a loop over the 50 buckets of compare/select on the (block_q, T) tile
(no gather instruction is needed; Triton and Mosaic have none for register tiles).  That
loop is element-wise work on CUDA cores, 50 x C compare/selects per logit: at T = 64,
hd = 64 it is of the order of the tile's matmul work, so the speed-up over XLA comes from
not writing / re-reading (B, H, T, T) tensors, and is unmeasured (no GPU so far).

Gradients (backward kernel, one program per (b, h), a loop over query blocks, dk / dv
accumulated in float32): P is recomputed from q, k (the whole key length is one tile, so
no running max / lse residual is needed), dS = P (dP - rowsum(P dP)).  The RPE gradient
leaves the kernel as dQW (B, H, T, 64) float32 -- q-sized, not L x L:
dQW_i[n] = sum_j dS_ij sum_c w_c(i, j) [id_c(i, j) = n]; then dW = qr^T dQW,
dA = (m qr)^T dQW (one einsum each, outside), and d qr = dQW @ (W + m A)^T in-kernel.
The shift gradient goes through d w_c / d shift: the jacobian of the shifted corner
weights (2, C, T, T) (forward-mode `jax.jacfwd` of the same jnp geometry function --
piecewise map, clip, floor without gradient; independent of b and h) enters the
kernel, which accumulates per masked row sum_j dS_ij sum_c (d w_c / d s_r) QW_i[id_c]
into lanes 50 / 51 of dQW; their sum over (b, h, i) is d loss / d shift.  Lane 52 carries
m_i rowsum(dS_i), the faithful token's (round-off) gradient.  Lanes: 0-49 buckets,
50/51 shift, 52 faithful token, 53-63 zero (the bucket axis is padded to 64 anyway).

Backend (GPU): the Triton lowering of `pl.pallas_call` (`CompilerParams` from
`jax.experimental.pallas.triton`).  It is deprecated on jax 0.11 but present; Mosaic GPU
wants block sizes in multiples of 64, head_dim % 64 == 0 (ViT-H's head_dim is 80), and
its `pallas_call` entry point is itself deprecated in favour of `plgpu.kernel` with
explicit warpgroup / SMEM pipelining -- a rewrite, not a port -- while the Triton path
lowers this generic jnp kernel (iota, compare, select, reductions, 2-D dots, fori_loop)
as is and runs on Ampere too.  Triton wants power-of-two array shapes: T is padded to
the next power of two (50 -> 64, 197 -> 256, 257 -> 512; padded keys masked to -inf,
padded query rows dropped), head_dim to the next power of two (64 stays, 80 -> 128;
zero columns change no dot product), the bucket axis to 64.  The whole key length is one
tile (50 and 197 fit; 257 -> 512 is wasteful: a key-blocked online-softmax variant is
the next step there).  Query blocks: 64 rows at T <= 64, fewer at longer T (register
pressure: the (block_q, T) tiles of logits, ids and weights live together).  On TPU the
same kernel uses Mosaic TPU with block_q = T (blocks equal to the full array are legal
for any length).  tests/test_kernels.py lowers both kernels for CUDA (Triton IR) and TPU
(Mosaic) on a CPU; compiling them to device code, and all timings, need the device
(benchmarks/gpu_check.sh).  On CPU the kernels run with ``interpret=True``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from adpe_jax.kernels import irpe as rpe_lib

NB = rpe_lib.NUM_BUCKETS          # 50 buckets (49 + cls)
NBP = 64                          # padded bucket lanes
LANE_SHIFT = NB                   # 50, 51: d loss / d (row shift, col shift) per row
LANE_TOKEN = NB + 2               # 52: the faithful adversary token
SIDE = rpe_lib.SIDE


@dataclasses.dataclass(frozen=True)
class _Cfg:
  t: int                # true length
  tp: int               # padded length
  dp: int               # padded head dim
  bq: int               # query block
  geometry: str         # "none" | "integer" | "continuous"
  shifted: bool         # coordinate adversary: masked rows use the shifted geometry
  per_bucket: bool      # per-bucket adversary table A
  faithful: bool        # faithful adversary token (lane 52)
  separate_query: bool  # RPE query differs from q
  grid: int
  backend: str          # "interpret" | "triton" | "tpu"

  @property
  def corners(self) -> int:
    return 4 if self.geometry == "continuous" else 1

  @property
  def masked(self) -> bool:
    return self.shifted or self.per_bucket or self.faithful


def _next_pow2(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << (int(n) - 1).bit_length())


def _backend() -> str:
  b = jax.default_backend()
  if b == "gpu":
    return "triton"
  if b == "tpu":
    return "tpu"
  return "interpret"


# ----------------------------------------------------------------------------------------
# Geometry: corner ids and weights (C, Tp, Tp), shared by every batch element and head
# ----------------------------------------------------------------------------------------

def integer_geometry(grid: int, tp: int) -> np.ndarray:
  """ids (1, tp, tp) int32: the bucket of each pair, -1 in the padding."""
  t = 1 + grid * grid
  ids = np.full((1, tp, tp), -1, np.int32)
  ids[0, :t, :t] = rpe_lib.bucket_ids(grid)
  return ids


def continuous_geometry(grid: int, tp: int, shift: jax.Array,
                        dtype) -> tuple[jax.Array, jax.Array]:
  """(ids (4, tp, tp) int32, weights (4, tp, tp) dtype) of the bilinear lookup at `shift`.

  The same arithmetic as `rpe.continuous_table` (pixels from `rpe.continuous_pixels`,
  floor without gradient, zero padding): corner (da, db) of pixel (a, b) reads bucket
  7 (a0 + da) + (b0 + db) with weight wa_da wb_db, or nothing when outside the 7x7.
  Differentiable in `shift` (through the weights).
  """
  t = 1 + grid * grid
  pix_b, pix_a = rpe_lib.continuous_pixels(grid, jnp.asarray(shift).astype(dtype), dtype)
  a0 = lax.stop_gradient(jnp.floor(pix_a))
  b0 = lax.stop_gradient(jnp.floor(pix_b))
  wa = ((a0 + 1) - pix_a, pix_a - a0)
  wb = ((b0 + 1) - pix_b, pix_b - b0)
  ids, ws = [], []
  for da in (0, 1):
    for db in (0, 1):
      a, b = a0 + da, b0 + db
      valid = (a >= 0) & (a < SIDE) & (b >= 0) & (b < SIDE)
      ids.append(jnp.where(valid, (SIDE * a + b).astype(jnp.int32), -1))
      ws.append(jnp.where(valid, wa[da] * wb[db], jnp.zeros((), dtype)))
  ids_full = jnp.full((4, tp, tp), -1, jnp.int32).at[:, 1:t, 1:t].set(jnp.stack(ids))
  ws_full = jnp.zeros((4, tp, tp), dtype).at[:, 1:t, 1:t].set(jnp.stack(ws))
  cls = rpe_lib.CLS_BUCKET
  ids_full = ids_full.at[0, 0, :t].set(cls).at[0, :t, 0].set(cls)
  ws_full = ws_full.at[0, 0, :t].set(1).at[0, :t, 0].set(1)
  return ids_full, ws_full


def _geometry_inputs(cfg: _Cfg, shift, acc_dtype) -> dict:
  """The geometry arrays the kernels read (keys: ids, wts, ids_s, wts_s)."""
  out = {}
  if cfg.geometry == "integer":
    out["ids"] = jnp.asarray(integer_geometry(cfg.grid, cfg.tp))
  elif cfg.geometry == "continuous":
    out["ids"], out["wts"] = continuous_geometry(cfg.grid, cfg.tp, jnp.zeros((2,), acc_dtype),
                                                 acc_dtype)
    if cfg.shifted:
      out["ids_s"], out["wts_s"] = continuous_geometry(cfg.grid, cfg.tp, shift, acc_dtype)
  return out


def _shift_jacobian(cfg: _Cfg, shift, acc_dtype) -> jax.Array:
  """d weights / d shift of the shifted geometry, (2 * 4, tp, tp): index r * 4 + c."""
  jac = jax.jacfwd(lambda s: continuous_geometry(cfg.grid, cfg.tp, s, acc_dtype)[1])(
      shift.astype(acc_dtype))                                   # (4, tp, tp, 2)
  return jnp.moveaxis(jac, -1, 0).reshape(2 * 4, cfg.tp, cfg.tp)


# ----------------------------------------------------------------------------------------
# Kernel pieces (traced inside both kernels; only 2-D tiles, jnp ops Triton lowers)
# ----------------------------------------------------------------------------------------

def _mask_value(dtype):
  return -0.7 * float(jnp.finfo(dtype).max)


def _lane(n_lanes=NBP):
  return jnp.arange(n_lanes, dtype=jnp.int32)[None, :]


def _column(x, n):
  """x[:, n] as (rows, 1) for a traced n (no dynamic register indexing on GPU)."""
  return jnp.sum(jnp.where(_lane(x.shape[1]) == n, x, jnp.zeros((), x.dtype)), axis=1,
                 keepdims=True)


class _Tile:
  """What a (block_q, Tp) tile of one (b, h) needs, loaded from the refs."""

  def __init__(self, cfg: _Cfg, refs: dict, rows, acc):
    self.cfg, self.acc = cfg, acc
    self.q = refs["q"][rows, :]
    self.qr = refs["qr"][rows, :] if cfg.separate_query else self.q
    self.m = refs["mask"][0, rows][:, None].astype(acc) if cfg.masked else None
    self.ids, self.wts = [], None
    if cfg.geometry == "none":
      return
    for c in range(cfg.corners):
      ids = refs["ids"][c, rows, :]
      if cfg.shifted:
        ids = jnp.where(self.m > 0, refs["ids_s"][c, rows, :], ids)
      self.ids.append(ids)
    if cfg.geometry == "continuous":
      self.wts = []
      for c in range(4):
        w = refs["wts"][c, rows, :]
        if cfg.shifted:
          w = jnp.where(self.m > 0, refs["wts_s"][c, rows, :], w)
        self.wts.append(w)
    # QW = qr @ W (+ m qr @ A): (block_q, 64), float32 accumulation.
    w_ext = refs["w"][...].astype(self.qr.dtype)
    self.qw = jnp.dot(self.qr, w_ext, preferred_element_type=acc)
    if cfg.per_bucket:
      qa = jnp.dot(self.qr, refs["a"][...].astype(self.qr.dtype), preferred_element_type=acc)
      self.qw = self.qw + self.m * qa

  def coef(self, n, weights=None):
    """sum_c weights_c [id_c == n] on the tile (weights: list of tiles, None = all 1)."""
    out = None
    for c, ids in enumerate(self.ids):
      hit = ids == n
      if weights is None:
        term = hit.astype(self.acc)
      else:
        term = jnp.where(hit, weights[c], jnp.zeros((), self.acc))
      out = term if out is None else out + term
    return out

  def bias(self):
    """The RPE logit term (block_q, Tp): the gather of QW by bucket / corners."""
    cfg, acc = self.cfg, self.acc
    zeros = jnp.zeros((self.q.shape[0], cfg.tp), acc)

    def body(n, b):
      col = _column(self.qw, n)
      if cfg.geometry == "integer":
        return jnp.where(self.ids[0] == n, col, b)
      return b + self.coef(n, self.wts) * col

    b = lax.fori_loop(0, NB, body, zeros)
    if cfg.faithful:
      b = b + self.m * _column(self.qw, LANE_TOKEN)
    return b

  def logits(self, k):
    s = lax.dot_general(self.q, k, (((1,), (1,)), ((), ())), preferred_element_type=self.acc)
    if self.cfg.geometry != "none":
      s = s + self.bias()
    key_ok = jnp.arange(self.cfg.tp, dtype=jnp.int32)[None, :] < self.cfg.t
    return jnp.where(key_ok, s, _mask_value(self.acc))


def _softmax(s):
  p = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
  return p / jnp.sum(p, axis=1, keepdims=True)


def _fwd_kernel(cfg: _Cfg, names, *refs):
  refs = dict(zip(names + ("o",), refs))
  acc = jnp.promote_types(refs["q"].dtype, jnp.float32)
  tile = _Tile(cfg, refs, slice(None), acc)
  v = refs["v"][...]
  p = _softmax(tile.logits(refs["k"][...]))
  o = jnp.dot(p.astype(v.dtype), v, preferred_element_type=acc)
  refs["o"][...] = o.astype(refs["o"].dtype)


def _bwd_kernel(cfg: _Cfg, names, out_names, *refs):
  refs = dict(zip(names + ("do",) + out_names, refs))
  acc = jnp.promote_types(refs["q"].dtype, jnp.float32)
  k, v = refs["k"][...], refs["v"][...]
  bq, tp, dp = cfg.bq, cfg.tp, cfg.dp
  rpe = cfg.geometry != "none"

  def block(i, carry):
    dk, dv = carry
    rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
    tile = _Tile(cfg, refs, rows, acc)
    p = _softmax(tile.logits(k))
    do = refs["do"][rows, :]
    dp_ = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    ds = p * (dp_ - jnp.sum(p * dp_, axis=1, keepdims=True))
    dsc = ds.astype(k.dtype)
    dq = jnp.dot(dsc, k, preferred_element_type=acc)
    dk = dk + lax.dot_general(dsc, tile.q, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    dv = dv + lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                              preferred_element_type=acc)
    if rpe:
      dws = None
      if cfg.shifted:
        dws = [[jnp.where(tile.m > 0, refs["dws"][r * 4 + c, rows, :], jnp.zeros((), acc))
                for c in range(4)] for r in range(2)]

      def body(n, carry):
        dqw, g0, g1 = carry
        dcol = jnp.sum(ds * tile.coef(n, tile.wts), axis=1, keepdims=True)
        dqw = jnp.where(_lane() == n, dcol, dqw)
        if dws is not None:
          col = _column(tile.qw, n)
          g0 = g0 + col * jnp.sum(ds * tile.coef(n, dws[0]), axis=1, keepdims=True)
          g1 = g1 + col * jnp.sum(ds * tile.coef(n, dws[1]), axis=1, keepdims=True)
        return dqw, g0, g1

      zc = jnp.zeros((bq, 1), acc)
      dqw, g0, g1 = lax.fori_loop(0, NB, body, (jnp.zeros((bq, NBP), acc), zc, zc))
      if cfg.shifted:
        dqw = jnp.where(_lane() == LANE_SHIFT, g0, dqw)
        dqw = jnp.where(_lane() == LANE_SHIFT + 1, g1, dqw)
      if cfg.faithful:
        dqw = jnp.where(_lane() == LANE_TOKEN, tile.m * jnp.sum(ds, axis=1, keepdims=True), dqw)
      qdt = tile.qr.dtype
      nt = (((1,), (1,)), ((), ()))
      dqr = lax.dot_general(dqw.astype(qdt), refs["w"][...].astype(qdt), nt,
                            preferred_element_type=acc)
      if cfg.per_bucket:
        dqr = dqr + tile.m * lax.dot_general(dqw.astype(qdt), refs["a"][...].astype(qdt), nt,
                                             preferred_element_type=acc)
      refs["dqw"][rows, :] = dqw
      if cfg.separate_query:
        refs["dqr"][rows, :] = dqr.astype(refs["dqr"].dtype)
      else:
        dq = dq + dqr
    refs["dq"][rows, :] = dq.astype(refs["dq"].dtype)
    return dk, dv

  z = jnp.zeros((tp, dp), acc)
  dk, dv = lax.fori_loop(0, tp // bq, block, (z, z))
  refs["dk"][...] = dk.astype(refs["dk"].dtype)
  refs["dv"][...] = dv.astype(refs["dv"].dtype)


# ----------------------------------------------------------------------------------------
# pallas_call wrappers
# ----------------------------------------------------------------------------------------

def _compiler_params(cfg: _Cfg):
  if cfg.backend == "triton":
    from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415
    return pltriton.CompilerParams(num_warps=4 if cfg.dp <= 64 else 8, num_stages=2)
  return None


def _specs(cfg: _Cfg, arrays: dict, rows_block: bool):
  """BlockSpecs of the named inputs for grid (B, H[, query blocks])."""
  bq = cfg.bq if rows_block else cfg.tp
  if rows_block:
    row = lambda b, h, i: (b, h, i, 0)      # noqa: E731
    full_bh = lambda b, h, i: (b, h, 0, 0)  # noqa: E731
    mrow = lambda b, h, i: (b, 0, i)        # noqa: E731
    geo = lambda b, h, i: (0, i, 0)         # noqa: E731
    const = lambda b, h, i: (0, 0)          # noqa: E731
  else:
    row = full_bh = lambda b, h: (b, h, 0, 0)  # noqa: E731
    mrow = lambda b, h: (b, 0, 0)              # noqa: E731
    geo = lambda b, h: (0, 0, 0)               # noqa: E731
    const = lambda b, h: (0, 0)                # noqa: E731
  specs = {}
  for name, x in arrays.items():
    if name in ("q", "qr", "do"):
      specs[name] = pl.BlockSpec((None, None, bq, cfg.dp), row)
    elif name in ("k", "v"):
      specs[name] = pl.BlockSpec((None, None, cfg.tp, cfg.dp), full_bh)
    elif name == "mask":  # (B, 1, Tp): a (1, block) tile is legal on Mosaic TPU too
      specs[name] = pl.BlockSpec((None, 1, bq), mrow)
    elif name in ("ids", "wts", "ids_s", "wts_s", "dws"):
      specs[name] = pl.BlockSpec((x.shape[0], bq, cfg.tp), geo)
    elif name in ("w", "a"):
      specs[name] = pl.BlockSpec(x.shape, const)
    else:
      raise KeyError(name)
  return specs


def _kernel_inputs(cfg: _Cfg, q, k, v, qr, w, a, shift, mask) -> dict:
  acc = jnp.promote_types(q.dtype, jnp.float32)
  arrays = {"q": q, "k": k, "v": v}
  if cfg.separate_query:
    arrays["qr"] = qr
  if cfg.masked:
    arrays["mask"] = mask
  if cfg.geometry != "none":
    arrays["w"] = w
    if cfg.per_bucket:
      arrays["a"] = a
    arrays.update(_geometry_inputs(cfg, shift, acc))
  return arrays


def _forward(cfg: _Cfg, q, k, v, qr, w, a, shift, mask):
  arrays = _kernel_inputs(cfg, q, k, v, qr, w, a, shift, mask)
  names = tuple(arrays)
  specs = _specs(cfg, arrays, rows_block=True)
  b, h = q.shape[:2]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg, names),
      grid=(b, h, cfg.tp // cfg.bq),
      in_specs=[specs[n] for n in names],
      out_specs=pl.BlockSpec((None, None, cfg.bq, cfg.dp), lambda b, h, i: (b, h, i, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(cfg),
      interpret=cfg.backend == "interpret",
      name="rpe_attention_fwd",
  )(*arrays.values())


def _backward(cfg: _Cfg, res, do):
  q, k, v, qr, w, a, shift, mask = res
  acc = jnp.promote_types(q.dtype, jnp.float32)
  arrays = _kernel_inputs(cfg, q, k, v, qr, w, a, shift, mask)
  if cfg.shifted:
    arrays["dws"] = _shift_jacobian(cfg, shift, acc)
  names = tuple(arrays)
  arrays_do = dict(arrays, do=do)
  specs = _specs(cfg, arrays_do, rows_block=False)
  b, h = q.shape[:2]
  rpe = cfg.geometry != "none"
  out_names = ("dq", "dk", "dv") + (("dqr",) if cfg.separate_query else ()) + (
      ("dqw",) if rpe else ())
  bh = lambda b, h: (b, h, 0, 0)  # noqa: E731
  shapes = {"dq": jax.ShapeDtypeStruct(q.shape, q.dtype),
            "dk": jax.ShapeDtypeStruct(k.shape, k.dtype),
            "dv": jax.ShapeDtypeStruct(v.shape, v.dtype),
            "dqr": jax.ShapeDtypeStruct(q.shape, q.dtype),
            "dqw": jax.ShapeDtypeStruct((b, h, cfg.tp, NBP), acc)}
  out_specs = [pl.BlockSpec((None, None, cfg.tp, shapes[n].shape[-1]), bh) for n in out_names]
  outs = pl.pallas_call(
      functools.partial(_bwd_kernel, cfg, names, out_names),
      grid=(b, h),
      in_specs=[specs[n] for n in names + ("do",)],
      out_specs=out_specs,
      out_shape=[shapes[n] for n in out_names],
      compiler_params=_compiler_params(cfg),
      interpret=cfg.backend == "interpret",
      name="rpe_attention_bwd",
  )(*arrays.values(), do)
  return dict(zip(out_names, outs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg, q, k, v, qr, w, a, shift, mask):
  return _forward(cfg, q, k, v, qr, w, a, shift, mask)


def _fused_fwd(cfg, q, k, v, qr, w, a, shift, mask):
  return _forward(cfg, q, k, v, qr, w, a, shift, mask), (q, k, v, qr, w, a, shift, mask)


def _fused_bwd(cfg, res, do):
  q, k, v, qr, w, a, shift, mask = res
  g = _backward(cfg, res, do)
  dw = da = dshift = None
  if cfg.geometry != "none":
    dqw = g["dqw"]
    qr_ = qr if cfg.separate_query else q
    dw = jnp.einsum("bhtd,bhtn->dn", qr_, dqw, preferred_element_type=dqw.dtype)
    # lane 52 of dw is d loss / d (faithful token); lanes 50/51 are dropped by the .at[].set.
    if cfg.per_bucket:
      da = jnp.einsum("bhtd,bhtn->dn", qr_ * mask[:, :, :, None].astype(qr_.dtype), dqw,
                      preferred_element_type=dqw.dtype).astype(a.dtype)
    dw = dw.astype(w.dtype)
    if cfg.shifted:
      dshift = jnp.sum(dqw[..., LANE_SHIFT:LANE_SHIFT + 2], axis=(0, 1, 2)).astype(shift.dtype)
  dmask = None if mask is None else jnp.zeros_like(mask)
  return (g["dq"], g["dk"], g["dv"], g.get("dqr"), dw, da, dshift, dmask)


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------

def default_block_q(tp: int, backend: str) -> int:
  if backend == "tpu":
    return tp
  return min(tp, max(16, 8192 // tp))


def pallas_attention(q, k, v, rpe=None, *, block_q: Optional[int] = None):
  """The fused kernel behind `attention(..., impl="pallas")`; same contract as
  `adpe_jax.kernels.attention.xla_attention`: (B, T, H, hd) x3 -> (B, T, H, hd)."""
  b, t, h, d = q.shape
  backend = _backend()
  tp = _next_pow2(t)
  dp = _next_pow2(d)
  bq = block_q or default_block_q(tp, backend)
  if tp % bq or bq > tp:
    raise ValueError(f"block_q={bq} must divide the padded length {tp}.")
  dtype = q.dtype
  acc = jnp.promote_types(dtype, jnp.float32)

  def prep(x):  # (B, T, H, d) -> (B, H, Tp, dp), zero padded
    x = x.astype(dtype).transpose(0, 2, 1, 3)
    return jnp.pad(x, ((0, 0), (0, 0), (0, tp - t), (0, dp - d)))

  geometry, kind, separate = "none", "none", False
  qr = w = a = shift = mask = None
  grid = 0
  if rpe is not None:
    grid, kind = rpe.grid, rpe.adversary
    if t != 1 + grid * grid:
      raise ValueError(f"sequence length {t} != 1 + grid**2 = {1 + grid ** 2} (cls first).")
    geometry = rpe.lookup
    separate = rpe.query is not None
    if separate:
      qr = prep(rpe.query)
    # The extended table (dp, 64): buckets 0-49, lane 52 = the faithful token.
    w = jnp.zeros((dp, NBP), acc).at[:d, :NB].set(rpe.table.astype(acc))
    if kind == "embedding_faithful":
      w = w.at[:d, LANE_TOKEN].set(rpe.adv.astype(acc))
    elif kind == "embedding":
      a = jnp.zeros((dp, NBP), acc).at[:d, :NB].set(rpe.adv.astype(acc))
    elif kind == "coordinate":
      shift = rpe.adv.astype(acc)
    if kind != "none":
      mask = jnp.pad(jnp.asarray(rpe.query_mask).astype(acc), ((0, 0), (0, tp - t)))[:, None]
  cfg = _Cfg(t=t, tp=tp, dp=dp, bq=bq, geometry=geometry, shifted=kind == "coordinate",
             per_bucket=kind == "embedding", faithful=kind == "embedding_faithful",
             separate_query=separate, grid=grid, backend=backend)
  out = _fused(cfg, prep(q), prep(k), prep(v), qr, w, a, shift, mask)
  return out[:, :, :t, :d].transpose(0, 2, 1, 3).astype(v.dtype)
