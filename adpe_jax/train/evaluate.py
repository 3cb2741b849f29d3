"""Evaluators, one interface for the loop: `evaluator.run(state or params, step) -> dict`.

  KnnEvaluator           k-NN top-1 of frozen features (pretraining, the k-NN task)
  ClassifierEvaluator    loss / top-1 / top-5 of a classifier (fine-tuning)
  FeatureProbeEvaluator  loss / top-1 / top-5 of a probe over fixed features (linear probe)

built by name from config.eval.evaluators (`EVALUATORS`, `from_config`: "knn",
"reconstructions", "classifier", "probe"),

and the frozen encoders they read:

  encoder = mae_encoder(model, params)            # the pretraining model (MAEPlus.features)
  encoder, info, config = load_encoder(config)    # config.init: our workdir or a .pth
  feats = encoder.features(images, batch_size, mesh)                 # (N, D) float32
  feats, labels = labelled_features(encoder, source, image_size, ...) # streamed from a source

The feature batches go through `knn_metric.extract_features` (padded last batch, one
compile per batch shape, mesh-sharded).  A stand-alone encoder is the fine-tune model's
trunk (`ViTClassifier`, global_pool=False, no drop path) loaded with
`weights.init_classifier` (as fine-tuning), read out by `pool`: "cls" norm(x)[:, 0]
(MAE's linear probe default), "avg" LayerNorm-without-affine of the patch-token mean
(MAE's --global_pool), "mean" the mean of norm(x)'s patch tokens (equal to
`MAEPlus.features`, what the pretraining k-NN measures).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from adpe_jax import data, parallel, weights
from adpe_jax.config import encoder as encoder_config
from adpe_jax.config import probe as probe_config
from adpe_jax.train import adversary_plot, knn_metric, loop, reconstruction
from adpe_jax.train.state import build_classifier, init_classifier_params, init_params

POOLS = probe_config.POOLS


# -- frozen encoders --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModuleFeatures:
  """(params, images) -> (N, D): `module.apply` with a readout; hashable by value, so
  `knn_metric._features_fn` compiles once per (module, readout, mesh)."""
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
    return knn_metric.extract_features(self.fn, self.params, images, batch_size, mesh)


def mae_encoder(model, params) -> FrozenEncoder:
  """The pretraining model's encoder (`MAEPlus.features`: no masking, no adversary)."""
  return FrozenEncoder(model, params)   # knn_metric._features_fn applies MAEPlus.features


def classifier_encoder(model, params, pool: str) -> FrozenEncoder:
  return FrozenEncoder(ModuleFeatures(model, readout=pool), params)


def labelled_features(encoder: FrozenEncoder, source, image_size: int,
                      max_examples: int = 0, crop_fraction: float = 1.0,
                      batch_size: int = 256, mesh=None, chunk: int = 4096):
  """Features and labels of `max_examples` (0 = all) examples of `source` spread over it
  (`data.spread`), eval-transformed (Resize(size / crop_fraction) -> CenterCrop), decoded
  `chunk` at a time so a large split never sits in memory as images."""
  source = data.spread(source, max_examples)
  n = len(source)
  chunk = max(batch_size, chunk // batch_size * batch_size)
  feats, labels = [], []
  for lo in range(0, n, chunk):
    view = (source if (lo == 0 and n <= chunk)
            else data.Subset(source, np.arange(lo, min(n, lo + chunk))))
    images, y = data.labelled_arrays(view, image_size, min(chunk, n - lo),
                                     crop_fraction=crop_fraction)
    feats.append(encoder.features(images, batch_size, mesh))
    labels.append(y)
  return np.concatenate(feats), np.concatenate(labels).astype(np.int32)


# -- evaluators (the loop's interface: run(state or params, step) -> dict) ---------------------

def params_of(state_or_params):
  """An evaluator's argument: a train state (its .params) or params themselves."""
  return getattr(state_or_params, "params", state_or_params)


def decode_once(num_examples: int, image_size: int) -> bool:
  """Whether an eval set is small enough (<= 20000 examples of <= 64 px, <= 1 GiB as
  float32) to be decoded once and kept, rather than decoded at every evaluation."""
  return num_examples <= 20000 and image_size <= 64


class LabelledImages:
  """`max_examples` (0 = all) eval-transformed examples of a source, spread over it
  (`data.spread`; Resize(size / crop_fraction) -> CenterCrop), decoded once when small
  (<= 20000 of <= 64 px), otherwise streamed `chunk` at a time."""

  def __init__(self, source, image_size: int, max_examples: int = 0,
               crop_fraction: float = 1.0, chunk: int = 4096):
    source = data.spread(source, max_examples)
    self.source, self.size, self.crop, self.chunk = source, image_size, crop_fraction, chunk
    self.n = len(source)
    self.cached = None
    if decode_once(self.n, image_size):
      self.cached = data.labelled_arrays(source, image_size, self.n, crop_fraction=crop_fraction)

  def features(self, encoder: "FrozenEncoder", batch_size: int, mesh=None):
    """(features (N, D) float32, labels (N,) int32)."""
    if self.cached is not None:
      images, labels = self.cached
      return encoder.features(images, batch_size, mesh), labels.astype(np.int32)
    return labelled_features(encoder, self.source, self.size, self.n, self.crop, batch_size,
                             mesh, self.chunk)


class KnnEvaluator:
  """k-NN top-1 (cosine, `knn_metric.knn_top1`) of an encoder's features: train split -> test split.

  `encoder_of(params) -> FrozenEncoder`: the pretraining model's `MAEPlus.features`
  (`mae_encoder`) or a loaded classifier trunk.  Used by pretraining (the evaluator "knn":
  every eval.knn_every_steps and at the end) and the stand-alone k-NN task.
  `random_init() -> params` (pretraining): its run at `end_step` (the end of the run) also
  measures the encoder of a random init, the baseline the final k-NN is read against, and
  the seconds of both (knn_top1_random_init, knn_seconds)."""
  key = "knn_top1"
  name = "k-NN"

  def __init__(self, encoder_of: Callable, train: LabelledImages, test: LabelledImages, *,
               k: int = 20, temperature: Optional[float] = None, batch_size: int = 256,
               mesh=None, every_steps: int = 0, at_end: bool = True,
               random_init: Optional[Callable] = None, end_step: int = 0):
    self.encoder_of, self.train, self.test = encoder_of, train, test
    self.k, self.temperature = k, temperature
    self.batch_size, self.mesh = batch_size, mesh
    self.every_steps, self.at_end = every_steps, at_end
    self.random_init, self.end_step = random_init, end_step

  @classmethod
  def from_pretrain_config(cls, config, model, mesh, random_init: Optional[Callable] = None,
                           end_step: int = 0) -> "KnnEvaluator":
    name = config.eval.knn_source
    return cls(lambda params: mae_encoder(model, params),
               LabelledImages(data.eval_source(config, "train", name), config.image_size,
                              config.eval.knn_train_examples),
               LabelledImages(data.eval_source(config, "test", name), config.image_size,
                              config.eval.knn_test_examples),
               k=config.eval.knn_k, batch_size=64 * mesh.size, mesh=mesh,
               every_steps=config.eval.knn_every_steps, random_init=random_init,
               end_step=end_step)

  def top1(self, params) -> float:
    encoder = self.encoder_of(params)
    train = self.train.features(encoder, self.batch_size, self.mesh)
    test = self.test.features(encoder, self.batch_size, self.mesh)
    return knn_metric.knn_top1(*train, *test, k=self.k, temperature=self.temperature)

  def run(self, state_or_params, step: int = 0) -> dict:
    t0 = time.time()
    at_end = self.random_init is not None and step >= self.end_step
    if at_end:
      logging.info("end-of-run k-NN (%d train / %d test examples)", self.train.n, self.test.n)
    out = {"knn_top1": self.top1(params_of(state_or_params))}
    if at_end:
      out["knn_top1_random_init"] = self.top1(self.random_init())
      out["knn_seconds"] = time.time() - t0  # the final and the random-init k-NN
    return out


def topk_sums(logits, labels, valid) -> dict:
  """Sums of (cross-entropy, top-1 hits, top-5 hits, count) over the valid rows."""
  loss = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                              labels[:, None], axis=1)[:, 0]
  topk = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  hit = topk == labels[:, None]
  v = valid.astype(jnp.float32)
  return {"loss": (loss * v).sum(), "top1": (hit[:, 0] * v).sum(),
          "top5": (hit.any(axis=1) * v).sum(), "count": v.sum()}


def _means(totals) -> dict:
  t = jax.device_get(totals)
  c = max(float(t["count"]), 1.0)
  return {"eval_loss": float(t["loss"]) / c, "top1": float(t["top1"]) / c,
          "top5": float(t["top5"]) / c}


class ClassifierEvaluator:
  """Loss, top-1 and top-5 of a classifier on the eval split (the fine-tune task).

  Each process decodes its contiguous part of every global eval batch; the last batch is
  padded (and masked).  Small eval sets (<= 20000 examples of <= 64 px) are decoded once.
  """
  key = "top1"
  name = "classifier evaluation"

  def __init__(self, model, source, mesh, *, image_size: int, batch_size: int,
               max_examples: int = 0, crop_fraction: float = 1.0, every_steps: int = 0):
    self.source, self.mesh = data.spread(source, max_examples), mesh
    self.n = len(self.source)
    self.batch, self.size, self.crop = batch_size, image_size, crop_fraction
    self.every_steps, self.at_end = every_steps, True
    self.local = self.batch // jax.process_count()
    shard = parallel.batch_sharding(mesh)

    def eval_step(params, images, labels, valid):
      return topk_sums(model.apply({"params": params}, images, train=False), labels, valid)

    self.step = jax.jit(parallel.under_mesh(eval_step, mesh),
                        in_shardings=(None, shard, shard, shard),
                        out_shardings=parallel.replicated(mesh))
    self._cache = None
    if decode_once(self.n, self.size):
      self._cache = [self._host_batch(lo) for lo in range(0, self.n, self.batch)]

  def _host_batch(self, lo: int):
    start = lo + jax.process_index() * self.local
    idx = np.arange(start, start + self.local)
    valid = idx < self.n
    idx = np.where(valid, idx, 0)
    images, labels = data.labelled_arrays(data.Subset(self.source, idx), self.size,
                                          crop_fraction=self.crop)
    return images, labels, valid

  def run(self, state_or_params, step: int = 0) -> dict:
    del step
    params = params_of(state_or_params)
    totals = None
    batches = self._cache or (self._host_batch(lo) for lo in range(0, self.n, self.batch))
    for images, labels, valid in batches:
      b = parallel.global_batch({"i": images, "l": labels, "v": valid}, self.mesh)
      out = self.step(params, b["i"], b["l"], b["v"])
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    return _means(totals)


class FeatureProbeEvaluator:
  """Loss, top-1 and top-5 of a probe over fixed features (the linear-probe task: the
  eval set's frozen features are computed once, each evaluation only applies the probe).

  `apply(state, feats) -> logits`; rows are evaluated `batch` at a time, the last batch
  padded (one compile)."""
  key = "top1"
  name = "probe evaluation"

  def __init__(self, apply: Callable, feats, labels, *, batch: int = 4096,
               every_steps: int = 0):
    self.feats, self.labels, self.batch = feats, labels, batch
    self.every_steps, self.at_end = every_steps, True
    self.step = jax.jit(lambda state, f, y, v: topk_sums(apply(state, f), y, v))

  def run(self, state, step: int = 0) -> dict:
    del step
    totals = None
    n = len(self.labels)
    for lo in range(0, n, self.batch):
      f, y = self.feats[lo:lo + self.batch], self.labels[lo:lo + self.batch]
      valid = np.ones(len(y), bool)
      if len(y) < self.batch and n > self.batch:  # pad: one compile
        pad = self.batch - len(y)
        f = np.concatenate([f, np.zeros((pad, f.shape[1]), f.dtype)])
        y = np.concatenate([y, np.zeros(pad, y.dtype)])
        valid = np.concatenate([valid, np.zeros(pad, bool)])
      out = self.step(state, f, y, valid)
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    return _means(totals)


class HeldoutLoss:
  """The pretraining loss on held-out images (an evaluator, `eval.heldout_split`): `examples`
  images spread over that split (`data.spread`), eval-transformed (Resize -> CenterCrop to
  image_size, one view each), with masks fixed once for the whole run (noise from `seed`), so
  the number moves only with the weights.  Twice: with the adversary at zero (`heldout_loss`, the
  model's own reconstruction; Xie et al., CVPR 2023, find this pretraining validation loss a
  good indicator of fine-tuning) and with the adversary as trained (`heldout_loss_adv`; their
  difference is what the adversary costs the model on data it never trained on).  In chunks of
  `chunk` images (the count is rounded down to a multiple of it): every image has the same
  number of masked patches, so the mean of the chunks' means is the mean over all masked
  patches.  The gap's noise level, `heldout_gap_se`: the standard error of the mean over chunks
  of each chunk's gap (on minus off, the same images and masks), so a gap far inside it is no
  effect of the adversary."""
  name = "heldout"
  key = "heldout_loss"

  def __init__(self, model, source, image_size: int, examples: int, every_steps: int, mesh,
               seed: int = 0, chunk: int = 64):
    n = min(examples, len(source))
    self.chunk = min(chunk, n)
    n -= n % self.chunk
    if n < 1:
      raise ValueError(f"heldout loss: no examples (asked for {examples})")
    images, _ = data.labelled_arrays(data.spread(source, n), image_size, n)
    noise = jax.random.uniform(jax.random.key(seed), (n, model.num_patches))
    repl = parallel.replicated(mesh)
    self.images = jax.device_put(images.reshape(n // self.chunk, self.chunk, *images.shape[1:]),
                                 repl)
    self.noise = jax.device_put(np.asarray(noise).reshape(n // self.chunk, self.chunk, -1), repl)
    self.n, self.every_steps, self.at_end = n, every_steps, True

    def losses(params, adversary, images, noise):
      def one(adv):
        def chunk_loss(args):
          loss, _, _ = model.apply({"params": params, "adversary": adv}, args[0],
                                   noise=args[1], rngs={"masking": jax.random.key(0)})
          return loss
        chunks = jax.lax.map(chunk_loss, (images, noise))
        return jnp.mean(chunks), chunks
      return one(jax.tree.map(jnp.zeros_like, adversary)), one(adversary)

    self._losses = jax.jit(parallel.under_mesh(losses, mesh))

  def run(self, state, step: int) -> dict:
    del step
    (off, off_chunks), (on, on_chunks) = jax.device_get(
        self._losses(state.params, state.adversary, self.images, self.noise))
    out = {"heldout_loss": float(off), "heldout_loss_adv": float(on)}
    gaps = np.asarray(on_chunks, np.float64) - np.asarray(off_chunks, np.float64)
    if gaps.size > 1:
      out["heldout_gap_se"] = float(gaps.std(ddof=1) / np.sqrt(gaps.size))
    return out


# -- evaluators by name: config.eval.evaluators (as big_vision's config.evals) -------------------
#
# name -> builder(config, context) -> an evaluator, or None when the config turns it off.
# `context`: what the task built that evaluators read; `run.run_task` adds mesh, workdir,
# total_steps and steps_per_epoch; each builder names the task's own keys it reads.

def _knn(config, context):
  """Pretraining: model, init_key.  Off without eval.knn_source."""
  if not config.eval.knn_source:
    return None
  model = context["model"]
  return KnnEvaluator.from_pretrain_config(
      config, model, context["mesh"], end_step=context["total_steps"],
      random_init=lambda: jax.jit(lambda k: init_params(model, k))(context["init_key"]))


def _reconstructions(config, context):
  """Pretraining: model, step_key, sample_images."""
  return reconstruction.Reconstructions(config, context["model"], context["step_key"],
                                        context["workdir"], config.eval.recon_every_steps,
                                        context["sample_images"])


def _classifier(config, context):
  """Fine-tuning: model (the classifier), on data.eval_split, every eval.every_steps (0:
  every epoch)."""
  return ClassifierEvaluator(
      context["model"], data.eval_source(config, config.data.eval_split), context["mesh"],
      image_size=config.image_size, batch_size=config.eval.batch_size,
      max_examples=config.eval.max_examples, crop_fraction=config.eval.crop_fraction,
      every_steps=config.eval.every_steps or int(context["steps_per_epoch"]))


def _probe(config, context):
  """Linear probe: probe_logits, eval_feats, eval_labels (the eval set's frozen features)."""
  return FeatureProbeEvaluator(
      context["probe_logits"], context["eval_feats"], context["eval_labels"],
      every_steps=config.eval.every_steps or int(context["steps_per_epoch"]))


def _heldout(config, context):
  """Pretraining: model.  Off without eval.heldout_split."""
  if not config.eval.heldout_split:
    return None
  return HeldoutLoss(context["model"], data.eval_source(config, config.eval.heldout_split),
                     config.image_size, config.eval.heldout_examples,
                     config.eval.heldout_every_steps, context["mesh"], seed=config.seed)


def _adversary_plot(config, context):
  """Pretraining: nothing of its own.  Off without an adversary."""
  if config.adversary.kind == "none":
    return None
  workdir = context["workdir"]
  return adversary_plot.AdversaryPlot(
      config, workdir, config.eval.recon_every_steps,
      lambda step: loop.logged_records(workdir, "step", step))


EVALUATORS = {"knn": _knn, "reconstructions": _reconstructions, "heldout": _heldout,
              "adversary_plot": _adversary_plot, "classifier": _classifier, "probe": _probe}


def from_config(config, context: dict) -> list:
  """The evaluators config.eval.evaluators names, in its order (those its config turns off
  left out); the names were checked at start (`config.validate.evaluators`)."""
  built = (EVALUATORS[name](config, context) for name in config.eval.evaluators)
  return [e for e in built if e is not None]


# -- loading an encoder from config.init --------------------------------------------------------

def resolve_encoder_fields(config) -> ml_collections.ConfigDict:
  """`config` with its auto encoder fields read from the run metadata of `config.init`
  (`adpe_jax.config.encoder.resolve_encoder_fields`, reading through `weights.metadata`)."""
  return encoder_config.resolve_encoder_fields(config, weights.metadata)


def build_encoder_model(config):
  """The frozen `ViTClassifier` trunk of a resolved config (`resolve_encoder_fields`)."""
  probe_config.validate_encoder(config)
  return build_classifier(config)


def load_encoder(config) -> tuple[FrozenEncoder, dict, ml_collections.ConfigDict]:
  """(encoder, info for summary.json, the resolved config) of `config.init` ("" = the
  random init of `config.seed`), read out by `config.model.pool`."""
  c = resolve_encoder_fields(config)
  model = build_encoder_model(c)
  params = jax.jit(lambda k: init_classifier_params(model, k))(jax.random.key(c.seed))
  info: dict[str, Any] = {"init": c.init or "random"}
  if c.init:
    params, info = weights.init_classifier(c, model, params)
  params = {k: v for k, v in params.items() if k not in ("head", "fc_norm")}
  info.update(encoder={"variant": c.model.variant, "patch_size": c.model.patch_size,
                       "pe": c.model.pe, "rpe_lookup": c.model.rpe_lookup,
                       "image_size": c.image_size,
                       "pool": c.model.pool})
  return classifier_encoder(model, jax.device_get(params), c.model.pool), info, c
