"""Flax (linen) models: ViT blocks (`vit`), the MAE+ pretraining model (`mae`), the
fine-tune classifier (`classifier`), the scanned / unrolled parameter layout (`layout`)
and the ViT variants (`variants`).

Nothing is re-exported: import the submodule that owns a name (`adpe_jax.models.mae.MAEPlus`),
so that importing a light submodule (`layout`) does not import the whole model.
"""
