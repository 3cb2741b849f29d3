"""Fine-tune the `make demo` encoder (runs/demo) on Fashion-MNIST, on a laptop CPU.

Command (after `make demo`):
  python -m adpe_jax.main --config=configs/demo_finetune.py --workdir=runs/demo_finetune
Variants: --config=configs/demo_finetune.py:random (the same fine-tune from a random
          initialisation, the baseline), :smoke (seconds).
Model: the demo's tiny ViT (patch 4, 28 px, a 7x7 grid) pretrained with RPE + the
coordinate adversary, so pe_type 2 (interpolated iRPE) as the original pairs them; the
original's recipe (layer decay 0.65, drop path 0.1, Mixup 0.8 / CutMix 1.0, label
smoothing 0.1, RandAugment, RandomErasing 0.25, AdamW 0.9/0.999, warmup + cosine) on the
full train split, evaluated on the whole test split (eval Resize(32) -> CenterCrop(28),
the 256 -> 224 ratio scaled to 28 px).
Hardware: a 2-core CPU, about 5 minutes.
Expected: the pretrained encoder beats the random-init fine-tune in test top-1
(summary.json: best_top1 / last_top1; README gives the measured numbers).
"""

from adpe_jax.config import finetune
from adpe_jax.config.common import parse_arg
from adpe_jax.errors import ConfigError


def get_config(arg=None):
  args = parse_arg(arg)
  unknown = args - {"random", "smoke"}
  if unknown:
    raise ConfigError(f"config argument(s) {sorted(unknown)} unknown; allowed: "
                      f"random, smoke.")
  c = finetune.finetune_config()
  c.init = "" if "random" in args else "runs/demo"
  c.model.variant = "tiny"
  c.model.patch_size = 4
  c.model.pe, c.model.rpe_lookup = "rpe", "continuous"   # pe_type 2
  c.image_size = 28
  c.batch_size = 64
  c.accum_steps = 1
  c.total_steps = 600                      # 0.64 epoch of the 60000 images
  c.warmup_epochs = 60 / (60000 // 64)     # 60 warmup steps
  c.blr = 2e-3                             # lr 5e-4
  c.log_every_steps = 50
  c.checkpoint_every_steps = 300
  c.data.source = "fashion_mnist"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.num_classes = 10
  c.eval.every_steps = 300
  c.eval.batch_size = 512
  c.eval.crop_fraction = 0.875
  if "smoke" in args:
    c.model.variant = "test"
    c.init = ""
    c.total_steps, c.batch_size = 10, 16
    c.log_every_steps, c.checkpoint_every_steps, c.eval.every_steps = 5, 10, 10
    c.eval.max_examples, c.eval.batch_size = 200, 128
  return c
