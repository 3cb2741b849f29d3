"""Linear probe of the `make demo` encoder (runs/demo) on Fashion-MNIST, on a laptop CPU.

Command (after `make demo`):
  python -m adpe_jax.main --config=configs/linprobe_demo.py --workdir=runs/linprobe_demo
Arguments (comma-separated): random (the same probe on a random-init encoder, the
  baseline), avg (patch-token mean instead of the cls token), sgd, smoke.
Recipe: MAE's protocol scaled to 28 px (frozen encoder -> BatchNorm without affine ->
  Linear; LARS momentum 0.9, no weight decay, warmup + cosine; RandomResizedCrop + flip,
  eval Resize(32) -> CenterCrop(28)) on the full train split, evaluated on the whole test
  split.  2 epochs instead of 90, so the LARS blr is raised (5: lr 5 at batch 256).
"""

from adpe_jax.config import probe
from adpe_jax.config.common import parse_arg
from adpe_jax.errors import ConfigError


def get_config(arg=None):
  args = parse_arg(arg)
  unknown = args - {"random", "avg", "sgd", "smoke"}
  if unknown:
    raise ConfigError(f"config argument(s) {sorted(unknown)} unknown; allowed: "
                      f"random, avg, sgd, smoke.")
  c = probe.linprobe_config()
  c.init = "runs/demo"
  c.image_size = 0      # the checkpoint's (28 px)
  if "random" in args:  # the demo encoder's architecture, random weights
    c.init = ""
    c.model.variant, c.model.patch_size, c.image_size = "tiny", 4, 28
    c.model.pe, c.model.rpe_lookup = "rpe", "continuous"
  c.batch_size = 256
  c.total_epochs = 2
  c.warmup_epochs = 0.2
  c.blr = 5.0
  c.log_every_steps = 50
  c.checkpoint_every_steps = 234
  c.data.source = "fashion_mnist"
  c.data.eval_split = "test"
  c.data.num_classes = 10
  c.eval.batch_size = 512
  c.eval.crop_fraction = 0.875
  if "avg" in args:
    c.model.pool = "avg"
  if "sgd" in args:
    c.optimizer, c.blr = "sgd", 0.1
  if "smoke" in args:
    probe.apply_smoke(c)
    c.init, c.model.pe, c.model.rpe_lookup = "", "", ""
  return c
