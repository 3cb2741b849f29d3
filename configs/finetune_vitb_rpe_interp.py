"""Fine-tune ViT-B/16, pe_type 2 (learnable APE + interpolated iRPE-K, spec 5.5), after an
RPE coordinate-adversary pretraining.

Command:
  python -m adpe_jax.main --config=configs/finetune_vitb_rpe_interp.py \
      --workdir=runs/ft_vitb_rpe_coord --config.init=runs/vitb_rpe_coord
Arguments (comma-separated): smoke, corrected, blr<x>.
Recipe (seed README / spec 1.2): as finetune_vitb_ape.py but batch 4096 (accum 4).
Reported (seed README, ViT-B top-1): AdPE RPE coordinate 84.4.
"""

from adpe_jax.config import finetune


def get_config(arg=None):
  return finetune.recipe("base", "rpe", arg, rpe_lookup="continuous")
