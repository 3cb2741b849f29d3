"""The pure, compiled train step: train_step(state, batch, rng) -> (state, metrics).

One `jax.value_and_grad` of the MAE+ loss gives gradients for the model AND the
adversary; gradient accumulation is a `lax.scan` inside the step; the optimizer
(`train.optimizer.make_optimizer`) descends on the model and ascends on the adversary.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from adpe_jax import adversary as adv_lib
from adpe_jax.train.state import TrainState


def split_micro(batch: dict, accum: int) -> dict:
  """(N, ...) -> (accum, N/accum, ...), micro-batch i = examples i, i+accum, ...

  Strided rather than contiguous so that every device's shard of the data axis feeds
  every micro-step (a contiguous split would idle most devices in each micro-step).
  """
  def f(x):
    return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(f, batch)


def make_loss_fn(model) -> Callable:
  def loss_fn(params, batch, key):
    loss, _, _ = model.apply({"params": params}, batch["images"], noise=batch.get("noise"),
                             rngs={"masking": key})
    return loss
  return loss_fn


def make_train_step(model, tx: optax.GradientTransformation, accum_steps: int,
                    lr_fn: Callable | None = None, adv_lr_fn: Callable | None = None):
  """Builds train_step(state, batch, rng).

  batch: {"images": (N, H, W, 3) float, optional "noise": (N, L)} -- all crops, global.
  rng: the run's base key; the step key is fold_in(rng, state.step) (inside jit).
  """
  grad_fn = jax.value_and_grad(make_loss_fn(model))

  def compute_grads(params, batch, key):
    if accum_steps == 1:
      return grad_fn(params, batch, jax.random.fold_in(key, 0))
    micro = split_micro(batch, accum_steps)

    def body(carry, inp):
      i, mb = inp
      loss, grads = grad_fn(params, mb, jax.random.fold_in(key, i))
      return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    loss_dtype = jnp.promote_types(jax.tree.leaves(params)[0].dtype, jnp.float32)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), loss_dtype), zeros),
                                    (jnp.arange(accum_steps), micro))
    scale = 1.0 / accum_steps
    return loss * scale, jax.tree.map(lambda g: g * scale, grads)

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    key = jax.random.fold_in(rng, state.step)
    loss, grads = compute_grads(state.params, batch, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss,
               "grad_norm": optax.global_norm(adv_lib.model_leaves(grads)),
               "finite": (jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
                          ).astype(jnp.float32)}
    if lr_fn is not None:
      metrics["lr"] = lr_fn(state.step)
    if adv_lr_fn is not None and adv_lib.adversary_leaves(params):
      metrics["adv_lr"] = adv_lr_fn(state.step)
    metrics.update(adv_lib.adversary_norms(params))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step
