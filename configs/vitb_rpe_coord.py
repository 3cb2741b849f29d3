"""AdPE, RPE + adversarial coordinate, ViT-B/16 (--pe_type 1 --adv_type 2): the headline.

A per-layer 2-D shift of the relative offsets of masked query rows through the continuous
bilinear iRPE lookup (spec 4.5); fine-tune it with pe_type 2. The adversary's gradient is 0
until the zero-initialised RPE tables move (spec 9.4). Projection: adversary.norm/eps
(original default none; with 'l2' ours never divides 0 by 0).

Command:
  python -m adpe_jax.main --config=configs/vitb_rpe_coord.py --workdir=runs/vitb_rpe_coord
  1600 epochs: --config=configs/vitb_rpe_coord.py:1600ep
  seconds on a CPU: --config=configs/vitb_rpe_coord.py:smoke
Hardware: the original ran 8 x V100 32GB (128 images x 4 accumulation per GPU = 4096 images per
step); here batch_size=4096 is global and accum_steps=4 splits it inside the compiled step.
One 8-GPU A100/H100 node or a TPU v4-32 slice fits it in bf16 (--config.model.dtype=bfloat16).
Reported (seed README, fine-tune top-1 with pe_type 2): 84.4 (86.3 for ViT-L).
"""

from adpe_jax.config import pretrain


def get_config(arg=None):
  return pretrain.seed_config("rpe", "coordinate", arg, variant="base", patch_size=16)
