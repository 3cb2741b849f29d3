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
import jax.numpy as jnp

from adpe_jax.kernels.attention import attention

Dtype = Any
LN_EPS = 1e-6
xavier_uniform = nn.initializers.xavier_uniform()


def _f32_or_wider(x):
  """Softmax / loss precision: at least float32 (bf16 compute is upcast)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class Mlp(nn.Module):
  hidden_dim: int
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x):
    out_dim = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=xavier_uniform, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(out_dim, dtype=self.dtype, kernel_init=xavier_uniform, name="fc2")(x)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection and an optional iRPE-K term.

  qkv output feature f = s*D + h*hd + d for s in (q, k, v), head h (the torch layout),
  so one reshape gives (B, T, 3, H, hd) with no transposes of the weights.

  `rpe` is None (APE models) or a dict of `adpe_jax.rpe.RelativePositionKey` fields
  (grid, lookup, adversary).  Faithful to the pretraining model (spec 5.3): the RPE term
  uses the *scaled* query; fine-tune models set `rpe_unscaled_query` (spec 9.2).

  The attention itself (logits, RPE term, softmax, times v) is `adpe_jax.kernels.attention`
  with `attention_impl` ("auto" | "xla" | "pallas"); `RelativePositionKey` only declares
  and reads the table and the adversary.
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
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=xavier_uniform, name="qkv")(x)
    qkv = qkv.reshape(b, t, 3, h, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, H, hd)
    scale = hd ** -0.5
    q_scaled = q * jnp.asarray(scale, q.dtype)
    rpe_ops = None
    if self.rpe is not None:
      from adpe_jax.rpe import RelativePositionKey  # noqa: PLC0415 (keeps APE import light)
      q_rpe = q if self.rpe_unscaled_query else q_scaled
      rpe_ops = RelativePositionKey(head_dim=hd, name="rpe_k", **self.rpe).operands(
          q_rpe.transpose(0, 2, 1, 3), query_mask)
      if self.rpe_unscaled_query:
        rpe_ops = rpe_ops.replace(query=q)
    out = attention(q_scaled, k, v, rpe=rpe_ops, impl=self.attention_impl).reshape(b, t, d)
    return nn.Dense(d, dtype=self.dtype, kernel_init=xavier_uniform, name="proj")(out)


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
