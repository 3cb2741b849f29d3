"""Fused iRPE-K attention in Pallas, and its plain-jnp reference.

    rpe_attention(q, k, v, rpe, block_sizes=None, interpret=None, debug=False)
      == rpe_attention_reference(q, k, v, rpe)
      == softmax_f32(q k^T + irpe.rpe_bias(q_rpe)) v

The kernel computes the iRPE term from QW = q W and bucket / corner ids
(`integer_geometry`, `continuous_geometry`), never a (B, H, T, T) tensor in HBM, and a
`jax.custom_vjp` backward gives the gradients of q, k, v, the table W and every
adversary.  `BlockSizes` is the tiling (defaults per backend); the kernel lowers to
Triton on GPUs and Mosaic on TPUs and runs in the Pallas interpreter on CPU.  The design
(inputs, the bucket loop, the gradient lanes, padding, backends): docs/kernels.md.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Optional

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from adpe_jax.kernels import irpe

NB = irpe.NUM_BUCKETS     # 50 buckets (49 + cls)
NBP = 64                  # padded bucket lanes
LANE_SHIFT = NB           # 50, 51: d loss / d (row shift, col shift) per row
LANE_TOKEN = NB + 2       # 52: the faithful adversary token
SIDE = irpe.SIDE

# jax 0.11 deprecates the Pallas Triton backend and warns at every Triton lowering (when
# the jit around the whole step compiles).  The fused kernel is Triton on purpose
# (docs/kernels.md: Mosaic GPU wants head_dim % 64 == 0 and a rewrite), so the warning is
# ours to carry, not the user's: `_quiet_triton_deprecation` ignores exactly this text.
TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
  """Tile sizes of the two kernels.  They decide how the work is split into programs and
  loop steps, never what is computed (that is the operands' business).

  Attributes:
    block_q: query rows per program of the forward kernel; must divide the padded length
      (T rounded up to a power of two, at least 16).
    block_q_bwd: query rows per step of the backward kernel's loop over query blocks;
      None = block_q.
  """
  block_q: int
  block_q_bwd: Optional[int] = None

  @classmethod
  def get_default(cls, seq_len: int, backend: Optional[str] = None) -> "BlockSizes":
    """The defaults for `seq_len` tokens on `backend` ("gpu" | "tpu" | ...; None = jax's
    default backend).  TPU: the whole padded length (a block equal to the full array is
    legal on Mosaic TPU for any length).  Elsewhere (GPU, interpret mode): 64 rows at
    T <= 64, fewer at longer T, since the (block_q, T) tiles of logits, ids and weights
    live in registers together."""
    tp = padded_length(seq_len)
    if (backend or jax.default_backend()) == "tpu":
      return cls(block_q=tp)
    return cls(block_q=min(tp, max(16, 8192 // tp)))


@dataclasses.dataclass(frozen=True)
class _Problem:
  """What the kernels compute (static: a hashable argument of the custom_vjp)."""
  t: int                # true length
  tp: int               # padded length
  dp: int               # padded head dim
  geometry: str         # "none" | "integer" | "continuous"
  shifted: bool         # coordinate adversary: masked rows use the shifted geometry
  per_bucket: bool      # per-bucket adversary table A
  faithful: bool        # faithful adversary token (lane 52)
  separate_query: bool  # RPE query differs from q
  grid: int

  @property
  def corners(self) -> int:
    return 4 if self.geometry == "continuous" else 1

  @property
  def masked(self) -> bool:
    return self.shifted or self.per_bucket or self.faithful


@dataclasses.dataclass(frozen=True)
class _Launch:
  """How the kernels are launched: resolved tiling, compile target, interpreter, debug."""
  block_q: int
  block_q_bwd: int
  backend: str          # "gpu" (Triton) | "tpu" (Mosaic TPU) | other (interpret only)
  interpret: bool
  debug: bool


def _next_pow2(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << (int(n) - 1).bit_length())


def padded_length(seq_len: int) -> int:
  """The length the kernels work at: T rounded up to a power of two, at least 16."""
  return _next_pow2(seq_len)


# ----------------------------------------------------------------------------------------
# Geometry: corner ids and weights (C, Tp, Tp), shared by every batch element and head
# ----------------------------------------------------------------------------------------

def integer_geometry(grid: int, tp: int) -> np.ndarray:
  """ids (1, tp, tp) int32: the bucket of each pair, -1 in the padding."""
  t = 1 + grid * grid
  ids = np.full((1, tp, tp), -1, np.int32)
  ids[0, :t, :t] = irpe.bucket_ids(grid)
  return ids


def continuous_geometry(grid: int, tp: int, shift: jax.Array,
                        dtype) -> tuple[jax.Array, jax.Array]:
  """(ids (4, tp, tp) int32, weights (4, tp, tp) dtype) of the bilinear lookup at `shift`.

  The same arithmetic as `irpe.continuous_table` (pixels from `irpe.continuous_pixels`,
  floor without gradient, zero padding): corner (da, db) of pixel (a, b) reads bucket
  7 (a0 + da) + (b0 + db) with weight wa_da wb_db, or nothing when outside the 7x7.
  Differentiable in `shift` (through the weights).
  """
  t = 1 + grid * grid
  pix_b, pix_a = irpe.continuous_pixels(grid, jnp.asarray(shift).astype(dtype), dtype)
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
  cls = irpe.CLS_BUCKET
  ids_full = ids_full.at[0, 0, :t].set(cls).at[0, :t, 0].set(cls)
  ws_full = ws_full.at[0, 0, :t].set(1).at[0, :t, 0].set(1)
  return ids_full, ws_full


def _geometry_inputs(prob: _Problem, shift, acc_dtype) -> dict:
  """The geometry arrays the kernels read (keys: ids, wts, ids_s, wts_s)."""
  out = {}
  if prob.geometry == "integer":
    out["ids"] = jnp.asarray(integer_geometry(prob.grid, prob.tp))
  elif prob.geometry == "continuous":
    out["ids"], out["wts"] = continuous_geometry(prob.grid, prob.tp, jnp.zeros((2,), acc_dtype),
                                                 acc_dtype)
    if prob.shifted:
      out["ids_s"], out["wts_s"] = continuous_geometry(prob.grid, prob.tp, shift, acc_dtype)
  return out


def _shift_jacobian(prob: _Problem, shift, acc_dtype) -> jax.Array:
  """d weights / d shift of the shifted geometry, (2 * 4, tp, tp): index r * 4 + c."""
  jac = jax.jacfwd(lambda s: continuous_geometry(prob.grid, prob.tp, s, acc_dtype)[1])(
      shift.astype(acc_dtype))                                   # (4, tp, tp, 2)
  return jnp.moveaxis(jac, -1, 0).reshape(2 * 4, prob.tp, prob.tp)


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

  def __init__(self, prob: _Problem, refs: dict, rows, acc):
    self.prob, self.acc = prob, acc
    self.q = refs["q"][rows, :]
    self.qr = refs["qr"][rows, :] if prob.separate_query else self.q
    self.m = refs["mask"][0, rows][:, None].astype(acc) if prob.masked else None
    self.ids, self.wts = [], None
    if prob.geometry == "none":
      return
    for c in range(prob.corners):
      ids = refs["ids"][c, rows, :]
      if prob.shifted:
        ids = jnp.where(self.m > 0, refs["ids_s"][c, rows, :], ids)
      self.ids.append(ids)
    if prob.geometry == "continuous":
      self.wts = []
      for c in range(4):
        w = refs["wts"][c, rows, :]
        if prob.shifted:
          w = jnp.where(self.m > 0, refs["wts_s"][c, rows, :], w)
        self.wts.append(w)
    # QW = qr @ W (+ m qr @ A): (block_q, 64), float32 accumulation.
    w_ext = refs["w"][...].astype(self.qr.dtype)
    self.qw = jnp.dot(self.qr, w_ext, preferred_element_type=acc)
    if prob.per_bucket:
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
    prob, acc = self.prob, self.acc
    zeros = jnp.zeros((self.q.shape[0], prob.tp), acc)

    def body(n, b):
      col = _column(self.qw, n)
      if prob.geometry == "integer":
        return jnp.where(self.ids[0] == n, col, b)
      return b + self.coef(n, self.wts) * col

    b = lax.fori_loop(0, NB, body, zeros)
    if prob.faithful:
      b = b + self.m * _column(self.qw, LANE_TOKEN)
    return b

  def logits(self, k):
    s = lax.dot_general(self.q, k, (((1,), (1,)), ((), ())), preferred_element_type=self.acc)
    if self.prob.geometry != "none":
      s = s + self.bias()
    key_ok = jnp.arange(self.prob.tp, dtype=jnp.int32)[None, :] < self.prob.t
    return jnp.where(key_ok, s, _mask_value(self.acc))


def _softmax(s):
  p = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
  return p / jnp.sum(p, axis=1, keepdims=True)


def _fwd_kernel(prob: _Problem, names, *refs):
  refs = dict(zip(names + ("o",), refs))
  acc = jnp.promote_types(refs["q"].dtype, jnp.float32)
  tile = _Tile(prob, refs, slice(None), acc)
  v = refs["v"][...]
  p = _softmax(tile.logits(refs["k"][...]))
  o = jnp.dot(p.astype(v.dtype), v, preferred_element_type=acc)
  refs["o"][...] = o.astype(refs["o"].dtype)


def _bwd_kernel(prob: _Problem, bq: int, names, out_names, *refs):
  refs = dict(zip(names + ("do",) + out_names, refs))
  acc = jnp.promote_types(refs["q"].dtype, jnp.float32)
  k, v = refs["k"][...], refs["v"][...]
  tp, dp = prob.tp, prob.dp
  rpe = prob.geometry != "none"

  def block(i, carry):
    dk, dv = carry
    rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
    tile = _Tile(prob, refs, rows, acc)
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
      if prob.shifted:
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
      if prob.shifted:
        dqw = jnp.where(_lane() == LANE_SHIFT, g0, dqw)
        dqw = jnp.where(_lane() == LANE_SHIFT + 1, g1, dqw)
      if prob.faithful:
        dqw = jnp.where(_lane() == LANE_TOKEN, tile.m * jnp.sum(ds, axis=1, keepdims=True), dqw)
      qdt = tile.qr.dtype
      nt = (((1,), (1,)), ((), ()))
      dqr = lax.dot_general(dqw.astype(qdt), refs["w"][...].astype(qdt), nt,
                            preferred_element_type=acc)
      if prob.per_bucket:
        dqr = dqr + tile.m * lax.dot_general(dqw.astype(qdt), refs["a"][...].astype(qdt), nt,
                                             preferred_element_type=acc)
      refs["dqw"][rows, :] = dqw
      if prob.separate_query:
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

def _quiet_triton_deprecation() -> None:
  """Ignore jax's Triton deprecation warning (`TRITON_DEPRECATION`), only that message and
  only as a DeprecationWarning, first in the filter list so that a user's "error" filter
  does not turn it into an exception.  Called whenever the kernel is traced for a GPU: the
  warning comes at lowering time, after the call returned, so a context manager around
  the call would not see it; re-adding the same filter replaces it."""
  warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


def _triton_compiler_params(**kw):
  """Triton compiler params: `jax.experimental.pallas.triton.CompilerParams` (jax >= 0.5,
  deprecated with the backend on 0.11) or `pl.TritonCompilerParams` (older); imported
  here, not at module import, so that CPU and TPU users never import the Triton module."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    try:
      from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415
      params = getattr(pltriton, "CompilerParams", None)
    except ImportError:
      params = None
  if params is None:
    params = pl.TritonCompilerParams
  return params(**kw)


def _compiler_params(prob: _Problem, launch: _Launch):
  if launch.backend == "gpu" and not launch.interpret:
    return _triton_compiler_params(num_warps=4 if prob.dp <= 64 else 8, num_stages=2)
  return None


def _specs(prob: _Problem, arrays: dict, bq: Optional[int]):
  """BlockSpecs of the named inputs for grid (B, H, query blocks of bq rows), or for grid
  (B, H) with whole-length blocks when bq is None."""
  rows_block = bq is not None
  bq = bq or prob.tp
  if rows_block:
    row = lambda b, h, i: (b, h, i, 0)      # noqa: E731
    full_bh = lambda b, h, i: (b, h, 0, 0)  # noqa: E731
    mrow = lambda b, h, i: (b, 0, i)        # noqa: E731
    geo = lambda b, h, i: (0, i, 0)         # noqa: E731
    const = lambda b, h, i: (0, 0)          # noqa: E731
  else:
    row = full_bh = lambda b, h: (b, h, 0, 0)
    mrow = lambda b, h: (b, 0, 0)              # noqa: E731
    geo = lambda b, h: (0, 0, 0)               # noqa: E731
    const = lambda b, h: (0, 0)                # noqa: E731
  specs = {}
  for name, x in arrays.items():
    if name in ("q", "qr", "do"):
      specs[name] = pl.BlockSpec((None, None, bq, prob.dp), row)
    elif name in ("k", "v"):
      specs[name] = pl.BlockSpec((None, None, prob.tp, prob.dp), full_bh)
    elif name == "mask":  # (B, 1, Tp): a (1, block) tile is legal on Mosaic TPU too
      specs[name] = pl.BlockSpec((None, 1, bq), mrow)
    elif name in ("ids", "wts", "ids_s", "wts_s", "dws"):
      specs[name] = pl.BlockSpec((x.shape[0], bq, prob.tp), geo)
    elif name in ("w", "a"):
      specs[name] = pl.BlockSpec(x.shape, const)
    else:
      raise KeyError(name)
  return specs


def _kernel_inputs(prob: _Problem, q, k, v, qr, w, a, shift, mask) -> dict:
  acc = jnp.promote_types(q.dtype, jnp.float32)
  arrays = {"q": q, "k": k, "v": v}
  if prob.separate_query:
    arrays["qr"] = qr
  if prob.masked:
    arrays["mask"] = mask
  if prob.geometry != "none":
    arrays["w"] = w
    if prob.per_bucket:
      arrays["a"] = a
    arrays.update(_geometry_inputs(prob, shift, acc))
  return arrays


def _forward(prob: _Problem, launch: _Launch, q, k, v, qr, w, a, shift, mask):
  arrays = _kernel_inputs(prob, q, k, v, qr, w, a, shift, mask)
  names = tuple(arrays)
  bq = launch.block_q
  specs = _specs(prob, arrays, bq)
  b, h = q.shape[:2]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, prob, names),
      grid=(b, h, prob.tp // bq),
      in_specs=[specs[n] for n in names],
      out_specs=pl.BlockSpec((None, None, bq, prob.dp), lambda b, h, i: (b, h, i, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(prob, launch),
      interpret=launch.interpret,
      debug=launch.debug,
      name="rpe_attention_fwd",
  )(*arrays.values())


def _backward(prob: _Problem, launch: _Launch, res, do):
  q, k, v, qr, w, a, shift, mask = res
  acc = jnp.promote_types(q.dtype, jnp.float32)
  arrays = _kernel_inputs(prob, q, k, v, qr, w, a, shift, mask)
  if prob.shifted:
    arrays["dws"] = _shift_jacobian(prob, shift, acc)
  names = tuple(arrays)
  arrays_do = dict(arrays, do=do)
  specs = _specs(prob, arrays_do, None)
  b, h = q.shape[:2]
  rpe = prob.geometry != "none"
  out_names = ("dq", "dk", "dv") + (("dqr",) if prob.separate_query else ()) + (
      ("dqw",) if rpe else ())
  bh = lambda b, h: (b, h, 0, 0)  # noqa: E731
  shapes = {"dq": jax.ShapeDtypeStruct(q.shape, q.dtype),
            "dk": jax.ShapeDtypeStruct(k.shape, k.dtype),
            "dv": jax.ShapeDtypeStruct(v.shape, v.dtype),
            "dqr": jax.ShapeDtypeStruct(q.shape, q.dtype),
            "dqw": jax.ShapeDtypeStruct((b, h, prob.tp, NBP), acc)}
  out_specs = [pl.BlockSpec((None, None, prob.tp, shapes[n].shape[-1]), bh) for n in out_names]
  outs = pl.pallas_call(
      functools.partial(_bwd_kernel, prob, launch.block_q_bwd, names, out_names),
      grid=(b, h),
      in_specs=[specs[n] for n in names + ("do",)],
      out_specs=out_specs,
      out_shape=[shapes[n] for n in out_names],
      compiler_params=_compiler_params(prob, launch),
      interpret=launch.interpret,
      debug=launch.debug,
      name="rpe_attention_bwd",
  )(*arrays.values(), do)
  return dict(zip(out_names, outs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(prob, launch, q, k, v, qr, w, a, shift, mask):
  return _forward(prob, launch, q, k, v, qr, w, a, shift, mask)


def _fused_fwd(prob, launch, q, k, v, qr, w, a, shift, mask):
  return (_forward(prob, launch, q, k, v, qr, w, a, shift, mask),
          (q, k, v, qr, w, a, shift, mask))


def _fused_bwd(prob, launch, res, do):
  q, k, v, qr, w, a, shift, mask = res
  g = _backward(prob, launch, res, do)
  dw = da = dshift = None
  if prob.geometry != "none":
    dqw = g["dqw"]
    qr_ = qr if prob.separate_query else q
    dw = jnp.einsum("bhtd,bhtn->dn", qr_, dqw, preferred_element_type=dqw.dtype)
    # lane 52 of dw is d loss / d (faithful token); lanes 50/51 are dropped by the .at[].set.
    if prob.per_bucket:
      da = jnp.einsum("bhtd,bhtn->dn", qr_ * mask[:, :, :, None].astype(qr_.dtype), dqw,
                      preferred_element_type=dqw.dtype).astype(a.dtype)
    dw = dw.astype(w.dtype)
    if prob.shifted:
      dshift = jnp.sum(dqw[..., LANE_SHIFT:LANE_SHIFT + 2], axis=(0, 1, 2)).astype(shift.dtype)
  dmask = None if mask is None else jnp.zeros_like(mask)
  return (g["dq"], g["dk"], g["dv"], g.get("dqr"), dw, da, dshift, dmask)


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------------------
# The public op and its reference
# ----------------------------------------------------------------------------------------

def _launch(t: int, block_sizes: Optional[BlockSizes], backend: Optional[str],
            interpret: Optional[bool], debug: bool) -> _Launch:
  backend = backend or jax.default_backend()
  if interpret is None:
    interpret = backend not in ("gpu", "tpu")
  blocks = block_sizes or BlockSizes.get_default(t, backend)
  tp = padded_length(t)
  bq, bq_bwd = blocks.block_q, blocks.block_q_bwd or blocks.block_q
  for name, n in (("block_q", bq), ("block_q_bwd", bq_bwd)):
    if n < 1 or tp % n:
      raise ValueError(f"block_sizes.{name}={n} must divide the padded length {tp}.")
  if backend == "gpu" and not interpret:
    _quiet_triton_deprecation()
  return _Launch(block_q=bq, block_q_bwd=bq_bwd, backend=backend, interpret=bool(interpret),
                 debug=debug)


def rpe_attention(q, k, v, rpe: Optional[irpe.RPEOperands] = None, *,
                  block_sizes: Optional[BlockSizes] = None, backend: Optional[str] = None,
                  interpret: Optional[bool] = None, debug: bool = False):
  """Fused multi-head attention with the optional iRPE-K term (`attention(impl="pallas")`).

  Args:
    q, k, v: (B, T, H, hd); q is already scaled (the logits are q . k).
    rpe: None or the iRPE operands (`irpe.RPEOperands`); T must be 1 + grid**2.
    block_sizes: the tiling; None = `BlockSizes.get_default(T, backend)`.
    backend: the compile target, "gpu" (Triton) or "tpu" (Mosaic TPU); None = jax's
      default backend.  A cross-platform `.lower(lowering_platforms=...)` names it.
    interpret: run the kernels in the Pallas interpreter; None = unless the backend is a
      GPU or a TPU (so on CPU).
    debug: print the kernels' jaxprs and lowered modules (`pl.pallas_call(debug=True)`).

  Returns:
    (B, T, H, hd) in v's dtype; the same function as `rpe_attention_reference`.
  """
  b, t, h, d = q.shape
  launch = _launch(t, block_sizes, backend, interpret, debug)
  tp = padded_length(t)
  dp = _next_pow2(d)
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
  prob = _Problem(t=t, tp=tp, dp=dp, geometry=geometry, shifted=kind == "coordinate",
                  per_bucket=kind == "embedding", faithful=kind == "embedding_faithful",
                  separate_query=separate, grid=grid)
  out = _fused(prob, launch, prep(q), prep(k), prep(v), qr, w, a, shift, mask)
  return out[:, :, :t, :d].transpose(0, 2, 1, 3).astype(v.dtype)


def _f32_or_wider(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def rpe_attention_reference(q, k, v, rpe: Optional[irpe.RPEOperands] = None, *,
                            heads_first: bool = False):
  """The plain-jnp reference, `attention(impl="xla")` and the model's original math:

      softmax_f32(q k^T + irpe.rpe_bias(q_rpe)) v,    q_rpe = rpe.query if given, else q.

  q, k, v: (B, T, H, hd), or (B, H, T, hd) with `heads_first` (then `rpe.query` is
  head-major too); returns the same layout in v's dtype.  Materialises the (B, H, T, T)
  logits and bias.  `models.vit.Attention` calls it head-major under `xla`.
  """
  if not heads_first:
    def swap(x):
      return x.transpose(0, 2, 1, 3)
    if rpe is not None and rpe.query is not None:
      rpe = rpe.replace(query=swap(rpe.query))
    return swap(rpe_attention_reference(swap(q), swap(k), swap(v), rpe, heads_first=True))
  probs = rpe_attention_probs(q, k, rpe, heads_first=True).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


def rpe_attention_probs(q, k, rpe: Optional[irpe.RPEOperands] = None, *,
                        heads_first: bool = False):
  """The reference's attention probabilities (B, H, T, T) in at least float32:

      softmax_f32(q k^T + irpe.rpe_bias(q_rpe)),     q_rpe = rpe.query if given, else q,

  q, k (and `rpe.query`) in (B, T, H, hd), or (B, H, T, hd) with `heads_first`.
  `rpe_attention_reference` multiplies exactly these with v; `models.vit.Attention` sows
  them when asked (collection `models.vit.ATTENTION`)."""
  if not heads_first:
    def swap(x):
      return x.transpose(0, 2, 1, 3)
    if rpe is not None and rpe.query is not None:
      rpe = rpe.replace(query=swap(rpe.query))
    q, k = swap(q), swap(k)
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k)
  if rpe is not None:
    logits = logits + irpe.rpe_bias(q if rpe.query is None else rpe.query, rpe)
  return jax.nn.softmax(_f32_or_wider(logits), axis=-1)
