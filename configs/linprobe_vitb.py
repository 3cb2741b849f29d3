"""MAE's linear probe of a ViT-B/16 encoder on ImageNet-1k (MAE main_linprobe.py).

Command:
  python -m adpe_jax.main --config=configs/linprobe_vitb.py --workdir=runs/lp_vitb \
      --config.init=runs/vitb_rpe_coord
Arguments (comma-separated): smoke (seconds: test-size encoder, synthetic data), avg (the
  patch-token mean through a LayerNorm without affine, MAE's --global_pool, instead of the
  cls token), sgd (SGD with momentum instead of LARS).
Recipe: frozen encoder -> BatchNorm(affine=False, eps 1e-6) -> Linear (trunc-normal 0.01);
  LARS (momentum 0.9, weight decay 0), blr 0.1 (lr = blr * 16384 / 256 = 6.4), warmup 10
  epochs + cosine, 90 epochs, batch 16384; RandomResizedCrop + flip train, Resize(256) ->
  CenterCrop(224) eval; top-1 / top-5 every epoch.  Encoder fields come from the checkpoint.
Reported (MAE paper, ViT-B): 68.0 top-1 linear probe.
"""

from adpe_jax.config import probe
from adpe_jax.config.common import parse_arg
from adpe_jax.errors import ConfigError


def get_config(arg=None):
  args = parse_arg(arg)
  unknown = args - {"smoke", "avg", "sgd"}
  if unknown:
    raise ConfigError(f"config argument(s) {sorted(unknown)} unknown; allowed: "
                      f"smoke, avg, sgd.")
  c = probe.linprobe_config()
  if "smoke" in args:
    probe.apply_smoke(c)
  if "avg" in args:
    c.model.pool = "avg"
  if "sgd" in args:
    c.optimizer = "sgd"
  return c
