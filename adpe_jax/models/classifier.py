"""The fine-tuning ViT classifier (spec 6): the original's pe_type 0 / 1 / 2 models.

Parameter names match the pretraining encoder of `MAEPlus` (patch_embed, cls_token,
blocks_i/{norm1, attn/{qkv, proj, rpe_k/lookup_table}, norm2, mlp/{fc1, fc2}}), so a
pretrained encoder loads by name; the fine-tune additions are

  pos_embed (1, 1+L, D)  LEARNABLE (the original's timm ViT): initialised from the
                         pretraining sin-cos table resized with torch's bicubic
                         (`posembed.resize_table`) when loading, else the sin-cos table of
                         the fine-tune grid;
  fc_norm / head         mean of the patch tokens (cls excluded) -> LayerNorm -> Dense
                         (global_pool=True, the default); with global_pool=False the
                         encoder's final `norm` is kept and the cls token is classified;
                         head kernel trunc-normal std 2e-5, bias 0 (MAE's fine-tune init).

pe: "ape" (pe_type 0), "rpe" with rpe_lookup "integer" (pe_type 1) or "continuous"
(pe_type 2, the zero-shift interpolated lookup of spec 5.5).  rpe_unscaled_query=True is
the original's fine-tune RPE term rpe_k(q) with the UNSCALED query (spec 9.2).
Blocks reuse `vit.Attention` and `vit.Mlp`, with drop path (stochastic depth) on both
residual branches, rate linear from 0 to `drop_path` over depth (timm DropPath: per-example
keep mask / keep_prob); it draws from the "dropout" RNG when `train=True`.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adpe_jax.models import posembed
from adpe_jax.models.mae import patchify
from adpe_jax.models.vit import LN_EPS, Attention, Mlp, _f32_or_wider, xavier_uniform

Dtype = Any


def drop_path(x, rate: float, rng, train: bool):
  """timm DropPath: zero whole examples with probability `rate`, scale the rest by 1/keep."""
  if not train or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class FinetuneBlock(nn.Module):
  """x + DropPath(Attn(LN(x))); x + DropPath(MLP(LN(x))) -- `vit.Block` plus drop path."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Optional[Dtype] = None
  rpe: Optional[dict] = None
  rpe_unscaled_query: bool = False
  attention_impl: str = "auto"
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = x.shape[-1]
    rng = lambda: self.make_rng("dropout")  # noqa: E731
    live = train and self.drop_path > 0
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm1")(x)
    y = Attention(self.num_heads, self.dtype, self.rpe, self.rpe_unscaled_query,
                  self.attention_impl, name="attn")(y, None)
    x = x + drop_path(y, self.drop_path, rng() if live else None, live)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm2")(x)
    y = Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")(y)
    return x + drop_path(y, self.drop_path, rng() if live else None, live)


class ViTClassifier(nn.Module):
  """apply({"params": p}, images (N, H, W, 3), train, rngs={"dropout": k}) -> logits (N, C)."""
  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  pe: str = "ape"                 # ape | rpe
  rpe_lookup: str = "integer"     # integer (pe_type 1) | continuous (pe_type 2)
  rpe_unscaled_query: bool = True
  drop_path: float = 0.1
  global_pool: bool = True
  dtype: Optional[Dtype] = None
  attention_impl: str = "auto"

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  def _rpe(self):
    if self.pe != "rpe":
      return None
    return dict(grid=self.grid, lookup=self.rpe_lookup, adversary="none")

  @nn.compact
  def __call__(self, images, train: bool = False, features: str = ""):
    """Logits; with `features` the frozen encoder's readout instead (no head; needs
    global_pool=False, adpe_jax/train/evaluate.py): "cls" = norm(x)[:, 0] (MAE's linear
    probe), "avg" = a LayerNorm without affine of the patch-token mean (MAE's linear probe
    with --global_pool: its fresh, frozen fc_norm), "mean" = the mean of norm(x)'s patch
    tokens (`MAEPlus.features`, the pretraining k-NN)."""
    p, d = self.patch_size, self.embed_dim
    n = images.shape[0]
    fan_in = p * p * 3
    x = patchify(images, p)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = nn.Dense(d, dtype=self.dtype, kernel_init=xavier_uniform, name="patch_embed",
                 bias_init=lambda k, s, dt=jnp.float32: jax.random.uniform(
                     k, s, dt, -1 / np.sqrt(fan_in), 1 / np.sqrt(fan_in)))(x)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d))
    table = posembed.sincos_table(self.grid, d)[None].astype(np.float32)
    pos = self.param("pos_embed", lambda k, s: jnp.asarray(table), table.shape)
    dtype = x.dtype
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (n, 1, d)), x], axis=1)
    x = x + pos.astype(dtype)
    rates = np.linspace(0.0, self.drop_path, self.depth)
    for i in range(self.depth):
      x = FinetuneBlock(self.num_heads, self.mlp_ratio, self.dtype, self._rpe(),
                        self.rpe_unscaled_query, self.attention_impl, float(rates[i]),
                        name=f"blocks_{i}")(x, train)
    if features:
      if self.global_pool or features not in ("cls", "avg", "mean"):
        raise ValueError(f"features={features!r} needs global_pool=False and one of "
                         f"'cls', 'avg', 'mean'")
      if features == "avg":
        return _f32_or_wider(nn.LayerNorm(epsilon=LN_EPS, use_scale=False, use_bias=False,
                                          name="fc_norm")(x[:, 1:].mean(axis=1)))
      x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(x)
      return _f32_or_wider(x[:, 0]) if features == "cls" else _f32_or_wider(x[:, 1:]).mean(axis=1)
    if self.global_pool:
      x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="fc_norm")(x[:, 1:].mean(axis=1))
    else:
      x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(x)[:, 0]
    head = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                    kernel_init=nn.initializers.truncated_normal(2e-5))
    return _f32_or_wider(head(x))
