"""The pure, compiled train step: train_step(state, batch, rng) -> (state, metrics).

One `jax.value_and_grad(loss, argnums=(0, 1))(params, adversary, ...)` gives the
gradients of the MAE+ loss with respect to the model's parameters AND the positional
adversary (the original's simultaneous min-max step, spec 4.1: one forward/backward for
both); gradient accumulation is a `lax.scan` inside the step; AdamW (`tx`) descends on
params, the adversary's ascent + projection (`adv_tx`, `adversary.ascent`) on the
adversary tree.  With `inner_steps = k > 0`, a PGD-style inner ascent of k steps on a
per-batch copy of the adversary comes first (not in the original; costs k extra
forward/backward passes).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from adpe_jax import adversary as adv_lib
from adpe_jax.data import multicrop
from adpe_jax import layout
from adpe_jax.train.state import TrainState


def split_micro(batch: dict, accum: int) -> dict:
  """(N, ...) -> (accum, N/accum, ...), micro-batch i = examples i, i+accum, ...

  Strided rather than contiguous so that every device's shard of the data axis feeds
  every micro-step (a contiguous split would idle most devices in each micro-step).
  """
  def f(x):
    return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(f, batch)


# fold_in constant of the per-id mask noise ("mask"; micro keys are 0..accum-1)
MASK_STREAM = 0x6D61736B


def with_mask_noise(batch: dict, key: jax.Array, num_patches: int) -> dict:
  """Adds "noise" (N, L) drawn per row from (key, id) when the batch carries "ids".

  A crop's mask then depends on the step and its id only -- not on its row, the number of
  processes or the micro-batch it lands in -- so a run on 2 processes x 2 devices masks
  exactly as one on 1 x 4.  Without ids (or with explicit noise) the batch is unchanged.
  """
  if "ids" not in batch or "noise" in batch:
    return batch
  noise = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (num_patches,)))(
      batch["ids"])
  return {k: v for k, v in batch.items() if k != "ids"} | {"noise": noise}


def normalize_on_device(batch: dict) -> dict:
  """uint8 crops (data.normalize_on_device) -> float32 (x / 255 - mean) / std, else unchanged.

  A lookup in the host's own table (`multicrop.NORMALIZE_TABLE`, torch's ToTensor + Normalize
  in float32), so the values are those of the host-normalised batch bit for bit on every
  backend: written as arithmetic, XLA turns the divisions by constants into multiplications
  by reciprocals (up to 7e-7 off on CPU).
  """
  images = batch["images"]
  if images.dtype != jnp.uint8:
    return batch
  table = jnp.asarray(multicrop.NORMALIZE_TABLE)
  return batch | {"images": table[images.astype(jnp.int32), jnp.arange(3)]}


def make_loss_fn(model) -> Callable:
  """loss(params, adversary, batch, key) -> the MAE+ loss (scalar)."""
  def loss_fn(params, adversary, batch, key):
    loss, _, _ = model.apply(adv_lib.as_variables(params, adversary), batch["images"],
                             noise=batch.get("noise"), rngs={"masking": key})
    return loss
  return loss_fn


def pgd_inner_ascent(loss_fn, params, adversary, batch, key, steps: int, norm: str,
                     eps: float, step_size: float):
  """k steps of projected ascent on a copy of the adversary tree (same batch and masks).

  The step direction is sign(g) for L-inf / no projection, g/|g| for L2 (per tensor; per
  block's slice of a scanned model's stacked tensors), i.e. classic PGD; returns the
  perturbed adversary tree.
  """
  if not jax.tree.leaves(adversary):
    return adversary

  def body(a, _):
    g = jax.grad(loss_fn, argnums=1)(params, a, batch, key)
    if norm == "l2":
      d = layout.per_block(lambda v: v / jnp.maximum(jnp.linalg.norm(v), 1e-12), g)
    else:
      d = jax.tree.map(jnp.sign, g)
    a = jax.tree.map(lambda x, y: x + step_size * y, a, d)
    return adv_lib.project(a, norm, eps), None

  adversary, _ = jax.lax.scan(body, adversary, None, length=steps)
  return adversary


def make_train_step(model, tx: optax.GradientTransformation,
                    adv_tx: optax.GradientTransformation, accum_steps: int,
                    lr_fn: Callable | None = None, adv_lr_fn: Callable | None = None,
                    inner_steps: int = 0, adv_norm: str = "none", adv_eps: float = 1.0,
                    inner_step_size: float = 0.0):
  """Builds train_step(state, batch, rng).

  batch: {"images": (N, H, W, 3) float, optional "noise": (N, L)} -- all crops, global.
  rng: the run's base key; the step key is fold_in(rng, state.step) (inside jit).
  """
  loss_fn = make_loss_fn(model)
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1))
  step_size = inner_step_size or 2.5 * adv_eps / max(inner_steps, 1)

  def micro_grads(params, adversary, batch, key):
    if inner_steps:
      adversary = pgd_inner_ascent(loss_fn, params, adversary, batch, key, inner_steps,
                                   adv_norm, adv_eps, step_size)
    return grad_fn(params, adversary, batch, key)

  def compute_grads(params, adversary, batch, key):
    if accum_steps == 1:
      return micro_grads(params, adversary, batch, jax.random.fold_in(key, 0))
    micro = split_micro(batch, accum_steps)

    def body(carry, inp):
      i, mb = inp
      loss, grads = micro_grads(params, adversary, mb, jax.random.fold_in(key, i))
      return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

    zeros = jax.tree.map(jnp.zeros_like, (params, adversary))
    loss_dtype = jnp.promote_types(jax.tree.leaves(params)[0].dtype, jnp.float32)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), loss_dtype), zeros),
                                    (jnp.arange(accum_steps), micro))
    scale = 1.0 / accum_steps
    return loss * scale, jax.tree.map(lambda g: g * scale, grads)

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    key = jax.random.fold_in(rng, state.step)
    batch = normalize_on_device(batch)
    batch = with_mask_noise(batch, jax.random.fold_in(key, MASK_STREAM), model.num_patches)
    loss, (grads, adv_grads) = compute_grads(state.params, state.adversary, batch, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    adv_updates, adv_opt_state = adv_tx.update(adv_grads, state.adv_opt_state,
                                               state.adversary)
    adversary = optax.apply_updates(state.adversary, adv_updates)
    grad_norm = optax.global_norm(grads)
    metrics = {"loss": loss,
               "grad_norm": grad_norm,
               "finite": (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                          & jnp.isfinite(optax.global_norm(adv_grads))).astype(jnp.float32)}
    if lr_fn is not None:
      metrics["lr"] = lr_fn(state.step)
    if adv_lr_fn is not None and jax.tree.leaves(adversary):
      metrics["adv_lr"] = adv_lr_fn(state.step)
    metrics.update(adv_lib.adversary_norms(adversary))
    metrics.update(adv_lib.adversary_fractions(adversary, adv_norm, adv_eps))
    new_state = state.replace(step=state.step + 1, params=params, adversary=adversary,
                              opt_state=opt_state, adv_opt_state=adv_opt_state)
    return new_state, metrics

  return train_step


def make_adversary_gap(model) -> Callable:
  """gap(params, adversary, batch, key) -> loss(adversary) - loss(adversary at zero).

  Same batch, same masks (the step's micro-batch-0 key); for metrics at log steps only
  (two forwards).  For APE-embedding, "zero" is a zero mask vector.
  """
  loss_fn = make_loss_fn(model)

  def gap(params, adversary, batch, key):
    batch = normalize_on_device(batch)
    batch = with_mask_noise(batch, jax.random.fold_in(key, MASK_STREAM), model.num_patches)
    key = jax.random.fold_in(key, 0)
    return (loss_fn(params, adversary, batch, key)
            - loss_fn(params, adv_lib.zeros_like(adversary), batch, key))

  return gap
