"""MAE+ APE baseline, ViT-B/16 (seed README 1.1: --pe_type 0 --adv_type 0).

Command:
  python -m adpe_jax.main --config=configs/vitb_ape.py --workdir=runs/vitb_ape
  1600 epochs: --config=configs/vitb_ape.py:1600ep
  seconds on a CPU: --config=configs/vitb_ape.py:smoke
Hardware: the original ran 8 x V100 32GB (128 images x 4 accumulation per GPU = 4096 images per
step); here batch_size=4096 is global and accum_steps=4 splits it inside the compiled step.
One 8-GPU A100/H100 node or a TPU v4-32 slice fits it in bf16 (--config.model.dtype=bfloat16).
Reported (seed README, ImageNet-1k fine-tune top-1, fine-tune with pe_type 0): 83.9.
"""

from adpe_jax.config import pretrain


def get_config(arg=None):
  return pretrain.seed_config("ape", "none", arg, variant="base", patch_size=16)
