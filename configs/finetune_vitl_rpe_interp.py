"""Fine-tune ViT-L/16, pe_type 2 (interpolated iRPE-K), after configs/vitl_rpe_coord.py.

Command:
  python -m adpe_jax.main --config=configs/finetune_vitl_rpe_interp.py \
      --workdir=runs/ft_vitl --config.init=runs/vitl_rpe_coord
Arguments (comma-separated): smoke, corrected, blr<x>.
Recipe: the seed README says to follow MAE's ViT-L changes: layer decay 0.75, drop path
0.2, 50 epochs; otherwise as the ViT-B RPE recipe (batch 4096 via accum 4).
Reported (seed README, final ViT-L top-1): 86.3.
"""

from adpe_jax.config import finetune


def get_config(arg=None):
  return finetune.recipe("large", "rpe", arg, rpe_lookup="continuous")
