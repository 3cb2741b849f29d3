"""Configs of the frozen-encoder evaluations: task "knn" (`configs/knn.py`) and task
"linprobe" (`configs/linprobe_*.py`), their `smoke` shrink and validation.

Encoder fields left "auto" (model.variant "", model.patch_size 0, model.pe "",
model.rpe_lookup "", image_size 0) are read from the run metadata of `init` (a pretraining
workdir of ours, `config/encoder.resolve_encoder_fields`); a .pth or a random init ("")
needs them set.
"""

from __future__ import annotations

import ml_collections

from adpe_jax.config import common
from adpe_jax.config import validate as check
from adpe_jax.config.finetune import validate_classifier
from adpe_jax.errors import ConfigError

OPTIMIZERS = ("lars", "sgd")
POOLS = ("cls", "avg", "mean")


def _encoder_fields(c: ml_collections.ConfigDict, pool: str) -> None:
  c.init = ""                 # pretraining workdir / checkpoint dir / the original's .pth
  c.seed = 0
  c.image_size = 0            # 0 = the checkpoint's
  c.model = ml_collections.ConfigDict()
  c.model.variant = ""        # "" = the checkpoint's
  c.model.patch_size = 0      # 0 = the checkpoint's
  c.model.pe = ""             # "" = the checkpoint's (ape | rpe)
  c.model.rpe_lookup = ""     # "" = the checkpoint's (continuous after a coordinate adversary)
  c.model.rpe_query = "scaled"  # the encoder as pretrained; "unscaled" = the original's
                                # fine-tune model (spec 9.2)
  c.model.pool = pool         # cls | avg (MAE's --global_pool) | mean (MAEPlus.features)
  c.model.dtype = "float32"
  c.model.attention_impl = "auto"
  c.model.drop_path = 0.0     # fixed: the encoder is frozen
  c.model.global_pool = False  # fixed: the readout is model.pool
  c.mesh = common.mesh()
  c.distributed = common.distributed()


def knn_config() -> ml_collections.ConfigDict:
  """k-NN top-1 (k 20, cosine, plain vote) on Fashion-MNIST, features as the pretraining
  k-NN (mean of the normalised patch tokens)."""
  c = ml_collections.ConfigDict()
  c.task = "knn"
  common.add_cache_field(c)
  _encoder_fields(c, "mean")
  c.k = 20
  c.temperature = 0.0         # > 0: DINO's exp(sim / T) weighted vote (DINO: 0.07)
  c.batch_size = 256          # feature batches (global)
  c.crop_fraction = 1.0       # eval transform Resize(size / f) -> CenterCrop(size)
  c.data = ml_collections.ConfigDict()
  c.data.source = "fashion_mnist"
  c.data.dir = ""
  c.data.train_split = "train"
  c.data.test_split = "test"
  c.data.train_examples = 10000   # 0 = all
  c.data.test_examples = 2000
  common.add_bad_image_fields(c.data)
  return c


def linprobe_config() -> ml_collections.ConfigDict:
  """MAE's linear probe (main_linprobe.py, ViT-B): BatchNorm1d(affine=False, eps 1e-6) +
  Linear (trunc-normal 0.01) on the frozen encoder's cls token, LARS (momentum 0.9, no
  weight decay), blr 0.1, batch 16384, warmup 10 + cosine, 90 epochs, RandomResizedCrop +
  flip train, Resize(256) -> CenterCrop(224) eval."""
  c = ml_collections.ConfigDict()
  c.task = "linprobe"
  common.add_run_fields(c, keep_checkpoints=2)
  _encoder_fields(c, "cls")
  c.image_size = 224
  c.batch_size = 16384
  c.total_epochs = 90
  c.total_steps = 0           # > 0 overrides total_epochs
  c.warmup_epochs = 10.0
  c.optimizer = "lars"        # lars | sgd (momentum, decoupled-free L2 as torch SGD)
  c.blr = 0.1                 # lr = blr * batch_size / 256
  c.min_lr = 0.0
  c.weight_decay = 0.0
  c.momentum = 0.9
  c.data = common.labelled_data()
  c.eval = common.top1_eval()  # eval.batch_size: the feature batches
  c.eval.evaluators = ("probe",)  # by name (train/evaluate.py EVALUATORS)
  return c


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Seconds on a 2-core CPU: the test-size encoder at 28 px on Fashion-MNIST."""
  c.model.variant, c.model.patch_size, c.image_size = "test", 4, 28
  if c.task == "knn":
    c.batch_size = 64
    c.data.train_examples, c.data.test_examples = 500, 200
    return c
  c.batch_size = 32
  c.total_steps = 16
  c.warmup_epochs = 0.0
  c.optimizer = "sgd"
  c.blr = 2.0
  c.log_every_steps = 4
  c.checkpoint_every_steps = 8
  c.data.source = "fashion_mnist"   # labels a probe can learn (synthetic ones are noise)
  c.data.num_classes = 10
  c.data.eval_split = "test"
  c.data.num_threads = 2
  c.eval.every_steps = 8
  c.eval.batch_size = 64
  c.eval.max_examples = 128
  c.eval.crop_fraction = 1.0
  return c


def validate_encoder(c: ml_collections.ConfigDict) -> None:
  """The encoder fields once resolved from the checkpoint (`resolve_encoder_fields`)."""
  check.choice(c, "model.pool", POOLS)
  validate_classifier(c)


def validate_knn(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  check.choice(c, "model.pool", POOLS)
  check.bad_images(c)
  check.divisible_batch(c, "batch_size", num_devices)
  check.positive(c, "k")


def validate_linprobe(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  check.choice(c, "model.pool", POOLS)
  check.bad_images(c)
  check.choice(c, "optimizer", OPTIMIZERS)
  check.positive(c, "log_every_steps")
  check.divisible_batch(c, "batch_size", num_devices)
  check.divisible_batch(c, "eval.batch_size", num_devices)
  check.steps_or_epochs(c)
  if c.data.num_classes < 2:
    raise ConfigError(f"config field data.num_classes={c.data.num_classes} must be >= 2.")
