"""The MAE+ pretraining model (spec 2.3) with the APE adversaries (spec 4.2, 4.3).

`MAEPlus.apply({"params": p, "adversary": a}, images, noise=None, rngs={"masking": key})`
returns `(loss, pred, mask)` like the original's `forward`:
  images: (N, H, W, 3), ImageNet-normalised, N = all crops;
  noise:  optional (N, L) -- the mask is exactly the original's `argsort(noise)` split;
  loss:   scalar norm-pixel MSE over masked patches of all crops;
  pred:   (N, L, p*p*3) without the cls row;  mask: (N, L), 1 = masked.
The encoder output (after its final LayerNorm, (N, 1+L, D)) is sown as
`intermediates/latent`.

Two variable collections: "params" (the model, trained by AdamW) and "adversary" (the
positional perturbation, ascended and projected; spec 4.1), each declared by the module
that reads it.  `model.init` returns both; with `adversary="none"` the "adversary"
collection is absent (use `variables.get("adversary", {})`).  The frozen-encoder
`features` method reads "params" only.

  APE + embedding   adversary/adv_token (1, 1, D)   the mask token itself (spec 4.2, 9.6)
  APE + coordinate  adversary/adv_token (2,)        (column, row) shift of masked patches'
                                                    sin-cos coordinates (spec 4.3)
  RPE + embedding   adversary/*/rpe_k/adv_token | adv_table   (adpe_jax.models.irpe, spec 4.4)
  RPE + coordinate  adversary/*/rpe_k/adv_shift             (adpe_jax.models.irpe, spec 4.5)

Block layout: `blocks_i/...`, `decoder_blocks_i/...` per block (the default), or with
`scan_blocks=True` one `nn.scan` per stack, `blocks/...` and `decoder_blocks/...` with a
leading depth axis in both collections (the same function; compile time flat in depth).
`adpe_jax.layout` converts between the two exactly.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adpe_jax.layout import ADVERSARY
from adpe_jax.models import posembed
from adpe_jax.models.vit import LN_EPS, Block, _f32_or_wider, xavier_uniform

Dtype = Any


def patchify(images, patch: int):
  """(N, H, W, C) -> (N, L, p*p*C), patch vector ordered (row-in-patch, col-in-patch, C)."""
  n, hh, ww, c = images.shape
  h, w = hh // patch, ww // patch
  x = images.reshape(n, h, patch, w, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h * w, patch * patch * c)


def unpatchify(x, patch: int, channels: int = 3):
  """(N, L, p*p*C) -> (N, H, W, C) (inverse of `patchify`)."""
  n, l, _ = x.shape
  h = int(round(np.sqrt(l)))
  x = x.reshape(n, h, h, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h * patch, h * patch, channels)


def norm_pix_loss(pred, target, mask, normalize: bool = True):
  """Per-patch normalised pixel MSE over masked patches (spec 2.3 step 7).

  The per-patch variance is unbiased (ddof=1, torch's default), eps 1e-6.  normalize=False
  (model.norm_pix_loss=False, MAE's --norm_pix_loss off): the MSE against the pixel values
  themselves (the ImageNet-normalised input), as MAE computes it then.
  """
  pred = _f32_or_wider(pred)
  target = _f32_or_wider(target)
  if normalize:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  per_patch = ((pred - target) ** 2).mean(-1)
  mask = mask.astype(per_patch.dtype)
  return (per_patch * mask).sum() / mask.sum()


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """K = floor(L * (1 - mask_ratio)) as the original's int() (spec 2.3, 9.11)."""
  return int(num_patches * (1 - mask_ratio))


def mask_from_noise(noise, keep: int):
  """(N, L) noise -> mask (N, L) with 1 = masked, exactly argsort(noise)[:, :keep] kept."""
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  return (ids_restore >= keep), ids_shuffle


def encoder_input_pe(grid: int, dim: int, mask, shift=None, dtype=jnp.float32):
  """(N, L, dim) sin-cos PE of the encoder input (spec 2.3 step 4, 4.3).

  shift: None, or the APE coordinate adversary's (column shift, row shift), added to the
  coordinates of masked patches (mask (N, L), True = masked).  Coordinates and their
  sin-cos are computed in at least float32 (bfloat16 coordinates are spaced 1/32 near
  column 6, so small shifts would round away) and cast to `dtype` after.
  """
  table = jnp.asarray(posembed.sincos_table(grid, dim)[1:], dtype)
  if shift is None:
    return jnp.broadcast_to(table[None], mask.shape + (dim,))
  shift = jnp.asarray(shift)
  cdt = jnp.promote_types(jnp.promote_types(dtype, shift.dtype), jnp.float32)
  cols, rows = posembed.grid_coordinates(grid)
  shift = shift.astype(cdt)
  shifted = posembed.sincos_from_coords(jnp.asarray(cols, cdt) + shift[0],
                                        jnp.asarray(rows, cdt) + shift[1], dim).astype(dtype)
  return jnp.where(mask[..., None], shifted[None], table[None])


class _ScanBlock(Block):
  """A Block as an `nn.scan` body: (x, query_mask) -> (x, None)."""

  def __call__(self, x, query_mask=None):
    return Block.__call__(self, x, query_mask), None


class MAEPlus(nn.Module):
  """MAE+ (mask tokens enter the encoder) with optional AdPE adversaries.

  pe: "ape" (fixed sin-cos only) or "rpe" (sin-cos plus iRPE-K in every attention layer
  of encoder and decoder, spec 3.5).
  adversary: "none" | "embedding" | "coordinate" (spec 4).
  rpe_embedding: for pe="rpe", adversary="embedding": "faithful" (the original's no-op,
  spec 4.4) or "per_bucket" (our working variant).
  encoder_sees_mask_tokens: True = MAE+ (the original); False = plain MAE (encoder on
  visible tokens only, mask tokens inserted in the decoder), APE only, for comparison.
  """
  image_size: int = 112
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  mlp_ratio: float = 4.0
  mask_ratio: float = 0.75
  pe: str = "ape"
  adversary: str = "none"
  rpe_embedding: str = "per_bucket"
  encoder_sees_mask_tokens: bool = True
  norm_pix_loss: bool = True   # False: the loss (and `pred`) in pixel units (MAE's flag)
  dtype: Optional[Dtype] = None
  remat: str = "none"   # "block": recompute each block's activations in the backward pass
  attention_impl: str = "auto"   # "xla" | "pallas" | "auto" (adpe_jax.kernels.attention)
  scan_blocks: bool = False   # True: encoder / decoder blocks as one nn.scan each (adpe_jax.layout)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  def _rpe(self):
    if self.pe != "rpe":
      return None
    adv = {"none": "none", "coordinate": "coordinate",
           "embedding": "embedding_faithful" if self.rpe_embedding == "faithful" else "embedding"
           }[self.adversary]
    lookup = "continuous" if self.adversary == "coordinate" else "integer"
    return dict(grid=self.grid, lookup=lookup, adversary=adv)

  def setup(self):
    p, d = self.patch_size, self.embed_dim
    fan_in = p * p * 3
    # Conv2d bias keeps torch's default init (the original's initialize_weights only
    # re-initialises the conv weight): uniform(+-1/sqrt(fan_in)).
    self.patch_embed = nn.Dense(
        d, dtype=self.dtype, kernel_init=xavier_uniform, name="patch_embed",
        bias_init=lambda k, s, dt=jnp.float32: jax.random.uniform(
            k, s, dt, -1 / np.sqrt(fan_in), 1 / np.sqrt(fan_in)))
    normal02 = nn.initializers.normal(0.02)
    self.cls_token = self.param("cls_token", normal02, (1, 1, d))
    ape_embed_adv = self.pe == "ape" and self.adversary == "embedding"
    if not ape_embed_adv and self.encoder_sees_mask_tokens:
      self.mask_token = self.param("mask_token", normal02, (1, 1, d))
    # The APE adversary (collection "adversary"), declared when initialising or when the
    # caller provides it (`features` needs none).
    self.adv_token = None
    if self.pe == "ape" and self.adversary != "none" and (
        self.is_initializing() or self.has_variable(ADVERSARY, "adv_token")):
      if ape_embed_adv:
        # spec 4.2 / 9.6: the adversary IS the mask token; there is no learnable one.
        init = lambda: normal02(self.make_rng("params"), (1, 1, d))  # noqa: E731
      else:
        # spec 4.3: (column shift, row shift) of the sin-cos coordinates of masked patches.
        init = lambda: jnp.zeros((2,), jnp.float32)  # noqa: E731
      self.adv_token = self.variable(ADVERSARY, "adv_token", init)
    if not self.encoder_sees_mask_tokens:
      self.decoder_mask_token = self.param("decoder_mask_token", normal02,
                                           (1, 1, self.decoder_embed_dim))
    self.blocks = self._block_stack("blocks", self.depth, self.num_heads)
    self.norm = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")
    self.decoder_embed = nn.Dense(self.decoder_embed_dim, dtype=self.dtype,
                                  kernel_init=xavier_uniform, name="decoder_embed")
    self.decoder_blocks = self._block_stack("decoder_blocks", self.decoder_depth,
                                            self.decoder_num_heads)
    self.decoder_norm = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="decoder_norm")
    self.decoder_pred = nn.Dense(p * p * 3, dtype=self.dtype, kernel_init=xavier_uniform,
                                 name="decoder_pred")

  # -- pieces ---------------------------------------------------------------------------
  def _embed_patches(self, images):
    x = patchify(images, self.patch_size)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    return self.patch_embed(x)

  def _pos_table(self, dim, dtype):
    return jnp.asarray(posembed.sincos_table(self.grid, dim), dtype)  # (1+L, dim), row 0 = 0

  def _ape_adversary(self):
    if self.adv_token is None:
      raise ValueError(
          f"MAEPlus(pe='ape', adversary={self.adversary!r}) needs the 'adversary' variable "
          f"collection for a masked forward: apply({{'params': ..., 'adversary': ...}}).")
    return self.adv_token.value

  def _encoder_input_pe(self, mask, dtype):
    """(N, L, D) sin-cos PE of the encoder input; masked patches shifted (APE coord)."""
    shift = None
    if self.pe == "ape" and self.adversary == "coordinate":
      shift = self._ape_adversary()
    return encoder_input_pe(self.grid, self.embed_dim, mask, shift, dtype)

  def _mask_vector(self):
    if self.pe == "ape" and self.adversary == "embedding":
      return self._ape_adversary()
    return self.mask_token

  def _block_stack(self, name: str, depth: int, num_heads: int):
    """`depth` Blocks named `{name}_i` (unrolled), or with `scan_blocks` ONE `nn.scan` over
    a Block named `name` whose variables ("params" and the RPE "adversary") carry a
    leading depth axis (`adpe_jax.layout`); query_mask is broadcast to every step.
    Either way remat="block" checkpoints each block (only block inputs are kept)."""
    kw = dict(num_heads=num_heads, mlp_ratio=self.mlp_ratio, dtype=self.dtype,
              rpe=self._rpe(), attention_impl=self.attention_impl)
    if not self.scan_blocks:
      block_cls = nn.remat(Block) if self.remat == "block" else Block
      return [block_cls(**kw, name=f"{name}_{i}") for i in range(depth)]
    block_cls = nn.remat(_ScanBlock, prevent_cse=False) if self.remat == "block" else _ScanBlock
    scanned = nn.scan(block_cls, variable_axes={"params": 0, ADVERSARY: 0},
                      split_rngs={"params": True}, in_axes=nn.broadcast, length=depth)
    return scanned(**kw, name=name)

  def _run_blocks(self, blocks, x, query_mask):
    if self.scan_blocks:
      return blocks(x, query_mask)[0]
    for blk in blocks:
      x = blk(x, query_mask)
    return x

  def _cls(self, n, dtype):
    cls = self.cls_token.astype(dtype)  # + pos_embed[0], which is the zero row
    return jnp.broadcast_to(cls, (n, 1, cls.shape[-1]))

  # -- public ----------------------------------------------------------------------------
  def __call__(self, images, noise=None, train: bool = True):
    del train  # no dropout / drop-path in pretraining; kept for the original's signature
    n = images.shape[0]
    l = self.num_patches
    keep = num_kept(l, self.mask_ratio)
    if noise is None:
      noise = jax.random.uniform(self.make_rng("masking"), (n, l))
    mask, ids_shuffle = mask_from_noise(noise, keep)

    x = self._embed_patches(images)  # (N, L, D)
    dtype = x.dtype
    if self.encoder_sees_mask_tokens:
      # MAE+ (spec 2.3 step 3): mask tokens replace masked patches before the encoder;
      # equivalent to the original's concat + un-shuffle gather, without the gathers.
      x = jnp.where(mask[..., None], self._mask_vector().astype(dtype), x)
      x = x + self._encoder_input_pe(mask, dtype)
      x = jnp.concatenate([self._cls(n, dtype), x], axis=1)
      query_mask = jnp.concatenate([jnp.zeros((n, 1), bool), mask], axis=1)  # mask_full
      x = self.norm(self._run_blocks(self.blocks, x, query_mask))
      self.sow("intermediates", "latent", x)
      z = self.decoder_embed(x)
    else:
      # Plain MAE: the encoder sees the visible tokens only (APE only).
      ids_keep = ids_shuffle[:, :keep]
      x = x + self._pos_table(self.embed_dim, dtype)[None, 1:]
      x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
      x = jnp.concatenate([self._cls(n, dtype), x], axis=1)
      x = self.norm(self._run_blocks(self.blocks, x, None))
      self.sow("intermediates", "latent", x)
      z = self.decoder_embed(x)
      ids_restore = jnp.argsort(ids_shuffle, axis=1)
      tokens = jnp.concatenate(
          [z[:, 1:], jnp.broadcast_to(self.decoder_mask_token.astype(z.dtype),
                                      (n, l - keep, z.shape[-1]))], axis=1)
      tokens = jnp.take_along_axis(tokens, ids_restore[..., None], axis=1)
      z = jnp.concatenate([z[:, :1], tokens], axis=1)
      query_mask = None
    z = z + self._pos_table(self.decoder_embed_dim, z.dtype)[None]
    z = self.decoder_norm(self._run_blocks(self.decoder_blocks, z, query_mask))
    pred = self.decoder_pred(z)[:, 1:]
    target = patchify(images, self.patch_size)
    loss = norm_pix_loss(pred, target, mask, self.norm_pix_loss)
    return loss, pred, mask.astype(pred.dtype)

  def features(self, images):
    """Frozen-encoder features for k-NN / probes: mean of patch tokens, no masking.

    images: (N, H, W, 3) -> (N, D).  No token is masked, so no adversary is applied and
    only the "params" collection is read: this is the encoder a downstream user gets.
    """
    n = images.shape[0]
    x = self._embed_patches(images)
    x = x + self._pos_table(self.embed_dim, x.dtype)[None, 1:]
    x = jnp.concatenate([self._cls(n, x.dtype), x], axis=1)
    # No masked query row: the RPE adversary is not read (nor needed).
    x = self.norm(self._run_blocks(self.blocks, x, None))
    return _f32_or_wider(x[:, 1:]).mean(axis=1)
