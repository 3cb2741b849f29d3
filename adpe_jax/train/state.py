"""The train state and the model built from a config."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax

from adpe_jax.models import MAEPlus, model_kwargs


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # optimizer steps taken, int32 scalar
  params: dict               # model and adversary parameters (adversary leaves named adv_*)
  opt_state: optax.OptState


def build_model(config) -> MAEPlus:
  m = config.model
  return MAEPlus(
      image_size=config.image_size,
      patch_size=m.patch_size,
      mask_ratio=config.mask_ratio,
      pe=m.pe,
      adversary=config.adversary.kind,
      rpe_embedding=config.adversary.rpe_embedding,
      encoder_sees_mask_tokens=m.encoder_sees_mask_tokens,
      dtype=None if m.dtype == "float32" else jnp.dtype(m.dtype),
      **model_kwargs(m.variant))


def init_params(model: MAEPlus, key: jax.Array) -> dict:
  """Parameters (float32) from a key; shapes do not depend on the batch size."""
  pkey, mkey = jax.random.split(key)
  dummy = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  return model.init({"params": pkey, "masking": mkey}, dummy)["params"]


def create_train_state(model: MAEPlus, tx: optax.GradientTransformation, key: jax.Array
                       ) -> TrainState:
  params = init_params(model, key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
