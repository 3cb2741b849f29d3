"""AdPE, APE + adversarial embedding, ViT-B/16 (--pe_type 0 --adv_type 1).

The adversary is the mask token itself (spec 4.2), ascended with Adam at adversary.lr.
Projection: adversary.norm / adversary.eps (the original's default: none, 1.0; the paper's
values are in its unavailable supplementary Table A.2).

Command:
  python -m adpe_jax.main --config=configs/vitb_ape_embed.py --workdir=runs/vitb_ape_embed
  1600 epochs: --config=configs/vitb_ape_embed.py:1600ep
  seconds on a CPU: --config=configs/vitb_ape_embed.py:smoke
Hardware: the original ran 8 x V100 32GB (128 images x 4 accumulation per GPU = 4096 images per
step); here batch_size=4096 is global and accum_steps=4 splits it inside the compiled step.
One 8-GPU A100/H100 node or a TPU v4-32 slice fits it in bf16 (--config.model.dtype=bfloat16).
Reported (seed README, fine-tune top-1 with pe_type 0): 84.1.
"""

from adpe_jax.config import pretrain


def get_config(arg=None):
  return pretrain.seed_config("ape", "embedding", arg, variant="base", patch_size=16)
