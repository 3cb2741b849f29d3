"""The adversary's side of the min-max step (spec 4.1): labels, ascent, projection.

The adversary tensors are ordinary parameters whose name starts with `adv_` (the
original selects them by "adv" in the name):

  APE + embedding   `adv_token` (1, 1, D)      replaces the mask token (spec 4.2)
  APE + coordinate  `adv_token` (2,)           shift of masked patches' sin-cos coords (4.3)
  RPE + embedding   `*/rpe_k/adv_token` (hd,)  faithful: the original's no-op (4.4)
                    `*/rpe_k/adv_table` (hd, 50)  per_bucket: our working variant
  RPE + coordinate  `*/rpe_k/adv_shift` (2,)   per-layer relative-offset shift (4.5)

One `jax.value_and_grad` gives gradients for model and adversary; `optax.multi_transform`
descends on the model (AdamW) and, here, ascends on the adversary with Adam-normalised
steps on its own schedule, then projects each adversary tensor onto the L2 ball or the
L-inf box of radius eps -- after the update, every step (spec 4.1, 9.5).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

MODEL, ADVERSARY = "model", "adversary"


def is_adversary_path(path: tuple[str, ...]) -> bool:
  return any(str(p).startswith("adv_") for p in path)


def param_labels(params) -> dict:
  """Same tree as params with leaves 'model' or 'adversary'."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: ADVERSARY if is_adversary_path(k) else MODEL for k in flat})


def adversary_leaves(params) -> dict[str, jax.Array]:
  flat = traverse_util.flatten_dict(params)
  return {"/".join(k): v for k, v in flat.items() if is_adversary_path(k)}


def model_leaves(tree) -> list:
  """The leaves of a params-shaped tree that belong to the model (not the adversary)."""
  flat = traverse_util.flatten_dict(tree)
  return [v for k, v in flat.items() if not is_adversary_path(k)]


def project(tree, norm: str, eps: float):
  """Per-tensor projection: L2 ball (never NaN, spec 9.4) or L-inf box of radius eps."""
  if norm == "none":
    return tree
  if norm == "l2":
    # optax's factor eps / sqrt(max(|p|^2, eps^2)) equals the original's
    # min(eps, |p|)/|p| for p != 0 and leaves p = 0 at 0 instead of 0/0 = NaN.
    return jax.tree.map(lambda p: optax.projections.projection_l2_ball(p, eps), tree)
  if norm == "linf":
    return jax.tree.map(lambda p: optax.projections.projection_linf_ball(p, eps), tree)
  raise ValueError(f"config field adversary.norm={norm!r}; allowed: 'none', 'l2', 'linf'.")


def project_after_update(norm: str, eps: float) -> optax.GradientTransformation:
  """Turns updates u into proj(p + u) - p, so `apply_updates` lands on the projection."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if norm == "none":
      return updates, state
    if params is None:
      raise ValueError("project_after_update needs params.")
    new = project(jax.tree.map(lambda p, u: p + u, params, updates), norm, eps)
    return jax.tree.map(lambda n, p: n - p, new, params), state

  return optax.GradientTransformation(init_fn, update_fn)


def ascent(schedule: Callable, b1: float, b2: float, weight_decay: float, norm: str,
           eps: float) -> optax.GradientTransformation:
  """Adam-normalised gradient ASCENT with the original's semantics (spec 4.1, 9.5).

  The original puts the adversary in the model's AdamW with lr = -adv_lr(t) and
  wd = -adv_wd: p <- p + adv_lr * m_hat / (sqrt(v_hat) + 1e-8) - adv_lr * adv_wd * p,
  then projects.  Bias-corrected moments, betas as the model's.
  """
  return optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8),
      optax.add_decayed_weights(-weight_decay) if weight_decay else optax.identity(),
      optax.scale_by_schedule(schedule),   # positive: ascent (optax descends by negating)
      project_after_update(norm, eps),
  )


def adversary_norms(params) -> dict[str, jax.Array]:
  """{'adv_norm/<path>': L2 norm} for every adversary tensor (for metrics)."""
  return {f"adv_norm/{k}": jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32))))
          for k, v in adversary_leaves(params).items()}
