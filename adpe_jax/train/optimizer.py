"""Learning-rate schedules and the optax optimizers: pretraining / fine-tuning (spec 3,
tables and schedule) and MAE's LARS of the linear probe (`lars`)."""

from __future__ import annotations

import math

import jax
import numpy as np
import jax.numpy as jnp
import optax

from adpe_jax import adversary as adv_lib
from adpe_jax import layout


def scaled_lr(base_lr: float, batch_size: int) -> float:
  """lr = blr * effective batch / 256; the batch counts images, not crops (spec 1.1)."""
  return base_lr * batch_size / 256


def warmup_cosine(peak: float, min_lr: float, warmup_steps: float, total_steps: float,
                  accum_steps: int):
  """The original's per-iteration schedule, evaluated at each optimizer step.

  The original sets the lr at every micro-step t = epoch + it / len(loader) and steps the
  optimizer at micro-step accum-1 of each group (spec 3, Schedule), so optimizer step s
  (0-based) uses the schedule at u = s + (accum-1)/accum optimizer steps.
  """
  offset = (accum_steps - 1) / accum_steps

  def schedule(step):
    u = jnp.asarray(step, jnp.float32) + offset
    warm = peak * u / max(warmup_steps, 1e-12)
    frac = jnp.clip((u - warmup_steps) / max(total_steps - warmup_steps, 1e-12), 0.0, 1.0)
    cos = min_lr + (peak - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    return jnp.where(u < warmup_steps, warm, cos)

  return schedule


def decay_mask(params) -> dict:
  """Weight decay for every tensor except 1-D ones and biases (spec 3 group table).

  cls_token, mask_token and the RPE tables (>= 2-D) ARE decayed, as in the original.
  Scanned blocks (`layout`): the dimensions of one block's tensor count, not the depth axis.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, v: not (layout.per_block_ndim(path, v) <= 1
                           or getattr(path[-1], "key", None) == "bias"), params)


def schedules(config, total_steps: int, steps_per_epoch: float):
  warmup = config.warmup_epochs * steps_per_epoch
  lr = warmup_cosine(scaled_lr(config.blr, config.batch_size), config.min_lr, warmup,
                     total_steps, config.accum_steps)
  adv_lr = warmup_cosine(scaled_lr(config.adversary.lr, config.batch_size), 0.0, warmup,
                         total_steps, config.accum_steps)
  return lr, adv_lr


def adversary_budget(config, total_steps: int, steps_per_epoch: float) -> float:
  """The adversary's step budget: the sum of its learning rate over the run.

  The ascent is Adam-normalised, so a coordinate pushed the same way every step moves
  about its lr each step: the budget is the farthest it can travel, to compare with its
  bound adversary.eps.  The seed recipe of ViT-B (400 epochs of ImageNet, 124,800 steps at
  2.4e-3) gives it 150 eps; 300 demo steps at the same kind of rate give 0.09 eps, and the
  adversary never nears its bound (issue 30): the demo sets its rate by this budget.
  """
  _, adv_lr = schedules(config, total_steps, steps_per_epoch)
  steps = np.arange(int(total_steps))
  return float(np.sum(np.asarray(jax.jit(jax.vmap(adv_lr))(steps), np.float64)))


def adversary_lr_for_budget(config, total_steps: int, steps_per_epoch: float,
                            budget_in_eps: float) -> float:
  """The base adversary.lr whose budget (`adversary_budget`) is budget_in_eps * eps (the
  budget is linear in the base rate)."""
  probe = config.copy_and_resolve_references()
  probe.adversary.lr = 1.0
  return budget_in_eps * config.adversary.eps / adversary_budget(probe, total_steps,
                                                                 steps_per_epoch)


def make_optimizer(config, total_steps: int, steps_per_epoch: float
                   ) -> optax.GradientTransformation:
  """AdamW (b1, b2, eps 1e-8, decoupled decay on `decay_mask`) on the model's params."""
  lr, _ = schedules(config, total_steps, steps_per_epoch)
  return optax.adamw(lr, b1=config.b1, b2=config.b2, eps=1e-8,
                     weight_decay=config.weight_decay, mask=decay_mask)


def make_adversary_optimizer(config, total_steps: int, steps_per_epoch: float
                             ) -> optax.GradientTransformation:
  """Adam-normalised ascent + projection on the adversary tree (`adversary.ascent`)."""
  _, adv_lr = schedules(config, total_steps, steps_per_epoch)
  return adv_lib.ascent(adv_lr, config.b1, config.b2, config.adversary.weight_decay,
                        config.adversary.norm, config.adversary.eps)


def make_optimizers(config, total_steps: int, steps_per_epoch: float):
  """(tx for params, adv_tx for the adversary)."""
  return (make_optimizer(config, total_steps, steps_per_epoch),
          make_adversary_optimizer(config, total_steps, steps_per_epoch))


# -- fine-tuning: AdamW with layer-wise lr decay (the original's optimizer/lr_decay.py::
# param_groups_lrd: cls_token, pos_embed, patch_embed -> layer 0, blocks_k -> k + 1, the
# rest -> depth + 1; scale layer_decay ** (depth + 1 - layer); no weight decay for 1-D
# tensors, pos_embed and cls_token) ------------------------------------------------------------

def layer_id(name: str, depth: int) -> int:
  """The original's get_layer_id_for_vit, for our top-level parameter names."""
  if name in ("cls_token", "pos_embed", "patch_embed"):
    return 0
  if name.startswith("blocks_"):
    return int(name.split("_")[1]) + 1
  return depth + 1


def lr_scales(params, depth: int, layer_decay: float):
  """Per-tensor lr factor layer_decay ** (depth + 1 - layer_id)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: layer_decay ** (depth + 1 - layer_id(path[0].key, depth)), params)


def classifier_decay_mask(params):
  """Weight decay except for 1-D tensors and pos_embed / cls_token (no_weight_decay())."""
  return jax.tree_util.tree_map_with_path(
      lambda path, v: not (v.ndim == 1 or path[0].key in ("pos_embed", "cls_token")), params)


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update by a constant of the same tree (the group's lr_scale)."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def finetune_optimizer(config, params_shape, depth: int, total_steps: int, steps_per_epoch: float):
  """torch AdamW over param_groups_lrd: (Adam, decoupled decay) * lr(step) * lr_scale."""
  lr = finetune_schedule(config, total_steps, steps_per_epoch)
  tx = optax.chain(
      optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=1e-8),
      optax.add_decayed_weights(config.weight_decay, classifier_decay_mask),
      optax.scale_by_learning_rate(lr),
      scale_by_tree(lr_scales(params_shape, depth, config.layer_decay)))
  return tx, lr


def finetune_schedule(config, total_steps: int, steps_per_epoch: float):
  """Warmup + cosine to min_lr, evaluated at optimizer step s exactly (the original sets it
  only at micro-step it % accum_iter == 0, the first of each optimizer step)."""
  return warmup_cosine(scaled_lr(config.blr, config.batch_size), config.min_lr,
                             config.warmup_epochs * steps_per_epoch, total_steps, 1)


def lars(learning_rate, weight_decay: float = 0.0, momentum: float = 0.9,
         trust_coefficient: float = 0.001) -> optax.GradientTransformation:
  """MAE's util/lars.py LARS from optax's parts: for tensors of > 1 dim, g + wd * p scaled
  by trust_coefficient * |p| / |g + wd p| (1 where a norm is 0); then mu = m mu + g and
  p -= lr mu.  (`optax.lars` scales by the lr before the momentum trace, which differs
  from MAE whenever the lr changes, i.e. under warmup + cosine.)  The linear probe's
  optimizer (config optimizer="lars")."""
  mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=mask),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=0.0),
                   mask),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate))
