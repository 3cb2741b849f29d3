"""One evaluator interface: features of a frozen encoder -> metric.

  encoder = mae_encoder(model, params)            # the pretraining model (MAEPlus.features)
  encoder, info = load_encoder(config)            # config.init: our workdir or the original's .pth
  feats = encoder.features(images, batch_size, mesh)                 # (N, D) float32
  feats, labels = labelled_features(encoder, source, image_size, ...) # streamed from a source
  KnnMetric(train_images, train_labels, test_images, test_labels, k)(encoder) -> {"knn_top1"}

Every caller goes through this module: the pretraining loop (`pretrain.KnnEvaluator`), the
stand-alone k-NN entry (`run_knn`, `configs/knn.py`, task "knn") and the linear probe
(`adpe_jax/train/linprobe.py`, task "linprobe"), whose eval-set features are computed here
once.  (The fine-tune loop trains the whole network and evaluates logits, not frozen
features, so it has no use for it.)  The feature batches themselves go through
`knn.extract_features` (padded last batch, one compile per batch shape, mesh-sharded).

A stand-alone encoder is the fine-tune model's trunk (`ViTClassifier`, global_pool=False,
no drop path) loaded with `weights.init_classifier` (as fine-tuning), read out by `pool`:
"cls" norm(x)[:, 0] (MAE's linear probe default), "avg" LayerNorm-without-affine of the
patch-token mean (MAE's --global_pool), "mean" the mean of norm(x)'s patch tokens (equal to
`MAEPlus.features`, what the pretraining k-NN measures).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from adpe_jax import storage, weights
from adpe_jax.errors import CheckpointError, ConfigError, InitError
from adpe_jax.train import knn
from adpe_jax.train.common import start_run

POOLS = ("cls", "avg", "mean")


# -- frozen encoders --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModuleFeatures:
  """(params, images) -> (N, D): `module.apply` with a readout; hashable by value, so
  `knn._features_fn` compiles once per (module, readout, mesh)."""
  module: Any
  method: Optional[str] = None      # MAEPlus: "features"
  readout: str = ""                 # ViTClassifier: its `features` argument

  def __call__(self, params, images):
    if self.method:
      return self.module.apply({"params": params}, images, method=self.method)
    return self.module.apply({"params": params}, images, features=self.readout)


@dataclasses.dataclass(frozen=True)
class FrozenEncoder:
  fn: Any          # a ModuleFeatures, or an MAEPlus (its `features`)
  params: Any

  def features(self, images, batch_size: int = 256, mesh=None) -> np.ndarray:
    return knn.extract_features(self.fn, self.params, images, batch_size, mesh)


def mae_encoder(model, params) -> FrozenEncoder:
  """The pretraining model's encoder (`MAEPlus.features`: no masking, no adversary)."""
  return FrozenEncoder(model, params)   # knn._features_fn applies MAEPlus.features


def classifier_encoder(model, params, pool: str) -> FrozenEncoder:
  return FrozenEncoder(ModuleFeatures(model, readout=pool), params)


def labelled_features(encoder: FrozenEncoder, source, image_size: int,
                      max_examples: int = 0, crop_fraction: float = 1.0,
                      batch_size: int = 256, mesh=None, chunk: int = 4096):
  """Features and labels of the first `max_examples` (0 = all) examples of `source`,
  eval-transformed (Resize(size / crop_fraction) -> CenterCrop), decoded `chunk` at a time
  so a large split never sits in memory as images."""
  from adpe_jax import data  # noqa: PLC0415
  from adpe_jax.train.finetune import _View  # noqa: PLC0415
  n = len(source) if max_examples <= 0 else min(max_examples, len(source))
  chunk = max(batch_size, chunk // batch_size * batch_size)
  feats, labels = [], []
  for lo in range(0, n, chunk):
    view = source if (lo == 0 and n <= chunk) else _View(source, np.arange(lo, min(n, lo + chunk)))
    images, y = data.labelled_arrays(view, image_size, min(chunk, n - lo),
                                     crop_fraction=crop_fraction)
    feats.append(encoder.features(images, batch_size, mesh))
    labels.append(y)
  return np.concatenate(feats), np.concatenate(labels).astype(np.int32)


# -- metrics ----------------------------------------------------------------------------------

class KnnMetric:
  """k-NN top-1 (cosine, `knn.knn_top1`) of an encoder's features of fixed labelled images."""

  def __init__(self, train_images, train_labels, test_images, test_labels, k: int = 20,
               temperature: Optional[float] = None, batch_size: int = 256, mesh=None,
               num_classes: Optional[int] = None):
    self.train, self.test = (train_images, train_labels), (test_images, test_labels)
    self.k, self.temperature, self.num_classes = k, temperature, num_classes
    self.batch_size, self.mesh = batch_size, mesh

  def __call__(self, encoder: FrozenEncoder) -> dict:
    train = encoder.features(self.train[0], self.batch_size, self.mesh)
    test = encoder.features(self.test[0], self.batch_size, self.mesh)
    return {"knn_top1": knn.knn_top1(train, self.train[1], test, self.test[1], k=self.k,
                                     num_classes=self.num_classes,
                                     temperature=self.temperature)}


# -- loading an encoder from config.init --------------------------------------------------------

def _pe_type_of(run: dict) -> int:
  if run.get("model", {}).get("pe") != "rpe":
    return 0
  return 2 if run.get("adversary", {}).get("kind") == "coordinate" else 1


def resolve_encoder_fields(config) -> ml_collections.ConfigDict:
  """An unlocked copy of `config` with the auto fields (model.variant "", model.patch_size
  0, model.pe_type -1, image_size 0) taken from the run metadata of `config.init` (a
  pretraining workdir / checkpoint of ours); a .pth or a random init needs them set."""
  c = ml_collections.ConfigDict(config.to_dict())
  if c.init and not storage.resolve(c.init).exists():
    raise InitError(f"config field init={c.init!r} does not exist.")
  if not c.init and c.model.pe_type < 0:
    c.model.pe_type = 0       # a random init: APE unless set
  auto = [f for f, v in (("model.variant", c.model.variant == ""),
                         ("model.patch_size", c.model.patch_size <= 0),
                         ("model.pe_type", c.model.pe_type < 0),
                         ("image_size", c.image_size <= 0)) if v]
  if auto:
    run = None
    if c.init:
      try:
        run = weights.metadata(c.init)
      except CheckpointError as e:
        raise InitError(f"config field init={c.init!r} cannot be used: {e}") from e
    if run is None:
      what = (f"config.init={c.init!r} is a PyTorch checkpoint" if c.init
              else "config.init is empty (random init)")
      raise ConfigError(f"config field {auto[0]} is left to the checkpoint, but {what}; "
                        f"set {', '.join(auto)}.")
    m = run.get("model", {})
    if c.model.variant == "":
      c.model.variant = m.get("variant", "")
    if c.model.patch_size <= 0:
      c.model.patch_size = int(m.get("patch_size", 0))
    if c.model.pe_type < 0:
      c.model.pe_type = _pe_type_of(run)
    if c.image_size <= 0:
      c.image_size = int(run.get("image_size", 0))
  c.model.drop_path = 0.0
  c.model.global_pool = False
  if "num_classes" not in c.data:
    c.data.num_classes = 2    # the classifier's head is not used
  return c


def build_encoder_model(config):
  """The frozen `ViTClassifier` trunk of a resolved config (`resolve_encoder_fields`)."""
  from adpe_jax import defaults  # noqa: PLC0415
  from adpe_jax.finetune_defaults import PE_TYPES  # noqa: PLC0415
  from adpe_jax.train.finetune import build_classifier  # noqa: PLC0415
  defaults._choice(config, "model.variant", tuple(defaults.VARIANTS))  # noqa: SLF001
  defaults._choice(config, "model.pe_type", PE_TYPES)  # noqa: SLF001
  defaults._choice(config, "model.dtype", defaults.DTYPES)  # noqa: SLF001
  defaults._choice(config, "model.attention_impl", defaults.ATTENTION_IMPLS)  # noqa: SLF001
  if config.model.patch_size <= 0 or config.image_size % config.model.patch_size:
    raise ConfigError(f"config field image_size={config.image_size} is not divisible by "
                      f"model.patch_size={config.model.patch_size}.")
  return build_classifier(config)


def load_encoder(config) -> tuple[FrozenEncoder, dict, ml_collections.ConfigDict]:
  """(encoder, info for summary.json, the resolved config) of `config.init` ("" = the
  random init of `config.seed`), read out by `config.model.pool`."""
  from adpe_jax.train.finetune import init_params  # noqa: PLC0415
  if config.model.pool not in POOLS:
    raise ConfigError(f"config field model.pool={config.model.pool!r} is not allowed; "
                      f"allowed values: {', '.join(map(repr, POOLS))}.")
  c = resolve_encoder_fields(config)
  model = build_encoder_model(c)
  params = jax.jit(lambda k: init_params(model, k))(jax.random.key(c.seed))
  info: dict[str, Any] = {"init": c.init or "random"}
  if c.init:
    params, info = weights.init_classifier(c, model, params)
  params = {k: v for k, v in params.items() if k not in ("head", "fc_norm")}
  info.update(encoder={"variant": c.model.variant, "patch_size": c.model.patch_size,
                       "pe_type": c.model.pe_type, "image_size": c.image_size,
                       "pool": c.model.pool})
  return classifier_encoder(model, jax.device_get(params), c.model.pool), info, c


# -- the stand-alone k-NN entry (task "knn") ------------------------------------------------------

def run_knn(config, workdir: str) -> dict:
  """k-NN top-1 of config.init's encoder on data.source (train split -> test split)."""
  from adpe_jax import data  # noqa: PLC0415
  def validate(config, num_devices):
    if config.batch_size < 1 or config.batch_size % num_devices:
      raise ConfigError(f"config field batch_size={config.batch_size} must be a positive "
                        f"multiple of the {num_devices} devices.")
    if config.k < 1:
      raise ConfigError(f"config field k={config.k} must be a positive integer.")

  mesh, workdir = start_run(config, workdir, validate)
  t0 = time.time()
  encoder, info, c = load_encoder(config)
  def src(split):
    return data.get_source(config.data.source, split, config.data.dir or None)
  kw = dict(image_size=c.image_size, crop_fraction=config.crop_fraction,
            batch_size=config.batch_size, mesh=mesh)
  train = labelled_features(encoder, src(config.data.train_split),
                            max_examples=config.data.train_examples, **kw)
  test = labelled_features(encoder, src(config.data.test_split),
                           max_examples=config.data.test_examples, **kw)
  temperature = config.temperature if config.temperature > 0 else None
  acc = knn.knn_top1(*train, *test, k=config.k, temperature=temperature)
  summary = {"knn_top1": acc, "k": config.k, "temperature": temperature,
             "source": config.data.source, "train_examples": int(len(train[1])),
             "test_examples": int(len(test[1])), "seconds": time.time() - t0, **info}
  if jax.process_index() == 0:
    storage.write_text(workdir / "summary.json", json.dumps(summary, indent=2))
  logging.info("summary: %s", summary)
  return summary
