"""The pure, compiled train step: train_step(state, batch, rng) -> (state, metrics).

One `jax.value_and_grad` of the MAE+ loss gives gradients for the model AND the
adversary (the original's simultaneous min-max step, spec 4.1); gradient accumulation is
a `lax.scan` inside the step; the optimizer (`train.optimizer.make_optimizer`) descends
on the model and ascends on the adversary.  With `inner_steps = k > 0`, a PGD-style
inner ascent of k steps on a per-batch copy of the adversary comes first (not in the
original; costs k extra forward/backward passes).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

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


def _split_adversary(params):
  flat = traverse_util.flatten_dict(params)
  adv = {k: v for k, v in flat.items() if adv_lib.is_adversary_path(k)}
  return adv, flat


def _with_adversary(flat, adv):
  merged = dict(flat)
  merged.update(adv)
  return traverse_util.unflatten_dict(merged)


def pgd_inner_ascent(loss_fn, params, batch, key, steps: int, norm: str, eps: float,
                     step_size: float):
  """k steps of projected ascent on a copy of the adversary (same batch and masks).

  The step direction is sign(g) for L-inf / no projection, g/|g| for L2 (per tensor),
  i.e. classic PGD; returns params with the perturbed adversary copy.
  """
  adv, flat = _split_adversary(params)
  if not adv:
    return params

  def adv_loss(a):
    return loss_fn(_with_adversary(flat, a), batch, key)

  def body(a, _):
    g = jax.grad(adv_loss)(a)
    if norm == "l2":
      d = {k: v / jnp.maximum(jnp.linalg.norm(v), 1e-12) for k, v in g.items()}
    else:
      d = {k: jnp.sign(v) for k, v in g.items()}
    a = {k: a[k] + step_size * d[k] for k in a}
    return adv_lib.project(a, norm, eps), None

  adv, _ = jax.lax.scan(body, adv, None, length=steps)
  return _with_adversary(flat, adv)


def make_train_step(model, tx: optax.GradientTransformation, accum_steps: int,
                    lr_fn: Callable | None = None, adv_lr_fn: Callable | None = None,
                    inner_steps: int = 0, adv_norm: str = "none", adv_eps: float = 1.0,
                    inner_step_size: float = 0.0):
  """Builds train_step(state, batch, rng).

  batch: {"images": (N, H, W, 3) float, optional "noise": (N, L)} -- all crops, global.
  rng: the run's base key; the step key is fold_in(rng, state.step) (inside jit).
  """
  loss_fn = make_loss_fn(model)
  grad_fn = jax.value_and_grad(loss_fn)
  step_size = inner_step_size or 2.5 * adv_eps / max(inner_steps, 1)

  def micro_grads(params, batch, key):
    if inner_steps:
      perturbed = pgd_inner_ascent(loss_fn, params, batch, key, inner_steps, adv_norm,
                                   adv_eps, step_size)
      return grad_fn(perturbed, batch, key)
    return grad_fn(params, batch, key)

  def compute_grads(params, batch, key):
    if accum_steps == 1:
      return micro_grads(params, batch, jax.random.fold_in(key, 0))
    micro = split_micro(batch, accum_steps)

    def body(carry, inp):
      i, mb = inp
      loss, grads = micro_grads(params, mb, jax.random.fold_in(key, i))
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


def make_adversary_gap(model) -> Callable:
  """gap(params, batch, key) -> loss(adversary) - loss(adversary at zero), same masks.

  The loss gap the adversary creates (for metrics at log steps only: two forwards).
  """
  loss_fn = make_loss_fn(model)

  def gap(params, batch, key):
    adv, flat = _split_adversary(params)
    zero = {k: jnp.zeros_like(v) for k, v in adv.items()}
    key = jax.random.fold_in(key, 0)
    return loss_fn(params, batch, key) - loss_fn(_with_adversary(flat, zero), batch, key)

  return gap
