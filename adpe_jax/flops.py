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


# -- whole runs: a pretraining, fine-tune or linear probe, with its evaluations -------------------

# bf16 dense peak FLOP/s per chip (vendor data sheets, no sparsity).
PEAK_BF16 = {"H100": 989e12, "A100": 312e12}


def vit_forward_flops(variant: str, patch_size: int, image_size: int, pe: str,
                      num_classes: int = 0) -> float:
  """Matmul FLOPs of one image through the ViT encoder on every patch and the cls token
  (the fine-tune classifier, the frozen encoder of the probe and the k-NN), plus a
  `num_classes` head on one pooled vector.  iRPE adds one q . R contraction per layer."""
  from adpe_jax.models.variants import model_kwargs  # noqa: PLC0415 (flops stays import-light)
  dims = model_kwargs(variant)
  l = (image_size // patch_size) ** 2
  d = dims["embed_dim"]
  flops = 2.0 * l * patch_size * patch_size * 3 * d
  flops += dims["depth"] * _block(1 + l, d, 4.0, 1 if pe == "rpe" else 0)
  return flops + 2.0 * d * num_classes


def _evaluations(total_steps: int, every_steps: int) -> int:
  """Evaluations of a run: every `every_steps` and at the end (once if they coincide)."""
  if every_steps <= 0:
    return 1
  return total_steps // every_steps + (1 if total_steps % every_steps else 0)


def run_flops(config, train_examples: int, eval_examples: int) -> dict:
  """Matmul FLOPs of one whole run of a task config, by part: {"train", "eval", "total"}.

  Steps as the run counts them (`total_steps`, else `total_epochs` of train_examples //
  batch_size).  pretrain: the train step (`train_step_flops`); the held-out loss (two
  forwards, adversary off and on, of eval.heldout_examples) at each evaluation; the k-NN
  (encoder forwards of its train and test images, trained and at initialisation) at the end.
  finetune: 3x the classifier forward per image; linprobe: the frozen encoder's forward
  only (the probe's BatchNorm + Linear is negligible), its encoder fields set (not "auto").
  Both: the classifier forward of eval_examples (max_examples if set) at each evaluation
  (the probe: once, its eval features are cached).
  """
  task = config.get("task", "pretrain")
  per_epoch = train_examples // config.batch_size
  steps = config.total_steps if config.total_steps > 0 else int(config.total_epochs * per_epoch)
  m = config.model
  evals = eval_examples if not config.get("eval", {}).get("max_examples", 0) else min(
      eval_examples, config.eval.max_examples)
  if task == "pretrain":
    from adpe_jax.train.state import build_model  # noqa: PLC0415 (flax, lazily)
    model = build_model(config)
    train = steps * train_step_flops(model, config.num_crops * config.batch_size,
                                     config.adversary.inner_steps)
    e = config.eval
    n = min(e.heldout_examples, evals)
    n -= n % min(64, n)                                     # whole chunks of 64 (HeldoutLoss)
    heldout = (_evaluations(steps, e.heldout_every_steps) * 2 * n * forward_flops_per_crop(model)
               if e.heldout_split else 0.0)
    knn = (2 * (min(e.knn_train_examples, train_examples) + min(e.knn_test_examples, evals))
           * vit_forward_flops(m.variant, m.patch_size, config.image_size, m.pe)
           if e.knn_source else 0.0)
    ev = heldout + knn
  elif task in ("finetune", "linprobe"):
    fwd = vit_forward_flops(m.variant, m.patch_size, config.image_size, m.pe,
                            config.data.num_classes)
    train = steps * config.batch_size * fwd * (3 if task == "finetune" else 1)
    every = config.eval.every_steps or per_epoch
    ev = evals * fwd * (_evaluations(steps, every) if task == "finetune" else 1)
  else:
    raise ValueError(f"run_flops: task {task!r} is not pretrain, finetune or linprobe.")
  return {"train": float(train), "eval": float(ev), "total": float(train + ev)}


def accelerator_hours(flops: float, peak_flops: float, utilisation: float) -> float:
  """Hours of one chip at `utilisation` of its `peak_flops` (FLOP/s) for `flops`."""
  return flops / (peak_flops * utilisation) / 3600.0
