"""The one attention interface every transformer block calls.

    out = attention(q, k, v, rpe=None, impl="auto")

q, k, v: (B, T, H, hd); q is the attention's (already scaled) query, so the logits are
q . k.  rpe: None (APE models) or `adpe_jax.kernels.irpe.RPEOperands` (the iRPE-K table,
the adversary, the query mask and the geometry, as `RelativePositionKey.operands` returns
them).  Returns (B, T, H, hd) in v's dtype:

    softmax_f32(q k^T + rpe_bias(q_rpe)) v,      q_rpe = rpe.query if given, else q.

Implementations (`model.attention_impl`):

* ``xla``: `rpe_attention.rpe_attention_reference`, plain jnp -- the reference.  It IS
  the computation the model always had: the fidelity test against the original PyTorch
  code runs through it.  Materialises the (B, H, T, T) logits and bias.
* ``pallas``: `rpe_attention.rpe_attention`, the fused kernel (forward and a
  `jax.custom_vjp` backward, no (B, H, T, T) tensor in HBM).  On CPU it runs in the
  Pallas interpreter (slow; for tests).
* ``auto``: ``pallas`` on CUDA GPUs of compute capability >= 8.0 (the Triton backend the
  kernel targets) once the kernel has built there (`_pallas_builds`), on one device or a
  mesh of many, in one process or several; else ``xla``.  TPUs stay on ``xla`` under
  ``auto`` (the kernel is written to be Mosaic-TPU lowerable but was never compiled on
  one; select ``pallas`` explicitly to try).

Several devices.  A pallas_call is opaque to GSPMD: left to it, its operands would be
gathered and every device would run the whole batch.  So on a mesh the kernel runs under
`jax.shard_map` over the batch: every device runs it on its own rows of q, k, v, the query
mask and the separate RPE query, while the iRPE table and the adversary (the per-bucket
table, the faithful token or the coordinate shift) enter replicated -- an FSDP-sharded
table is all-gathered first -- and the geometry is built per device from them.  Their
gradients come back summed over the devices (shard_map's transpose of a replicated
input), as the XLA path's do.  The mesh is the one in context at trace time
(`jax.sharding.get_abstract_mesh()`: `jax.set_mesh(mesh)`, or
`adpe_jax.parallel.under_mesh`, which the train steps use); the batch is split over every
mesh axis not already manual (the (data, fsdp) mesh of `adpe_jax.parallel` splits it over
both), padded with zero rows to a multiple of their size when it does not divide.
Without a mesh in context on several devices, ``auto`` picks ``xla`` and an explicit
``pallas`` runs unpartitioned (with a warning).  The mesh's platform is the kernel's
compile target, so a step traced on an abstract CUDA mesh lowers the Triton kernel from a
CPU host (`.lower(lowering_platforms=("cuda",))`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import math
from typing import Optional

import numpy as np
import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from adpe_jax.kernels import irpe
from adpe_jax.kernels import rpe_attention as fused

IMPLS = ("auto", "xla", "pallas")
_PLATFORM_BACKEND = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu"}


@functools.lru_cache(maxsize=None)
def _auto_impl(backend: str, capability: str) -> str:
  if backend != "gpu":
    return "xla"
  try:
    major = int(str(capability).split(".")[0])
  except ValueError:
    return "xla"
  return "pallas" if major >= 8 else "xla"


def context_mesh():
  """The abstract mesh in context at trace time and its batch axes (every axis not already
  manual), or (None, ()) when there is none or the batch axes hold one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None, ()
  manual = set(getattr(mesh, "manual_axes", ()))
  axes = tuple(a for a in mesh.axis_names if a not in manual)
  if math.prod(mesh.shape[a] for a in axes) <= 1:
    return None, ()
  return mesh, axes


def _platform() -> tuple[str, str]:
  """(jax's default backend, the first device's compute capability or "")."""
  backend = jax.default_backend()
  capability = ""
  if backend == "gpu":
    capability = getattr(jax.devices()[0], "compute_capability", "") or ""
  return backend, str(capability)


def resolve_impl(impl: str) -> str:
  """'auto' | 'xla' | 'pallas' -> 'xla' | 'pallas' for the default backend and the mesh in
  context (see the module docstring)."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}.")
  if impl != "auto":
    return impl
  chosen = _auto_impl(*_platform())
  if chosen == "pallas" and jax.device_count() > 1 and context_mesh()[0] is None:
    return "xla"   # no mesh to shard_map over: the kernel would run the whole batch per device
  if chosen == "pallas" and not _pallas_builds():
    return "xla"
  return chosen


@functools.lru_cache(maxsize=None)
def _pallas_builds() -> bool:
  """Under `auto`: compile and run the kernel (forward and backward, with a coordinate
  adversary) once on tiny shapes; if that fails on this device, warn and use `xla`, so a
  kernel that does not build here never breaks default training.

  `resolve_impl` is called while a model is traced (inside jit, under the step's mesh),
  where nothing can be run: the probe runs in a thread of its own, whose trace state and
  mesh context are fresh (both are thread-local in jax)."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(_probe).result()


def _probe() -> bool:
  try:
    b, h, grid, hd = 1, 1, 3, 16
    t = 1 + grid * grid
    x = jnp.asarray(np.random.default_rng(0).normal(size=(b, t, h, hd)), jnp.float32)
    mask = jnp.asarray(np.arange(t)[None] % 2 == 1)

    def loss(q, table, shift):
      ops = irpe.RPEOperands(table=table, adv=shift, query_mask=mask, grid=grid,
                             lookup="continuous", adversary="coordinate")
      return fused.rpe_attention(q, x, x, ops).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
        x, jnp.full((hd, irpe.NUM_BUCKETS), 0.1, jnp.float32), jnp.asarray([0.3, -0.2]))
    jax.block_until_ready(grads)
    return all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  except Exception as e:  # noqa: BLE001
    logging.warning("attention_impl=auto: the Pallas kernel does not build on this device "
                    "(%s: %s); using xla.", type(e).__name__, str(e).splitlines()[0][:200])
    return False


def shard_map(f, *, mesh, in_specs, out_specs):
  """`jax.shard_map` without the replication check, on every jax in setup.cfg's range
  (and the older `jax.experimental.shard_map`, whose flag was `check_rep`).

  The check is off because under it a pallas_call's out_shape must name the manual axes
  it varies over, in a ShapeDtypeStruct field whose name has changed between releases.
  Without it, shard_map's transpose psums the cotangent of every input over the mesh axes
  its in_spec does not name: for a replicated input, the sum over devices of its
  per-device gradients (tests/test_sharded_kernel.py compares that with the XLA path's)."""
  sm = getattr(jax, "shard_map", None)
  if sm is None:   # jax < 0.7
    from jax.experimental.shard_map import shard_map as sm  # noqa: PLC0415
  params = inspect.signature(sm).parameters
  check = {"check_vma": False} if "check_vma" in params else {"check_rep": False}
  return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **check)


def _sharded_kernel(q, k, v, rpe, mesh, axes, **kernel_kw):
  """`fused.rpe_attention` under shard_map over the batch `axes` of `mesh`: per-example
  inputs (q, k, v, the query mask, the separate RPE query) split by rows, the table and
  the adversary replicated.  A batch the axes do not divide is padded with zero rows
  (uniform attention, no gradient) and cut back."""
  n = math.prod(mesh.shape[a] for a in axes)
  b = q.shape[0]
  pad = -b % n

  def rows(x):
    return x if x is None or not pad else jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))

  split, whole = P(axes), P()
  named = {"q": (rows(q), split), "k": (rows(k), split), "v": (rows(v), split)}
  if rpe is not None:
    named["table"] = (rpe.table, whole)
    for name, x, spec in (("adv", rpe.adv, whole), ("query_mask", rpe.query_mask, split),
                          ("query", rpe.query, split)):
      if x is not None:
        named[name] = (rows(x) if spec is split else x, spec)
  names = tuple(named)

  def per_device(*arrays):
    got = dict(zip(names, arrays))
    ops = None
    if rpe is not None:
      ops = rpe.replace(**{n_: got[n_] for n_ in names if n_ not in ("q", "k", "v")})
    return fused.rpe_attention(got["q"], got["k"], got["v"], ops, **kernel_kw)

  out = shard_map(per_device, mesh=mesh, in_specs=tuple(s for _, s in named.values()),
                  out_specs=split)(*(x for x, _ in named.values()))
  return out[:b] if pad else out


def attention(q, k, v, rpe: Optional[irpe.RPEOperands] = None, *, impl: str = "auto",
              block_sizes: Optional[fused.BlockSizes] = None,
              interpret: Optional[bool] = None):
  """Multi-head attention with the optional iRPE-K term; see the module docstring.
  `block_sizes` and `interpret` go to the fused kernel (`rpe_attention.rpe_attention`)
  and are ignored under `xla`."""
  impl = resolve_impl(impl)
  if impl == "xla":
    return fused.rpe_attention_reference(q, k, v, rpe)
  mesh, axes = context_mesh()
  kernel_kw = dict(block_sizes=block_sizes, interpret=interpret)
  if mesh is None:
    if jax.device_count() > 1 and jax.sharding.get_abstract_mesh().empty:
      logging.log_first_n(
          logging.WARNING, "attention_impl=pallas on %d devices without a mesh in context "
          "(jax.set_mesh / adpe_jax.parallel.under_mesh): the kernel is not partitioned, "
          "every device computes the whole batch.", 1, jax.device_count())
    return fused.rpe_attention(q, k, v, rpe, **kernel_kw)
  platform = getattr(mesh.abstract_device, "platform", None)
  kernel_kw["backend"] = _PLATFORM_BACKEND.get(platform)
  return _sharded_kernel(q, k, v, rpe, mesh, axes, **kernel_kw)
