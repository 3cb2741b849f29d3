"""The fine-tune config (`config.task = "finetune"`), its `smoke` shrink and validation.

Field names follow the original's `main_finetune.py` flags (spec 1.2) where one exists;
the values are the flag defaults with the README's ViT-B values (layer decay 0.65, mixup
0.8 / cutmix 1.0), see configs/finetune_*.py.  The original's `--pe_type` is two fields
here: pe_type 0 = model.pe "ape"; 1 = "rpe" with model.rpe_lookup "integer"; 2 = "rpe"
with "continuous" (the bilinear lookup of the coordinate adversary's pretraining).
"""

from __future__ import annotations

import ml_collections

from adpe_jax.config import common
from adpe_jax.config import validate as check
from adpe_jax.config.common import (ATTENTION_IMPLS, DTYPES, PE_TYPES, RPE_LOOKUPS,
                                    RPE_QUERIES, parse_arg)
from adpe_jax.errors import ConfigError
from adpe_jax.models.variants import VARIANTS


def parse_randaugment(spec: str) -> dict:
  """'rand-m9-mstd0.5-inc1' -> dict(magnitude=9, std=0.5, num_layers=2, prob=0.5, increasing)
  (config aug.randaug, timm's RandAugment string; `adpe_jax.data.finetune.RandAugment`
  applies it).  Raises ValueError."""
  parts = spec.split("-")
  if not spec or parts[0] != "rand":
    raise ValueError(f"RandAugment spec {spec!r} must start with 'rand-' (e.g. "
                     f"'rand-m9-mstd0.5-inc1').")
  out = dict(magnitude=10.0, std=0.0, num_layers=2, prob=0.5, increasing=False)
  for p in parts[1:]:
    if p.startswith("mstd"):
      out["std"] = float(p[4:])
    elif p.startswith("m"):
      out["magnitude"] = float(p[1:])
    elif p.startswith("n"):
      out["num_layers"] = int(p[1:])
    elif p.startswith("inc"):
      out["increasing"] = bool(int(p[3:]))
    elif p.startswith("p"):
      out["prob"] = float(p[1:])
    else:
      raise ValueError(f"RandAugment spec {spec!r}: unknown part {p!r}.")
  if not out["increasing"]:
    raise ValueError(f"RandAugment spec {spec!r}: only the 'inc1' op set is implemented.")
  return out


def finetune_config() -> ml_collections.ConfigDict:
  """ViT-B/16 fine-tune at 224 px, APE (pe_type 0), batch 1024 (spec 1.2, 6)."""
  c = ml_collections.ConfigDict()
  c.task = "finetune"
  c.init = ""                 # --finetune: a workdir / checkpoint dir / .pth; "" = random init
  c.seed = 0
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
  common.add_run_fields(c, keep_checkpoints=2)

  c.model = ml_collections.ConfigDict()
  c.model.variant = "base"
  c.model.patch_size = 16
  c.model.pe = "ape"            # ape | rpe  (with the sin-cos table either way)
  c.model.rpe_lookup = "integer"  # integer | continuous (pe_type 1 | 2; unused with ape)
  c.model.rpe_query = "unscaled"  # the original's fine-tune iRPE query (spec 9.2) | scaled
  c.model.drop_path = 0.1
  c.model.global_pool = True  # False = the cls token (--cls_token)
  c.model.dtype = "float32"
  c.model.attention_impl = "auto"

  c.mesh = common.mesh()
  c.distributed = common.distributed()

  c.aug = ml_collections.ConfigDict()
  c.aug.randaug = "rand-m9-mstd0.5-inc1"   # --aa; "" = off
  c.aug.reprob = 0.25                      # RandomErasing, pixel mode, one region
  c.aug.mixup = 0.8
  c.aug.cutmix = 1.0
  c.aug.mixup_prob = 1.0
  c.aug.mixup_switch_prob = 0.5
  c.aug.smoothing = 0.1

  c.data = common.labelled_data()
  c.eval = common.top1_eval()
  c.eval.evaluators = ("classifier",)  # by name (train/evaluate.py EVALUATORS)
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


def recipe(variant: str, pe: str, arg: str | None, rpe_lookup: str = "integer",
           patch_size: int = 16):
  """A README fine-tune recipe; arguments (comma-separated): `smoke`, `corrected`
  (model.rpe_query "scaled" instead of the original's unscaled iRPE query), `blr1e-4` ...
  (the README's sweep)."""
  c = finetune_config()
  c.model.variant, c.model.patch_size = variant, patch_size
  c.model.pe, c.model.rpe_lookup = pe, rpe_lookup
  if pe == "rpe":                           # README: accum_iter 4, effective batch 4096
    c.batch_size, c.accum_steps = 4096, 4
  if variant == "large":                    # MAE's ViT-L recipe
    c.layer_decay, c.model.drop_path, c.total_epochs = 0.75, 0.2, 50
  for a in parse_arg(arg):
    if a == "smoke":
      apply_smoke(c)
    elif a == "corrected":
      c.model.rpe_query = "scaled"
    elif a.startswith("blr"):
      try:
        c.blr = float(a[3:])
      except ValueError as e:
        raise ConfigError(f"config argument {a!r} is not blr<number>, e.g. blr5e-4.") from e
    else:
      raise ConfigError(f"config argument {a!r} unknown; allowed: smoke, corrected, "
                        f"blr<number> (comma-separated).")
  return c


def validate_classifier(c: ml_collections.ConfigDict) -> None:
  """The classifier's model fields (fine-tune, and the probe's resolved encoder)."""
  check.choice(c, "model.variant", tuple(VARIANTS))
  check.choice(c, "model.pe", PE_TYPES)
  check.choice(c, "model.rpe_lookup", RPE_LOOKUPS)
  check.choice(c, "model.rpe_query", RPE_QUERIES)
  check.choice(c, "model.dtype", DTYPES)
  check.choice(c, "model.attention_impl", ATTENTION_IMPLS)
  check.patch_grid(c)


def validate(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """One sentence naming the field, the value and what is allowed."""
  validate_classifier(c)
  check.bad_images(c)
  check.positive(c, "batch_size", "accum_steps", "log_every_steps")
  if c.batch_size % c.accum_steps:
    raise ConfigError(f"config field batch_size={c.batch_size} is not divisible by "
                      f"accum_steps={c.accum_steps}.")
  micro = c.batch_size // c.accum_steps
  if micro % num_devices or micro % 2:
    raise ConfigError(
        f"config field batch_size={c.batch_size} gives {micro} images per micro-step, which "
        f"must be even (Mixup pairs) and divisible by the {num_devices} devices.")
  check.divisible_batch(c, "eval.batch_size", num_devices)
  check.steps_or_epochs(c)
  if not 0.0 < c.layer_decay <= 1.0:
    raise ConfigError(f"config field layer_decay={c.layer_decay} must lie in (0, 1].")
  if not 0.0 <= c.model.drop_path < 1.0:
    raise ConfigError(f"config field model.drop_path={c.model.drop_path} must lie in [0, 1).")
  if not 0.0 <= c.aug.smoothing < 1.0:
    raise ConfigError(f"config field aug.smoothing={c.aug.smoothing} must lie in [0, 1).")
  if c.data.num_classes < 2:
    raise ConfigError(f"config field data.num_classes={c.data.num_classes} must be >= 2.")
  if c.aug.randaug:
    try:
      parse_randaugment(c.aug.randaug)
    except ValueError as e:
      raise ConfigError(f"config field aug.randaug: {e}") from e
