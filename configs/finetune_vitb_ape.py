"""Fine-tune ViT-B/16, pe_type 0 (learnable APE), after an APE pretraining (any adversary).

Command:
  python -m adpe_jax.main --config=configs/finetune_vitb_ape.py --workdir=runs/ft_vitb_ape \
      --config.init=runs/vitb_ape_coord
Arguments (comma-separated): smoke (seconds on a CPU), corrected (unused for APE),
  blr<x> (the README sweeps blr 1e-4 ... 1e-3; default 1e-3).
Recipe (seed README / spec 1.2): 100 epochs, 5 warmup, batch 1024 (accum 1), layer decay
0.65, drop path 0.1, AdamW (0.9, 0.999) wd 0.05, Mixup 0.8 / CutMix 1.0, label smoothing
0.1, RandAugment rand-m9-mstd0.5-inc1, RandomErasing 0.25; 224 px ImageNet-1k.
Hardware: the original ran 8 x V100 (128 per GPU); one 8-GPU A100/H100 node.
Reported (seed README, ViT-B top-1): MAE+ APE 83.9, AdPE APE embedding 84.1, coordinate 84.2.
"""

from adpe_jax.config import finetune


def get_config(arg=None):
  return finetune.recipe("base", "ape", arg)
