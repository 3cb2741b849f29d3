"""Flax (linen) models: ViT blocks and the MAE+ pretraining model."""

from adpe_jax.models.mae import MAEPlus, patchify, unpatchify, norm_pix_loss  # noqa: F401
from adpe_jax.models.variants import VARIANTS, model_kwargs  # noqa: F401
