"""The base experiment config, the `smoke` shrink, and start-of-run validation.

Every file in configs/ builds on `base_config()` and changes a few fields.  Field names
follow the original's flags (spec 1.1) where one exists.
"""

from __future__ import annotations

import ml_collections

from adpe_jax.errors import ConfigError
from adpe_jax.models.variants import VARIANTS

PE_TYPES = ("ape", "rpe")
ADVERSARY_KINDS = ("none", "embedding", "coordinate")
ADVERSARY_NORMS = ("none", "l2", "linf")
RPE_EMBEDDING = ("faithful", "per_bucket")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "block")
ATTENTION_IMPLS = ("auto", "xla", "pallas")


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
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.max_steps_per_run = 0     # > 0: stop (with a checkpoint) after this many steps; re-run resumes
  c.compilation_cache = "auto"  # XLA's persistent cache: auto = $JAX_COMPILATION_CACHE_DIR
                                # or <workdir>/jax_cache; none = off; else a directory

  c.model = ml_collections.ConfigDict()
  c.model.variant = "base"
  c.model.patch_size = 16
  c.model.pe = "ape"
  c.model.encoder_sees_mask_tokens = True   # MAE+; False = plain MAE, for comparison
  c.model.dtype = "float32"                 # compute dtype; params stay float32
  c.model.remat = "none"                    # none | block: jax.checkpoint per transformer block
  c.model.attention_impl = "auto"           # auto | xla | pallas (auto: pallas on one CUDA GPU)
  # True: encoder and decoder blocks as one nn.scan each -- params blocks/... with a leading
  # depth axis, compile time flat in depth (adpe_jax.models.layout converts checkpoints).
  c.model.scan_blocks = False

  # Devices: a (data, fsdp) mesh; -1 = the rest of the devices.  fsdp > 1 shards the big
  # kernels (and their optimizer state) over the fsdp axis; the batch is split over both.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.fsdp_min_size = 2 ** 14   # tensors with fewer elements stay replicated

  # Multi-process runs.  Empty / 0 / -1: auto-detected (SLURM, TPU pod slices, GKE) or
  # taken from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""     # host:port of process 0
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  c.distributed.heartbeat_timeout_seconds = 100   # a dead peer stops the others after this
  c.distributed.initialization_timeout_seconds = 300

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

  c.eval = ml_collections.ConfigDict()
  c.eval.knn_k = 20
  c.eval.knn_every_steps = 0          # > 0: also k-NN top-1 during training (logged)
  c.eval.knn_source = ""              # e.g. fashion_mnist; "" = no k-NN at the end
  c.eval.recon_every_steps = 0        # reconstruction grid every N steps (always at the end)
  c.eval.knn_train_examples = 10000
  c.eval.knn_test_examples = 2000
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


def parse_arg(arg: str | None) -> set[str]:
  return set(a for a in (arg or "").split(",") if a)


def _choice(c, field: str, allowed) -> None:
  value = c
  for part in field.split("."):
    value = value[part]
  if value not in allowed:
    raise ConfigError(f"config field {field}={value!r} is not allowed; allowed values: "
                      f"{', '.join(map(repr, allowed))}.")


def validate(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Stop at start with one sentence naming the field, the value and what is allowed."""
  _choice(c, "model.variant", tuple(VARIANTS))
  _choice(c, "model.pe", PE_TYPES)
  _choice(c, "model.dtype", DTYPES)
  _choice(c, "model.remat", REMAT)
  _choice(c, "model.attention_impl", ATTENTION_IMPLS)
  _choice(c, "model.scan_blocks", (False, True))
  _choice(c, "adversary.kind", ADVERSARY_KINDS)
  _choice(c, "adversary.norm", ADVERSARY_NORMS)
  _choice(c, "adversary.rpe_embedding", RPE_EMBEDDING)
  if not 0.0 < c.mask_ratio < 1.0:
    raise ConfigError(f"config field mask_ratio={c.mask_ratio} must lie strictly between 0 and 1.")
  if c.model.patch_size <= 0 or c.image_size % c.model.patch_size:
    raise ConfigError(
        f"config field image_size={c.image_size} is not divisible by model.patch_size="
        f"{c.model.patch_size}; choose an image size that is a multiple of the patch size.")
  grid = c.image_size // c.model.patch_size
  if int(grid * grid * (1 - c.mask_ratio)) < 1:
    raise ConfigError(f"config field mask_ratio={c.mask_ratio} keeps no patch of the "
                      f"{grid}x{grid} grid; lower it.")
  for field in ("batch_size", "accum_steps", "num_crops", "log_every_steps"):
    if c[field] < 1:
      raise ConfigError(f"config field {field}={c[field]} must be a positive integer.")
  if c.batch_size % c.accum_steps:
    raise ConfigError(f"config field batch_size={c.batch_size} is not divisible by "
                      f"accum_steps={c.accum_steps}.")
  micro = c.batch_size // c.accum_steps
  if micro % num_devices:
    raise ConfigError(
        f"config field batch_size={c.batch_size} gives {micro} images per micro-step "
        f"(accum_steps={c.accum_steps}), which is not divisible by the {num_devices} devices; "
        f"use a multiple of {num_devices * c.accum_steps}.")
  if c.total_steps <= 0 and c.total_epochs <= 0:
    raise ConfigError("config fields total_steps and total_epochs are both <= 0; set one.")
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
