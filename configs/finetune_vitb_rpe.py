"""Fine-tune ViT-B/16, pe_type 1 (learnable APE + integer-bucket iRPE-K), after an RPE
pretraining without adversary or with the embedding adversary.

Command:
  python -m adpe_jax.main --config=configs/finetune_vitb_rpe.py --workdir=runs/ft_vitb_rpe \
      --config.init=runs/vitb_rpe
Arguments (comma-separated): smoke, corrected (scaled RPE query instead of the original's
  unscaled one, spec 9.2), blr<x>.
Recipe (seed README / spec 1.2): as finetune_vitb_ape.py but batch 4096 (accum 4).
Reported (seed README, ViT-B top-1): MAE+ RPE 84.2, AdPE RPE embedding 84.3.
"""

from adpe_jax.config import finetune


def get_config(arg=None):
  return finetune.recipe("base", "rpe", arg, rpe_lookup="integer")
