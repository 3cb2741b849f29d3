"""MAE+ APE baseline, ViT-B/16 (seed README 1.1; `--pe_type 0 --adv_type 0`).

Command:
  python -m adpe_jax.main --config=configs/vitb_ape.py --workdir=runs/vitb_ape
  (1600 epochs: --config=configs/vitb_ape.py:1600ep ; seconds on CPU: ...:smoke)
Hardware: the original used 8 x V100 32GB (128 images x 4 accumulation per GPU, 4096 per
step); here batch_size=4096 is global and accum_steps=4 splits it inside the step.
Reported (seed README, ImageNet-1k fine-tune top-1 with pe_type 0): 83.9.
"""

from adpe_jax import defaults


def get_config(arg=None):
  c = defaults.base_config()
  c.model.pe = "ape"
  c.adversary.kind = "none"
  args = defaults.parse_arg(arg)
  if "1600ep" in args:
    c.total_epochs, c.warmup_epochs = 1600, 40.0
  if "smoke" in args:
    defaults.apply_smoke(c)
  return c
