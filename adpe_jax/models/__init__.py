"""Flax (linen) models: ViT blocks (`vit`), the MAE+ pretraining model (`mae`), the
fine-tune classifier (`classifier`), the linear probe's head (`probe`) and the ViT variants
(`variants`).  The parameter layout (collections, scanned / unrolled blocks) is the leaf
`adpe_jax.layout`, which the models and everything reading their trees import.

Nothing is re-exported: import the submodule that owns a name (`adpe_jax.models.mae.MAEPlus`),
so that importing a light submodule (`variants`) does not import the whole model.
"""
