"""The fine-tune config (`config.task = "finetune"`), its `smoke` shrink and validation.

Field names follow the original's `main_finetune.py` flags (spec 1.2) where one exists;
the values are the flag defaults with the README's ViT-B values (layer decay 0.65, mixup
0.8 / cutmix 1.0), see configs/finetune_*.py.
"""

from __future__ import annotations

import ml_collections

from adpe_jax import defaults
from adpe_jax.errors import ConfigError

PE_TYPES = (0, 1, 2)   # 0 APE, 1 + integer iRPE, 2 + interpolated iRPE


def finetune_config() -> ml_collections.ConfigDict:
  """ViT-B/16 fine-tune at 224 px, pe_type 0 (APE), batch 1024 (spec 1.2, 6)."""
  base = defaults.base_config()
  c = ml_collections.ConfigDict()
  c.task = "finetune"
  c.init = ""                 # --finetune: pretraining workdir / checkpoint dir / .pth; "" = random init
  c.seed = 0
  c.compilation_cache = "auto"  # as pretraining (defaults.base_config)
  c.image_size = 224          # --input_size
  c.batch_size = 1024         # images per optimizer step, global (--batch_size x GPUs x accum)
  c.accum_steps = 1           # --accum_iter
  c.total_epochs = 100
  c.total_steps = 0           # > 0 overrides total_epochs
  c.warmup_epochs = 5.0
  c.blr = 1e-3                # lr = blr * batch_size / 256
  c.min_lr = 1e-6
  c.weight_decay = 0.05
  c.layer_decay = 0.65        # README ViT-B (flag default 0.75)
  c.b1 = 0.9                  # torch AdamW defaults
  c.b2 = 0.999
  c.faithful = True           # the original's unscaled-query RPE at fine-tune (spec 9.2)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  c.max_steps_per_run = 0

  c.model = ml_collections.ConfigDict()
  c.model.variant = "base"
  c.model.patch_size = 16
  c.model.pe_type = 0         # 0 APE | 1 RPE integer | 2 RPE interpolated
  c.model.drop_path = 0.1
  c.model.global_pool = True  # False = the cls token (--cls_token)
  c.model.dtype = "float32"
  c.model.attention_impl = "auto"

  c.mesh = base.mesh
  c.distributed = base.distributed

  c.aug = ml_collections.ConfigDict()
  c.aug.randaug = "rand-m9-mstd0.5-inc1"   # --aa; "" = off
  c.aug.reprob = 0.25                      # RandomErasing, pixel mode, one region
  c.aug.mixup = 0.8
  c.aug.cutmix = 1.0
  c.aug.mixup_prob = 1.0
  c.aug.mixup_switch_prob = 0.5
  c.aug.smoothing = 0.1

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds:imagenet2012"
  c.data.dir = ""
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.num_classes = 1000
  c.data.num_examples = 0                  # synthetic sources only
  c.data.num_threads = 0

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0                   # 0 = every epoch (the original)
  c.eval.batch_size = 1024                 # global
  c.eval.max_examples = 0                  # 0 = the whole eval split
  c.eval.crop_fraction = 0.875             # Resize(size / 0.875) -> CenterCrop(size)
  return c


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Seconds on a 2-core CPU: test-size ViT on synthetic 28 px images."""
  c.model.variant = "test"
  c.model.patch_size = 4
  c.image_size = 28
  c.batch_size = 16
  c.accum_steps = 2
  c.total_steps = 24
  c.warmup_epochs = 0.0
  c.blr = 5e-3
  c.log_every_steps = 4
  c.checkpoint_every_steps = 12
  c.data.source = "synthetic"
  c.data.num_examples = 256
  c.data.num_classes = 10
  c.data.eval_split = "test"
  c.eval.every_steps = 12
  c.eval.batch_size = 64
  c.eval.max_examples = 128
  c.eval.crop_fraction = 1.0
  c.data.num_threads = 2
  return c


def recipe(variant: str, pe_type: int, arg: str | None, patch_size: int = 16):
  """A README fine-tune recipe; arguments (comma-separated): `smoke`, `corrected` (scaled
  RPE query instead of the original's unscaled one), `blr1e-4` ... (the README's sweep)."""
  c = finetune_config()
  c.model.variant, c.model.patch_size, c.model.pe_type = variant, patch_size, pe_type
  if pe_type in (1, 2):                     # README: accum_iter 4, effective batch 4096
    c.batch_size, c.accum_steps = 4096, 4
  if variant == "large":                    # MAE's ViT-L recipe
    c.layer_decay, c.model.drop_path, c.total_epochs = 0.75, 0.2, 50
  for a in defaults.parse_arg(arg):
    if a == "smoke":
      apply_smoke(c)
    elif a == "corrected":
      c.faithful = False
    elif a.startswith("blr"):
      try:
        c.blr = float(a[3:])
      except ValueError as e:
        raise ConfigError(f"config argument {a!r} is not blr<number>, e.g. blr5e-4.") from e
    else:
      raise ConfigError(f"config argument {a!r} unknown; allowed: smoke, corrected, "
                        f"blr<number> (comma-separated).")
  return c


def validate(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """One sentence naming the field, the value and what is allowed."""
  defaults._choice(c, "model.variant", tuple(defaults.VARIANTS))  # noqa: SLF001
  defaults._choice(c, "model.pe_type", PE_TYPES)  # noqa: SLF001
  defaults._choice(c, "model.dtype", defaults.DTYPES)  # noqa: SLF001
  defaults._choice(c, "model.attention_impl", defaults.ATTENTION_IMPLS)  # noqa: SLF001
  if c.model.patch_size <= 0 or c.image_size % c.model.patch_size:
    raise ConfigError(f"config field image_size={c.image_size} is not divisible by "
                      f"model.patch_size={c.model.patch_size}.")
  for field in ("batch_size", "accum_steps", "log_every_steps"):
    if c[field] < 1:
      raise ConfigError(f"config field {field}={c[field]} must be a positive integer.")
  if c.batch_size % c.accum_steps:
    raise ConfigError(f"config field batch_size={c.batch_size} is not divisible by "
                      f"accum_steps={c.accum_steps}.")
  micro = c.batch_size // c.accum_steps
  if micro % num_devices or micro % 2:
    raise ConfigError(
        f"config field batch_size={c.batch_size} gives {micro} images per micro-step, which "
        f"must be even (Mixup pairs) and divisible by the {num_devices} devices.")
  if c.eval.batch_size < 1 or c.eval.batch_size % num_devices:
    raise ConfigError(f"config field eval.batch_size={c.eval.batch_size} must be a positive "
                      f"multiple of the {num_devices} devices.")
  if c.total_steps <= 0 and c.total_epochs <= 0:
    raise ConfigError("config fields total_steps and total_epochs are both <= 0; set one.")
  if not 0.0 < c.layer_decay <= 1.0:
    raise ConfigError(f"config field layer_decay={c.layer_decay} must lie in (0, 1].")
  if not 0.0 <= c.model.drop_path < 1.0:
    raise ConfigError(f"config field model.drop_path={c.model.drop_path} must lie in [0, 1).")
  if not 0.0 <= c.aug.smoothing < 1.0:
    raise ConfigError(f"config field aug.smoothing={c.aug.smoothing} must lie in [0, 1).")
  if c.data.num_classes < 2:
    raise ConfigError(f"config field data.num_classes={c.data.num_classes} must be >= 2.")
  if c.aug.randaug:
    from adpe_jax.data.finetune import parse_randaugment  # noqa: PLC0415
    try:
      parse_randaugment(c.aug.randaug)
    except ValueError as e:
      raise ConfigError(f"config field aug.randaug: {e}") from e
