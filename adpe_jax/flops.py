"""Analytic FLOPs of the MAE+ / AdPE train step (for TFLOP/s and MFU).

Why analytic: the compiled step runs its `accum_steps` micro-batches in a `lax.scan`,
and XLA's `cost_analysis()` counts a loop body once, not once per iteration -- at
`accum_steps=4` it reports a quarter of the step's work (measured; tests/test_flops.py).
Counting here does not depend on how the step is compiled.

Convention (as in MFU reports, e.g. PaLM appendix B): matrix multiplies only, 2 FLOPs per
multiply-add; the backward pass costs twice the forward, so a train step is 3x the
forward.  Element-wise work (softmax, LayerNorm, GELU, the optimizer) is not counted;
at ViT-B widths it is a few per cent of XLA's own count at accum 1 (tested).
"""

from __future__ import annotations


def _block(tokens: int, dim: int, mlp_ratio: float, rpe_terms: int) -> float:
  """One pre-norm ViT block on `tokens` tokens of width `dim`.

  qkv (3 D^2), proj (D^2), MLP (2 r D^2) per token; q k^T and attn v (2 T^2 D); each
  iRPE contraction q . R[:, i, j] is another T^2 D multiply-adds over all heads.
  """
  t, d = tokens, dim
  linear = t * (3 * d * d + d * d + 2 * mlp_ratio * d * d)
  attention = 2 * t * t * d
  rpe = rpe_terms * t * t * d
  return 2.0 * (linear + attention + rpe)


def _rpe_terms(model) -> int:
  """How many q . R contractions each attention layer computes (0 for APE)."""
  if model.pe != "rpe":
    return 0
  if model.adversary == "coordinate":
    return 2                                  # R(0) for every row and R(shift) - R(0)
  if model.adversary == "embedding" and model.rpe_embedding != "faithful":
    return 2                                  # W and the per-bucket adversary table
  return 1                                    # faithful embedding adds q . a only: O(T D)


def forward_flops_per_crop(model) -> float:
  """Matmul FLOPs of one crop's forward pass through `model` (an `MAEPlus`)."""
  l = model.num_patches
  patch_dim = model.patch_size * model.patch_size * 3
  keep = int(l * (1 - model.mask_ratio))
  enc_tokens = 1 + (l if model.encoder_sees_mask_tokens else keep)
  dec_tokens = 1 + l
  terms = _rpe_terms(model)
  flops = 2.0 * l * patch_dim * model.embed_dim                               # patch embed
  flops += model.depth * _block(enc_tokens, model.embed_dim, model.mlp_ratio, terms)
  flops += 2.0 * enc_tokens * model.embed_dim * model.decoder_embed_dim        # decoder embed
  flops += model.decoder_depth * _block(dec_tokens, model.decoder_embed_dim, model.mlp_ratio,
                                        terms)
  flops += 2.0 * dec_tokens * model.decoder_embed_dim * patch_dim               # prediction
  return flops


def train_step_flops(model, crops_per_step: int, inner_steps: int = 0) -> float:
  """FLOPs of one optimizer step over `crops_per_step` crops (all micro-batches).

  3x the forward (forward + backward); each PGD inner step adds a forward and a backward
  to the activations (2x the forward).  Independent of `accum_steps`.
  """
  return forward_flops_per_crop(model) * crops_per_step * (3 + 2 * inner_steps)
