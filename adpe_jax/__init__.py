"""adpe_jax: AdPE (adversarial positional embeddings) and MAE+ pretraining in JAX/Flax."""

__version__ = "0.2.0"
