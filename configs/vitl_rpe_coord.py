"""AdPE, RPE + adversarial coordinate, ViT-L/16 (--model adpe_vit_large_patch16).

Command:
  python -m adpe_jax.main --config=configs/vitl_rpe_coord.py --workdir=runs/vitl_rpe_coord
  1600 epochs: --config=configs/vitl_rpe_coord.py:1600ep
  seconds on a CPU: --config=configs/vitl_rpe_coord.py:smoke
Hardware: as ViT-B, about 3x the compute per image: 2 x 8-GPU A100/H100 nodes or a TPU v4-64 slice
(multi-host: launch/ and jax.distributed).
Reported (seed README 'Final performance', 1600 epochs): 86.3 fine-tune top-1.
"""

from adpe_jax.config import pretrain


def get_config(arg=None):
  return pretrain.seed_config("rpe", "coordinate", arg, variant="large", patch_size=16)
