"""Pre-norm ViT blocks, faithful to timm 0.3.2 as used by the original (spec 2.1, 2.2).

Parameter names follow the PyTorch state dict (norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2) so that `adpe_jax.convert` is a renaming plus transposes.

Initialisation (spec 2.2), where it differs from Flax defaults:
  * Dense kernels: xavier-uniform (Flax: lecun-normal); biases zero (as Flax).
  * LayerNorm: scale 1, bias 0, eps 1e-6 (Flax default eps is 1e-6 too; written out).
  * GELU is exact (erf); Flax's `nn.gelu` defaults to the tanh approximation.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adpe_jax.kernels.attention import attention, resolve_impl
from adpe_jax.kernels.rpe_attention import rpe_attention_probs, rpe_attention_reference
from adpe_jax.models.irpe import RelativePositionKey

Dtype = Any
LN_EPS = 1e-6
# Flax collection of the attention probabilities, `<block>/attn/probs` = ((B, H, T, T),):
# computed and sown only when a caller makes it mutable (`apply(..., mutable=[ATTENTION])`,
# unrolled blocks), so the default path is unchanged (benchmarks/adversary_effect.py).
ATTENTION = "attention"
xavier_uniform = nn.initializers.xavier_uniform()


def _f32_or_wider(x):
  """Softmax / loss precision: at least float32 (bf16 compute is upcast)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def gelu_exact(x):
  """timm's `nn.GELU()` (exact, not the tanh approximation), in x's dtype.

  float64: x/2 * erfc(-x/sqrt(2)) (what `jax.nn.gelu(approximate=False)` computes; it
  matches torch's float64 GELU to ~1e-15, the fidelity contract).  Narrower floats:
  x/2 * (1 + erf(x/sqrt(2))), the formula of torch's float32 GELU (it reproduces torch's
  float32 values at least as often as erfc does) and cheaper on XLA:CPU, where erfc
  evaluates two branches (benchmarks/README.md).
  """
  if x.dtype == jnp.float64:
    return jax.nn.gelu(x, approximate=False)
  half = jnp.asarray(0.5, x.dtype)
  return half * x * (1 + jax.lax.erf(x * jnp.asarray(np.sqrt(0.5), x.dtype)))


class Mlp(nn.Module):
  hidden_dim: int
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x):
    out_dim = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=xavier_uniform, name="fc1")(x)
    x = gelu_exact(x)
    return nn.Dense(out_dim, dtype=self.dtype, kernel_init=xavier_uniform, name="fc2")(x)


class _HeadMajorQKV(nn.Module):
  """nn.Dense(3 D)'s parameters (kernel (D, 3 D), bias (3 D): the torch layout, the same
  names, shapes and initialisation) applied head-major: (B, T, D) -> q, k, v, each
  (B, H, T, hd), the matmul writing the attention's layout (no activation transposes)."""
  num_heads: int
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = self.num_heads
    kernel = self.param("kernel", xavier_uniform, (d, 3 * d), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (3 * d,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    qkv = jnp.einsum("btd,dshe->sbhte", x, kernel.reshape(d, 3, h, d // h))
    qkv = qkv + bias.reshape(3, 1, h, 1, d // h)
    return qkv[0], qkv[1], qkv[2]


class _HeadMajorProj(nn.Module):
  """nn.Dense(D)'s parameters applied to head-major input (B, H, T, hd) -> (B, T, D)."""
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x):
    _, h, _, hd = x.shape
    d = h * hd
    kernel = self.param("kernel", xavier_uniform, (d, d), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return jnp.einsum("bhte,hed->btd", x, kernel.reshape(h, hd, d)) + bias


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection and an optional iRPE-K term.

  qkv output feature f = s*D + h*hd + d for s in (q, k, v), head h (the torch layout),
  so one reshape gives (B, T, 3, H, hd) with no transposes of the weights.

  `rpe` is None (APE models) or a dict of `adpe_jax.models.irpe.RelativePositionKey` fields
  (grid, lookup, adversary).  Faithful to the pretraining model (spec 5.3): the RPE term
  uses the *scaled* query; fine-tune models set `rpe_unscaled_query` (spec 9.2).

  The attention itself (logits, RPE term, softmax, times v) is `adpe_jax.kernels.attention`
  with `attention_impl` ("auto" | "xla" | "pallas"); `RelativePositionKey` only declares
  and reads the table and the adversary.  Under `xla` the same function runs head-major
  (`_head_major`: the qkv matmul writes (B, H, T, hd), the output projection contracts
  (h, hd)), which saves the activation transposes XLA:CPU otherwise materialises
  (benchmarks/README.md: +5-12% per APE step on a 2-core CPU); the parameters are the same.
  """
  num_heads: int
  dtype: Optional[Dtype] = None
  rpe: Optional[dict] = None
  rpe_unscaled_query: bool = False
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, query_mask=None):
    b, t, d = x.shape
    h = self.num_heads
    hd = d // h
    if resolve_impl(self.attention_impl) == "xla":
      return self._head_major(x, query_mask)
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=xavier_uniform, name="qkv")(x)
    qkv = qkv.reshape(b, t, 3, h, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, H, hd)
    scale = hd ** -0.5
    q_scaled = q * jnp.asarray(scale, q.dtype)
    rpe_ops = self._rpe_operands(q, q_scaled, query_mask, heads_first=False)
    self._capture(q_scaled, k, rpe_ops, heads_first=False)
    out = attention(q_scaled, k, v, rpe=rpe_ops, impl=self.attention_impl).reshape(b, t, d)
    return nn.Dense(d, dtype=self.dtype, kernel_init=xavier_uniform, name="proj")(out)

  def _head_major(self, x, query_mask):
    """The `xla` attention in (B, H, T, hd) from the qkv matmul to the output projection:
    the same function and parameters; no (B, T, H, hd) <-> (B, H, T, hd) copies."""
    q, k, v = _HeadMajorQKV(self.num_heads, self.dtype, name="qkv")(x)
    q_scaled = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    rpe_ops = self._rpe_operands(q, q_scaled, query_mask, heads_first=True)
    self._capture(q_scaled, k, rpe_ops, heads_first=True)
    out = rpe_attention_reference(q_scaled, k, v, rpe_ops, heads_first=True)
    return _HeadMajorProj(self.dtype, name="proj")(out)

  def _capture(self, q_scaled, k, rpe_ops, heads_first: bool):
    """Sows the attention probabilities (`rpe_attention_probs`, what the `xla` path
    multiplies with v) into ATTENTION, only when a caller made that collection mutable
    (not at init, where every collection is)."""
    if self.is_mutable_collection(ATTENTION) and not self.is_initializing():
      self.sow(ATTENTION, "probs", rpe_attention_probs(q_scaled, k, rpe_ops,
                                                       heads_first=heads_first))

  def _rpe_operands(self, q, q_scaled, query_mask, heads_first: bool):
    """The iRPE operands (None for APE) from q / q_scaled, (B, H, T, hd) if heads_first
    else (B, T, H, hd): the RPE term reads the scaled query, or the unscaled one (passed
    on as `query`, in the attention call's layout) for `rpe_unscaled_query`."""
    if self.rpe is None:
      return None
    q_rpe = q if self.rpe_unscaled_query else q_scaled
    if not heads_first:
      q_rpe = q_rpe.transpose(0, 2, 1, 3)
    ops = RelativePositionKey(head_dim=q.shape[-1], name="rpe_k", **self.rpe).operands(
        q_rpe, query_mask)
    return ops.replace(query=q) if self.rpe_unscaled_query else ops


class Block(nn.Module):
  """x + Attn(LN(x)); x + MLP(LN(x)).  Drop-path and dropout are 0 in pretraining."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Optional[Dtype] = None
  rpe: Optional[dict] = None
  rpe_unscaled_query: bool = False
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, query_mask=None):
    d = x.shape[-1]
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm1")(x)
    x = x + Attention(self.num_heads, self.dtype, self.rpe, self.rpe_unscaled_query,
                      self.attention_impl, name="attn")(y, query_mask)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm2")(x)
    return x + Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")(y)
