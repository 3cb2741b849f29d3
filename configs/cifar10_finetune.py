"""The small-scale AdPE protocol, fine-tune: a CIFAR-10 pretraining's ViT-S on CIFAR-10.

Command (after configs/cifar10_pretrain.py; `benchmarks/adpe_vs_maeplus.py --protocol
cifar10` runs every arm and seed):
  python -m adpe_jax.main --config=configs/cifar10_finetune.py --config.data.dir=DIR \\
      --config.init=runs/cifar10_pretrain --workdir=runs/cifar10_finetune
Arguments (comma-separated), the pe_type that follows each pretraining as the original
  pairs them: (none) after RPE-coordinate, pe_type 2 (interpolated iRPE); mae_plus after
  MAE+ RPE, pe_type 1; ape after APE-coordinate, pe_type 0; random (no init: the baseline);
  smoke (seconds on a CPU: the test model, 10 steps).
Recipe: the original's (layer decay 0.65, drop path 0.1, Mixup 0.8 / CutMix 1.0, label
  smoothing 0.1, RandAugment m9, RandomErasing 0.25, AdamW 0.9/0.999, blr 1e-3, warmup 5 +
  cosine, 100 epochs) at batch 512 (97 steps an epoch, 9,700 steps); eval Resize(32) ->
  CenterCrop(28) on the whole test split every epoch.
Hardware: one GPU.  Cost: adpe_jax/flops.py through `python benchmarks/adpe_vs_maeplus.py
  --protocol cifar10 --cost` (docs/results.md): 35 PFLOP, about 2 min of an H100 at 30 % of
  its bf16 peak -- the input pipeline (97 x 512 augmented images an epoch) sets the wall time.
  Smoke: about 10 s on a 2-core CPU (measured 6-11 s).
Expected: not yet measured (paper, ViT-B on ImageNet: AdPE RPE-coordinate 84.4 against
  MAE+'s lower number; here the question is whether the paired difference shows).
"""

from adpe_jax.config import finetune
from adpe_jax.config.common import parse_arg
from adpe_jax.errors import ConfigError


def get_config(arg=None):
  args = parse_arg(arg)
  unknown = args - {"mae_plus", "ape", "random", "smoke"}
  if unknown:
    raise ConfigError(f"config argument(s) {sorted(unknown)} unknown; allowed: "
                      f"mae_plus, ape, random, smoke (comma-separated).")
  c = finetune.finetune_config()
  c.init = "" if "random" in args else "runs/cifar10_pretrain"
  c.model.variant = "small"
  c.model.patch_size = 4
  c.model.pe, c.model.rpe_lookup = "rpe", "continuous"      # pe_type 2
  if "mae_plus" in args:
    c.model.rpe_lookup = "integer"                         # pe_type 1
  if "ape" in args:
    c.model.pe, c.model.rpe_lookup = "ape", "integer"      # pe_type 0
  c.image_size = 28
  c.batch_size = 512
  c.accum_steps = 1
  c.total_epochs = 100
  c.warmup_epochs = 5.0
  c.blr = 1e-3
  c.log_every_steps = 100
  c.checkpoint_every_steps = 970
  c.data.source = "folder"
  c.data.dir = "data/cifar10"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.num_classes = 10
  c.eval.every_steps = 0                   # every epoch
  c.eval.batch_size = 1000
  c.eval.crop_fraction = 0.875
  if "smoke" in args:   # its top-1 means nothing: 10 steps; 200 test images, 20 a class
    c.model.variant = "test"
    c.total_steps, c.batch_size, c.warmup_epochs = 10, 16, 0.0
    c.log_every_steps, c.checkpoint_every_steps, c.eval.every_steps = 5, 10, 10
    c.eval.max_examples, c.eval.batch_size = 200, 100
    c.data.num_threads = 2
  return c
