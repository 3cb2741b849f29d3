"""The pretraining config (the default task), its `smoke` shrink and validation.

Every pretraining file in configs/ builds on `base_config()` (or `seed_config`) and changes
a few fields.  Field names follow the original's flags (spec 1.1) where one exists.
"""

from __future__ import annotations

import ml_collections

from adpe_jax.config import common
from adpe_jax.config import validate as check
from adpe_jax.config.common import ATTENTION_IMPLS, DTYPES, PE_TYPES, parse_arg
from adpe_jax.errors import ConfigError
from adpe_jax.models.variants import VARIANTS

ADVERSARY_KINDS = ("none", "embedding", "coordinate")
ADVERSARY_NORMS = ("none", "l2", "linf")
RPE_EMBEDDING = ("faithful", "per_bucket")
REMAT = ("none", "block")


def base_config() -> ml_collections.ConfigDict:
  """MAE+ ViT-B/16 APE baseline, the seed README's recipe (spec 1.1)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = 112          # --input_size
  c.num_crops = 4             # --num_crop
  c.mask_ratio = 0.75
  c.batch_size = 4096         # images (not crops) per optimizer step, global
  c.accum_steps = 4           # micro-steps inside one compiled step
  c.total_epochs = 400
  c.total_steps = 0           # > 0 overrides total_epochs
  c.warmup_epochs = 20.0
  c.blr = 1.5e-4              # lr = blr * batch_size / 256
  c.min_lr = 0.0
  c.weight_decay = 0.05
  c.b1 = 0.9
  c.b2 = 0.95
  common.add_run_fields(c, keep_checkpoints=3)

  c.model = ml_collections.ConfigDict()
  c.model.variant = "base"
  c.model.patch_size = 16
  c.model.pe = "ape"
  c.model.encoder_sees_mask_tokens = True   # MAE+; False = plain MAE, for comparison
  # True (the original's): the loss target is each patch normalised by its own mean / std;
  # False: the pixel values (other domains: MAE issues #95, #164, #190), and the
  # reconstructions show them as predicted.
  c.model.norm_pix_loss = True
  c.model.dtype = "float32"                 # compute dtype; params stay float32
  c.model.remat = "none"                    # none | block: jax.checkpoint per transformer block
  c.model.attention_impl = "auto"           # auto | xla | pallas (auto: pallas on CUDA, cc >= 8.0)
  # True: encoder and decoder blocks as one nn.scan each -- params blocks/... with a leading
  # depth axis, compile time flat in depth (adpe_jax.layout converts checkpoints).
  c.model.scan_blocks = False

  c.mesh = common.mesh()
  c.distributed = common.distributed()

  c.adversary = ml_collections.ConfigDict()
  c.adversary.kind = "none"        # none | embedding | coordinate  (--adv_type 0/1/2)
  c.adversary.norm = "none"        # none | l2 | linf               (--norm 0/1/2)
  c.adversary.eps = 1.0
  c.adversary.lr = 1.5e-4          # base adversary lr, scaled like blr (--adv_lr)
  c.adversary.weight_decay = 0.0   # --adv_wd
  c.adversary.rpe_embedding = "per_bucket"  # faithful (the original's no-op) | per_bucket
  c.adversary.inner_steps = 0      # > 0: PGD-style inner ascent before the model update
  c.adversary.inner_step_size = 0.0  # PGD step; 0 = 2.5 * eps / inner_steps

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds:imagenet2012"   # fashion_mnist | folder:<dir> | tfds:<name> | synthetic
  c.data.dir = ""                      # tfds data dir; root for "folder" (or base of folder:<rel>)
  c.data.split = "train"
  c.data.num_examples = 0              # 0 = size of the source (synthetic: required)
  c.data.num_threads = 0               # 0 = os.cpu_count()
  # Input throughput (benchmarks/README.md, "Input pipeline"): worker processes past the GIL
  # (-1 = one per usable CPU when the step runs on an accelerator, 0 on CPU; 0 = threads only),
  # the JPEG decoder (simplejpeg: the same pixels as Pillow, faster), reduced-DCT decode where
  # every crop allows it (draft: changes pixels), and uint8 crops to the device normalised
  # inside the compiled step (the same float32 values, 4x fewer bytes host to device).
  c.data.num_workers = -1
  c.data.decoder = "pil"               # pil | simplejpeg
  c.data.draft = False
  c.data.normalize_on_device = False
  common.add_bad_image_fields(c.data)
  # A resume on other data than the checkpoint's (count, classes, file list: the run's
  # preflight compares them) is refused unless this is True (then a warning).
  c.data.allow_changed = False

  c.eval = ml_collections.ConfigDict()
  # by name (train/evaluate.py EVALUATORS); "knn" runs only with eval.knn_source set
  c.eval.evaluators = ("knn", "reconstructions", "heldout", "adversary_plot")
  c.eval.knn_k = 20
  c.eval.knn_every_steps = 0          # > 0: also k-NN top-1 during training (logged)
  c.eval.knn_source = ""              # e.g. fashion_mnist; "" = no k-NN at the end
  c.eval.recon_every_steps = 0        # reconstruction grid every N steps (always at the end)
  c.eval.knn_train_examples = 10000
  c.eval.knn_test_examples = 2000
  # The loss on heldout_examples images spread over data.source's heldout_split ("" = off),
  # fixed masks, adversary at zero and as trained: heldout_loss / heldout_loss_adv.
  c.eval.heldout_split = ""
  c.eval.heldout_examples = 256
  c.eval.heldout_every_steps = 0      # 0 = only at the end
  return c


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrink any config so it trains in well under a minute on a 2-core CPU."""
  c.model.variant = "test"
  c.model.patch_size = 4
  c.model.dtype = "float32"
  c.image_size = 28
  c.num_crops = 2
  c.batch_size = 8
  c.accum_steps = 2
  c.total_steps = 30
  c.warmup_epochs = 0.0
  c.blr = 1.5e-3
  c.adversary.lr = 1.5e-3
  c.log_every_steps = 5
  c.checkpoint_every_steps = 15
  c.data.source = "synthetic"
  c.data.num_examples = 256
  return c


def validate(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Stop at start with one sentence naming the field, the value and what is allowed."""
  check.choice(c, "model.variant", tuple(VARIANTS))
  check.choice(c, "model.pe", PE_TYPES)
  check.choice(c, "model.dtype", DTYPES)
  check.choice(c, "model.remat", REMAT)
  check.choice(c, "model.attention_impl", ATTENTION_IMPLS)
  check.choice(c, "model.scan_blocks", (False, True))
  check.choice(c, "adversary.kind", ADVERSARY_KINDS)
  check.choice(c, "adversary.norm", ADVERSARY_NORMS)
  check.choice(c, "adversary.rpe_embedding", RPE_EMBEDDING)
  check.choice(c, "data.decoder", ("pil", "simplejpeg"))
  check.choice(c, "data.draft", (False, True))
  check.choice(c, "data.normalize_on_device", (False, True))
  check.bad_images(c)
  if c.data.num_workers < -1:
    raise ConfigError(f"config field data.num_workers={c.data.num_workers} must be -1 (auto), "
                      f"0 (threads in this process) or a number of worker processes.")
  if not 0.0 < c.mask_ratio < 1.0:
    raise ConfigError(f"config field mask_ratio={c.mask_ratio} must lie strictly between 0 and 1.")
  check.patch_grid(c)
  grid = c.image_size // c.model.patch_size
  if int(grid * grid * (1 - c.mask_ratio)) < 1:
    raise ConfigError(f"config field mask_ratio={c.mask_ratio} keeps no patch of the "
                      f"{grid}x{grid} grid; lower it.")
  check.positive(c, "batch_size", "accum_steps", "num_crops", "log_every_steps")
  if c.batch_size % c.accum_steps:
    raise ConfigError(f"config field batch_size={c.batch_size} is not divisible by "
                      f"accum_steps={c.accum_steps}.")
  micro = c.batch_size // c.accum_steps
  if micro % num_devices:
    raise ConfigError(
        f"config field batch_size={c.batch_size} gives {micro} images per micro-step "
        f"(accum_steps={c.accum_steps}), which is not divisible by the {num_devices} devices; "
        f"use a multiple of {num_devices * c.accum_steps}.")
  check.steps_or_epochs(c)
  if c.adversary.eps <= 0:
    raise ConfigError(f"config field adversary.eps={c.adversary.eps} must be > 0.")
  if c.adversary.inner_steps < 0:
    raise ConfigError(f"config field adversary.inner_steps={c.adversary.inner_steps} must be >= 0.")
  if not c.model.encoder_sees_mask_tokens and (c.model.pe != "ape" or c.adversary.kind != "none"):
    raise ConfigError(
        "config field model.encoder_sees_mask_tokens=False (plain MAE) is only available with "
        "model.pe='ape' and adversary.kind='none'.")


def seed_config(pe: str, adversary: str, arg: str | None, variant: str = "base",
                patch_size: int = 16) -> ml_collections.ConfigDict:
  """One of the seed README's pretraining commands as a config.

  Arguments (comma-separated): `1600ep` (1600 epochs, warmup 40), `faithful` (RPE
  embedding adversary as the original's no-op), `smoke` (seconds on a CPU).
  The blocks are scanned (model.scan_blocks; `smoke` keeps that layout), so the train
  step's compile time does not grow with the depth of ViT-B/L/H.
  """
  c = base_config()
  c.model.variant = variant
  c.model.patch_size = patch_size
  c.model.scan_blocks = True
  c.model.pe = pe
  c.adversary.kind = adversary
  args = parse_arg(arg)
  unknown = args - {"1600ep", "faithful", "smoke"}
  if unknown:
    raise ConfigError(f"config argument(s) {sorted(unknown)} unknown; allowed: 1600ep, "
                      f"faithful, smoke (comma-separated).")
  if "1600ep" in args:
    c.total_epochs, c.warmup_epochs = 1600, 40.0
  if "faithful" in args:
    c.adversary.rpe_embedding = "faithful"
  if "smoke" in args:
    apply_smoke(c)
  return c
