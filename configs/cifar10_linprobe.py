"""The small-scale AdPE protocol, linear probe: a CIFAR-10 pretraining's frozen encoder.

Command (after configs/cifar10_pretrain.py; `benchmarks/adpe_vs_maeplus.py --protocol
cifar10` runs every arm and seed):
  python -m adpe_jax.main --config=configs/cifar10_linprobe.py --config.data.dir=DIR \\
      --config.init=runs/cifar10_pretrain --workdir=runs/cifar10_linprobe
Arguments (comma-separated): cls (the cls token, MAE's readout, instead of the patch-token
  mean the demo study uses); random (the same probe on a random-init ViT-S, the baseline);
  smoke (seconds on a CPU: 10 steps; with random, the test model).
Recipe: MAE's (frozen encoder -> BatchNorm without affine -> Linear; LARS momentum 0.9, no
  weight decay, blr 0.1, warmup 10 + cosine, 90 epochs; RandomResizedCrop + flip) at batch
  1024 (48 steps an epoch, 4,320 steps); eval Resize(32) -> CenterCrop(28) on the whole
  test split every epoch.  The encoder's fields (size, patch, pe, lookup, image size) are
  read from the pretraining's workdir.
Hardware: one GPU.  Cost: adpe_jax/flops.py through `python benchmarks/adpe_vs_maeplus.py
  --protocol cifar10 --cost` (docs/results.md): forward passes only, 10 PFLOP, under a
  minute of an H100 at 30 % of its bf16 peak -- the input pipeline sets the wall time.
  Smoke: about 5-10 s on a 2-core CPU (measured 5-8 s).
Expected: not yet measured.
"""

from adpe_jax.config import probe
from adpe_jax.config.common import parse_arg
from adpe_jax.errors import ConfigError


def get_config(arg=None):
  args = parse_arg(arg)
  unknown = args - {"cls", "random", "smoke"}
  if unknown:
    raise ConfigError(f"config argument(s) {sorted(unknown)} unknown; allowed: "
                      f"cls, random, smoke (comma-separated).")
  c = probe.linprobe_config()
  c.init = "runs/cifar10_pretrain"
  c.image_size = 0                         # the checkpoint's (28 px)
  c.model.pool = "cls" if "cls" in args else "avg"
  if "random" in args:                     # the protocol's encoder, random weights
    c.init = ""
    c.model.variant, c.model.patch_size, c.image_size = "small", 4, 28
    c.model.pe, c.model.rpe_lookup = "rpe", "continuous"
  c.batch_size = 1024
  c.total_epochs = 90
  c.warmup_epochs = 10.0
  c.blr = 0.1
  c.log_every_steps = 48
  c.checkpoint_every_steps = 480
  c.data.source = "folder"
  c.data.dir = "data/cifar10"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.num_classes = 10
  c.eval.every_steps = 0                   # every epoch
  c.eval.batch_size = 1000
  c.eval.crop_fraction = 0.875
  if "smoke" in args:   # its top-1 means nothing: 10 steps; 200 test images, 20 a class
    if "random" in args:
      c.model.variant = "test"
    c.total_steps, c.batch_size, c.warmup_epochs = 10, 32, 0.0
    c.log_every_steps, c.checkpoint_every_steps, c.eval.every_steps = 5, 10, 10
    c.eval.max_examples, c.eval.batch_size = 200, 100
    c.data.num_threads = 2
  return c
