"""AdPE, RPE + adversarial coordinate, ViT-H/14 (--model adpe_vit_huge_patch14; 112 px
crops give an 8x8 grid at patch 14).

Command:
  python -m adpe_jax.main --config=configs/vith_rpe_coord.py --workdir=runs/vith_rpe_coord
  1600 epochs: --config=configs/vith_rpe_coord.py:1600ep
  seconds on a CPU: --config=configs/vith_rpe_coord.py:smoke
Hardware: about 2x ViT-L per image: several 8-GPU nodes or a TPU v4-128 slice; bf16 advised.
Reported: none (the seed README says 'waiting').
"""

from adpe_jax.config import pretrain


def get_config(arg=None):
  return pretrain.seed_config("rpe", "coordinate", arg, variant="huge", patch_size=14)
