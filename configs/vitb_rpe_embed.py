"""AdPE, RPE + adversarial embedding, ViT-B/16 (--pe_type 1 --adv_type 1).

Uses adversary.rpe_embedding='per_bucket' (ours): a per-bucket perturbation of each layer's
RPE table for masked query rows, which really moves the logits. The original's version adds
one vector to every bucket, which softmax cancels (spec 4.4): run it with ':faithful'.

Command:
  python -m adpe_jax.main --config=configs/vitb_rpe_embed.py --workdir=runs/vitb_rpe_embed
  1600 epochs: --config=configs/vitb_rpe_embed.py:1600ep
  seconds on a CPU: --config=configs/vitb_rpe_embed.py:smoke
Hardware: the original ran 8 x V100 32GB (128 images x 4 accumulation per GPU = 4096 images per
step); here batch_size=4096 is global and accum_steps=4 splits it inside the compiled step.
One 8-GPU A100/H100 node or a TPU v4-32 slice fits it in bf16 (--config.model.dtype=bfloat16).
Reported (seed README, fine-tune top-1 with pe_type 1): 84.3 (the original's no-op variant).
"""

from adpe_jax.config import pretrain


def get_config(arg=None):
  return pretrain.seed_config("rpe", "embedding", arg, variant="base", patch_size=16)
