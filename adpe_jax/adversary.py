"""The adversary's side of the min-max step (spec 4.1): ascent, projection, metrics.

The adversary is the model's positional input, not a parameter: it lives in the Flax
variable collection `ADVERSARY` ("adversary", named in `adpe_jax.layout`), declared by the
modules that read it, so `model.init` returns `{"params": ..., "adversary": ...}`:

  APE + embedding   `adv_token` (1, 1, D)      replaces the mask token (spec 4.2)
  APE + coordinate  `adv_token` (2,)           shift of masked patches' sin-cos coords (4.3)
  RPE + embedding   `*/rpe_k/adv_token` (hd,)  faithful: the original's no-op (4.4)
                    `*/rpe_k/adv_table` (hd, 50)  per_bucket: our working variant
  RPE + coordinate  `*/rpe_k/adv_shift` (2,)   per-layer relative-offset shift (4.5)

The train step takes one `jax.value_and_grad(loss, argnums=(0, 1))(params, adversary)`
(the original's simultaneous step); AdamW descends on params, and `ascent(...)` below --
an ordinary `optax.GradientTransformation` on the adversary tree -- ascends with
Adam-normalised steps on its own schedule, then projects each adversary tensor onto the
L2 ball or the L-inf box of radius eps, after the update, every step (spec 4.1, 9.5).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from adpe_jax import layout
from adpe_jax.layout import ADVERSARY

NORMS = ("none", "l2", "linf")


def split_variables(variables) -> tuple[dict, dict]:
  """`model.init(...)` output -> (params, adversary); adversary is {} when absent."""
  return dict(variables["params"]), dict(variables.get(ADVERSARY, {}))


def as_variables(params, adversary) -> dict:
  """(params, adversary) -> the variables dict `model.apply` takes."""
  return {"params": params, ADVERSARY: adversary}


def zeros_like(adversary):
  return jax.tree.map(jnp.zeros_like, adversary)


def project(tree, norm: str, eps: float):
  """Per-tensor projection: L2 ball (never NaN, spec 9.4) or L-inf box of radius eps.

  A scanned model's adversary stacks the blocks' tensors (`layout`): each block's slice
  is projected on its own, exactly as the unrolled model's tensors are.
  """
  if norm == "none":
    return tree
  if norm == "l2":
    # optax's factor eps / sqrt(max(|p|^2, eps^2)) equals the original's
    # min(eps, |p|)/|p| for p != 0 and leaves p = 0 at 0 instead of 0/0 = NaN.
    return layout.per_block(lambda p: optax.projections.projection_l2_ball(p, eps), tree)
  if norm == "linf":
    return layout.per_block(lambda p: optax.projections.projection_linf_ball(p, eps), tree)
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
      raise ValueError("project_after_update needs the adversary (params=) to project.")
    new = project(jax.tree.map(lambda p, u: p + u, params, updates), norm, eps)
    return jax.tree.map(lambda n, p: n - p, new, params), state

  return optax.GradientTransformation(init_fn, update_fn)


def ascent(schedule: Callable, b1: float, b2: float, weight_decay: float, norm: str,
           eps: float) -> optax.GradientTransformation:
  """Adam-normalised gradient ASCENT with the original's semantics (spec 4.1, 9.5).

  The original puts the adversary in the model's AdamW with lr = -adv_lr(t) and
  wd = -adv_wd: p <- p + adv_lr * m_hat / (sqrt(v_hat) + 1e-8) - adv_lr * adv_wd * p,
  then projects.  Bias-corrected moments, betas as the model's.  Use it on the adversary
  tree: `updates, s = tx.update(grads, s, adversary)`; `optax.apply_updates`.
  """
  return optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8),
      optax.add_decayed_weights(-weight_decay) if weight_decay else optax.identity(),
      optax.scale_by_schedule(schedule),   # positive: ascent (optax descends by negating)
      project_after_update(norm, eps),
  )


def named_leaves(adversary) -> dict[str, jax.Array]:
  """{'path/to/tensor': array} of an adversary tree."""
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(adversary).items()}


def adversary_norms(adversary) -> dict[str, jax.Array]:
  """{'adv_norm/<path>': L2 norm} for every adversary tensor (for metrics).

  Per block, under the unrolled names (`adv_norm/blocks_3/attn/rpe_k/adv_shift`) whatever
  the layout, so the metrics of scanned and unrolled runs compare directly.
  """
  return {f"adv_norm/{k}": jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32))))
          for k, v in named_leaves(layout.to_unrolled(adversary)).items()}


def adversary_fractions(adversary, norm: str, eps: float) -> dict[str, jax.Array]:
  """{'adv_frac/<path>': how far each adversary tensor is out to its bound, in [0, 1]} --
  its L2 norm / eps under norm "l2", its largest |entry| / eps under "linf"; {} without a
  bound ("none").  Per block under the unrolled names, as `adversary_norms`.  Shows whether
  the adversary acts at all (a run whose shifts stay near 0 trains MAE+ in effect)."""
  if norm == "none" or eps <= 0:
    return {}
  def size(v):
    v = v.astype(jnp.float32)
    return (jnp.sqrt(jnp.sum(jnp.square(v))) if norm == "l2" else jnp.max(jnp.abs(v))) / eps
  return {f"adv_frac/{k}": size(v)
          for k, v in named_leaves(layout.to_unrolled(adversary)).items()}
