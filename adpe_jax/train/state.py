"""The models built from a config (MAEPlus for pretraining, ViTClassifier for fine-tuning
and the frozen-encoder tasks), the pretraining train state and its initialisation."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax

from adpe_jax import adversary as adv_lib
from adpe_jax.models.classifier import ViTClassifier
from adpe_jax.models.mae import MAEPlus
from adpe_jax.models.variants import model_kwargs


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # optimizer steps taken, int32 scalar
  params: dict               # the model's parameters (Flax collection "params")
  adversary: dict            # the positional adversary (collection "adversary"; {} if none)
  opt_state: optax.OptState  # AdamW state of params
  adv_opt_state: optax.OptState  # ascent state of the adversary


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
      norm_pix_loss=bool(m.get("norm_pix_loss", True)),
      dtype=None if m.dtype == "float32" else jnp.dtype(m.dtype),
      remat=m.get("remat", "none"),
      attention_impl=m.get("attention_impl", "auto"),
      scan_blocks=bool(m.get("scan_blocks", False)),
      **model_kwargs(m.variant))


def init_variables(model: MAEPlus, key: jax.Array) -> dict:
  """{"params", "adversary"} (float32) from a key; shapes do not depend on the batch size."""
  pkey, mkey = jax.random.split(key)
  dummy = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  params, adversary = adv_lib.split_variables(model.init({"params": pkey, "masking": mkey}, dummy))
  return adv_lib.as_variables(params, adversary)


def init_params(model: MAEPlus, key: jax.Array) -> dict:
  """The model's parameters alone (the encoder for k-NN, probes and export)."""
  return init_variables(model, key)["params"]


def create_train_state(model: MAEPlus, tx: optax.GradientTransformation,
                       adv_tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
  variables = init_variables(model, key)
  params, adversary = variables["params"], variables[adv_lib.ADVERSARY]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, adversary=adversary,
                    opt_state=tx.init(params), adv_opt_state=adv_tx.init(adversary))


def build_classifier(config) -> ViTClassifier:
  """The fine-tune model (also the frozen trunk of the probe and k-NN tasks)."""
  m = config.model
  kw = model_kwargs(m.variant)
  return ViTClassifier(
      num_classes=config.data.num_classes, image_size=config.image_size,
      patch_size=m.patch_size, embed_dim=kw["embed_dim"], depth=kw["depth"],
      num_heads=kw["num_heads"], pe=m.pe, rpe_lookup=m.rpe_lookup,
      rpe_unscaled_query=m.rpe_query == "unscaled", drop_path=m.drop_path,
      global_pool=m.global_pool, dtype=None if m.dtype == "float32" else jnp.dtype(m.dtype),
      attention_impl=m.attention_impl)


def init_classifier_params(model: ViTClassifier, key) -> dict:
  """Fresh classifier parameters (head trunc-normal 2e-5, as the original)."""
  dummy = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  return model.init({"params": key}, dummy)["params"]
