"""The fine-tuning loop (spec 6): `finetune(config, workdir)`, `config.task = "finetune"`.

Phases as in `pretrain.train_and_evaluate`, whose machinery is reused (mesh and FSDP
shardings, `Checkpointer` / `AgreedStop`, `MetricsLog`, storage, the micro-batch split):
(1) config and mesh, (2) input, (3) model, optimizer, initial weights (`config.init`) and
the compiled steps, (4) resume, (5) the loop with top-1 / top-5 every epoch (or every
`eval.every_steps`), (6) summary.json with the best and the last evaluation.

The original's recipe (spec 6): AdamW (0.9, 0.999) with layer-wise lr decay
(`param_groups_lrd`: cls_token, pos_embed, patch_embed -> layer 0, blocks_k -> k + 1, the
rest -> depth + 1; scale layer_decay ** (depth + 1 - layer)); no weight decay for 1-D
tensors, pos_embed and cls_token; warmup + cosine to min_lr with the rate set at the first
micro-step of each optimizer step (`it % accum_iter == 0`); Mixup / CutMix with label
smoothing inside and a soft-target cross-entropy.
"""

from __future__ import annotations

import json
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from adpe_jax import checkpoint as ckpt_lib
from adpe_jax import finetune_defaults, parallel, storage, weights
from adpe_jax.errors import ConfigError
from adpe_jax.models.classifier import ViTClassifier
from adpe_jax.train.common import eval_summary, start_run, supervised_loop
from adpe_jax.models.variants import model_kwargs
from adpe_jax.train import optimizer as optim
from adpe_jax.train.step import split_micro


@flax.struct.dataclass
class FinetuneState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def build_classifier(config) -> ViTClassifier:
  m = config.model
  kw = model_kwargs(m.variant)
  return ViTClassifier(
      num_classes=config.data.num_classes, image_size=config.image_size,
      patch_size=m.patch_size, embed_dim=kw["embed_dim"], depth=kw["depth"],
      num_heads=kw["num_heads"], pe="ape" if m.pe_type == 0 else "rpe",
      rpe_lookup="continuous" if m.pe_type == 2 else "integer",
      rpe_unscaled_query=bool(config.faithful), drop_path=m.drop_path,
      global_pool=m.global_pool, dtype=None if m.dtype == "float32" else jnp.dtype(m.dtype),
      attention_impl=m.attention_impl)


def init_params(model: ViTClassifier, key) -> dict:
  dummy = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  return model.init({"params": key}, dummy)["params"]


# -- layer-wise lr decay (optimizer/lr_decay.py::param_groups_lrd) --------------------------

def layer_id(name: str, depth: int) -> int:
  """The original's get_layer_id_for_vit, for our top-level parameter names."""
  if name in ("cls_token", "pos_embed", "patch_embed"):
    return 0
  if name.startswith("blocks_"):
    return int(name.split("_")[1]) + 1
  return depth + 1


def lr_scales(params, depth: int, layer_decay: float):
  """Per-tensor lr factor layer_decay ** (depth + 1 - layer_id)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: layer_decay ** (depth + 1 - layer_id(path[0].key, depth)), params)


def decay_mask(params):
  """Weight decay except for 1-D tensors and pos_embed / cls_token (no_weight_decay())."""
  return jax.tree_util.tree_map_with_path(
      lambda path, v: not (v.ndim == 1 or path[0].key in ("pos_embed", "cls_token")), params)


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update by a constant of the same tree (the group's lr_scale)."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(config, params_shape, depth: int, total_steps: int, steps_per_epoch: float):
  """torch AdamW over param_groups_lrd: (Adam, decoupled decay) * lr(step) * lr_scale."""
  lr = schedule(config, total_steps, steps_per_epoch)
  tx = optax.chain(
      optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=1e-8),
      optax.add_decayed_weights(config.weight_decay, decay_mask),
      optax.scale_by_learning_rate(lr),
      scale_by_tree(lr_scales(params_shape, depth, config.layer_decay)))
  return tx, lr


def schedule(config, total_steps: int, steps_per_epoch: float):
  """Warmup + cosine to min_lr, evaluated at optimizer step s exactly (the original sets it
  only at micro-step it % accum_iter == 0, the first of each optimizer step)."""
  return optim.warmup_cosine(optim.scaled_lr(config.blr, config.batch_size), config.min_lr,
                             config.warmup_epochs * steps_per_epoch, total_steps, 1)


# -- loss, Mixup / CutMix ---------------------------------------------------------------------

def smooth_targets(labels, num_classes: int, smoothing: float):
  """timm one_hot(on = 1 - s + s / K, off = s / K)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mix_batch(images, labels, lam, cutmix, box, num_classes: int, smoothing: float):
  """timm Mixup (batch mode) with given parameters: mixes each row with the flipped batch.

  images (N, H, W, 3), labels (N,) int; lam scalar; cutmix bool scalar; box (4,)
  (yl, yh, xl, xh).  Returns (mixed images, soft targets (N, K)).
  """
  flipped = images[::-1]
  h, w = images.shape[1:3]
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  inside = (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])
  lam_x = jnp.asarray(lam, images.dtype)
  blended = images * lam_x + flipped * (1 - lam_x)
  cut = jnp.where(inside[None, :, :, None], flipped, images)
  mixed = jnp.where(cutmix, cut, blended)
  y = smooth_targets(labels, num_classes, smoothing)
  return mixed, y * lam + y[::-1] * (1 - lam)


def soft_cross_entropy(logits, targets):
  return -(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)).sum(-1)


def make_train_step(model, tx, accum_steps: int, lr_fn, num_classes: int, smoothing: float):
  """train_step(state, batch, mix, rng): batch {"images", "labels"}; mix: per micro-batch
  {"lam" (A,), "cutmix" (A,), "box" (A, 4)}."""

  def loss_fn(params, images, targets, key):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
    return soft_cross_entropy(logits, targets).mean()

  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(state, batch, mix, rng):
    key = jax.random.fold_in(rng, state.step)
    micro = split_micro({"images": batch["images"], "labels": batch["labels"]}, accum_steps)

    def body(carry, inp):
      i, mb, lam, cutmix, box = inp
      images, targets = mix_batch(mb["images"], mb["labels"], lam, cutmix, box, num_classes,
                                  smoothing)
      loss, grads = grad_fn(state.params, images, targets, jax.random.fold_in(key, i))
      return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (loss, grads), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros),
        (jnp.arange(accum_steps), micro, mix["lam"], mix["cutmix"], mix["box"]))
    loss = loss / accum_steps
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state.step),
               "finite": (jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.float32)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model):
  """eval_step(params, images, labels, valid) -> sums of (loss, top-1, top-5, count)."""
  def eval_step(params, images, labels, valid):
    logits = model.apply({"params": params}, images, train=False)
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                                labels[:, None], axis=1)[:, 0]
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    hit = topk == labels[:, None]
    v = valid.astype(jnp.float32)
    return {"loss": (loss * v).sum(), "top1": (hit[:, 0] * v).sum(),
            "top5": (hit.any(axis=1) * v).sum(), "count": v.sum()}
  return eval_step


# -- data -------------------------------------------------------------------------------------

def _source(config, split: str):
  from adpe_jax import data  # noqa: PLC0415
  name = config.data.source
  options = {}
  if name.startswith("synthetic"):
    options = dict(num_examples=config.data.num_examples or 1024, seed=config.seed,
                   num_classes=config.data.num_classes)
  return data.get_source(name, split, config.data.dir or None, **options)


class _View:
  """Examples `indices` of a source (a source itself)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, indices
    self.images = None

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


class Evaluator:
  """Loss, top-1 and top-5 on the eval split (Resize(size / crop_fraction) -> CenterCrop).

  Each process decodes its contiguous part of every global eval batch; the last batch is
  padded (and masked).  Small eval sets (<= 20000 examples of <= 64 px) are decoded once.
  """

  def __init__(self, config, model, mesh):
    from adpe_jax import data  # noqa: PLC0415
    self.source = _source(config, config.data.eval_split)
    n = len(self.source)
    self.n = min(n, config.eval.max_examples) if config.eval.max_examples > 0 else n
    self.batch = config.eval.batch_size
    self.size, self.crop = config.image_size, config.eval.crop_fraction
    self.mesh = mesh
    self.local = self.batch // jax.process_count()
    self.step = jax.jit(make_eval_step(model), in_shardings=(
        None, parallel.batch_sharding(mesh), parallel.batch_sharding(mesh),
        parallel.batch_sharding(mesh)), out_shardings=parallel.replicated(mesh))
    self._cache = None
    self._labelled = data.labelled_arrays
    if self.n <= 20000 and self.size <= 64:
      self._cache = [self._host_batch(lo) for lo in range(0, self.n, self.batch)]

  def _host_batch(self, lo: int):
    start = lo + jax.process_index() * self.local
    idx = np.arange(start, start + self.local)
    valid = idx < self.n
    idx = np.where(valid, idx, 0)
    images, labels = self._labelled(_View(self.source, idx), self.size, crop_fraction=self.crop)
    return images, labels, valid

  def __call__(self, params) -> dict:
    totals = None
    batches = self._cache or (self._host_batch(lo) for lo in range(0, self.n, self.batch))
    for images, labels, valid in batches:
      b = parallel.global_batch({"i": images, "l": labels, "v": valid}, self.mesh)
      out = self.step(params, b["i"], b["l"], b["v"])
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    t = jax.device_get(totals)
    c = max(float(t["count"]), 1.0)
    return {"eval_loss": float(t["loss"]) / c, "top1": float(t["top1"]) / c,
            "top5": float(t["top5"]) / c}


# -- the loop ---------------------------------------------------------------------------------

def run_metadata(config) -> dict:
  return {"task": "finetune",
          "model": {"variant": config.model.variant, "patch_size": config.model.patch_size,
                    "pe_type": config.model.pe_type, "global_pool": config.model.global_pool},
          "image_size": config.image_size, "num_classes": config.data.num_classes}


def _previous_evals(workdir) -> list[dict]:
  out = []
  try:
    for line in (storage.read_text(workdir / "metrics.jsonl") or "").splitlines():
      try:
        r = json.loads(line)
      except ValueError:
        continue
      if isinstance(r, dict) and "top1" in r:
        out.append(r)
  except OSError:
    pass
  return out


def finetune(config, workdir: str) -> dict:
  # 1. Config and mesh.
  mesh, workdir = start_run(config, workdir, finetune_defaults.validate)

  # 2. Input.
  from adpe_jax.data.finetune import FinetunePipeline, mixup_params  # noqa: PLC0415
  source = _source(config, config.data.train_split)
  if getattr(source, "num_classes", None) and source.num_classes > config.data.num_classes:
    raise ConfigError(f"config field data.num_classes={config.data.num_classes} is below the "
                      f"{source.num_classes} classes of data.source={config.data.source!r}.")
  steps_per_epoch = len(source) // config.batch_size
  if steps_per_epoch < 1:
    raise ConfigError(f"config field batch_size={config.batch_size} exceeds the "
                      f"{len(source)} examples of data.source={config.data.source!r}.")
  total_steps = (config.total_steps if config.total_steps > 0
                 else int(config.total_epochs * steps_per_epoch))
  pipeline = FinetunePipeline(
      source, config.batch_size, config.image_size, seed=config.seed,
      randaug=config.aug.randaug, reprob=config.aug.reprob,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data.num_threads or None)

  # 3. Model, optimizer, initial weights, compiled steps.
  model = build_classifier(config)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  params_shape = jax.eval_shape(lambda: init_params(model, init_key))
  tx, lr_fn = make_optimizer(config, params_shape, model.depth, total_steps,
                             float(steps_per_epoch))
  create = lambda p: FinetuneState(jnp.zeros((), jnp.int32), p, tx.init(p))  # noqa: E731
  state_sharding = parallel.state_shardings(mesh, jax.eval_shape(create, params_shape),
                                            config.mesh.fsdp_min_size)
  repl = parallel.replicated(mesh)
  info: dict[str, Any] = {"init": config.init or "random"}
  ckpt = ckpt_lib.Checkpointer(workdir, config.checkpoint_every_steps,
                               config.keep_checkpoints, metadata=run_metadata(config))
  resuming = ckpt.latest_step() is not None
  params = jax.jit(lambda k: init_params(model, k))(init_key)
  if config.init and not resuming:
    params, info = weights.init_classifier(config, model, params)
  # Host copies: the state is then created straight into its (possibly sharded) layout.
  state = jax.jit(create, out_shardings=state_sharding)(jax.device_get(params))
  del params
  train_step = jax.jit(
      make_train_step(model, tx, config.accum_steps, lr_fn, config.data.num_classes,
                      config.aug.smoothing),
      in_shardings=(state_sharding, parallel.batch_sharding(mesh), repl, repl),
      out_shardings=(state_sharding, repl), donate_argnums=(0,))
  evaluator = Evaluator(config, model, mesh)
  eval_every = config.eval.every_steps or steps_per_epoch

  # 4. Resume.
  restored = ckpt.restore(ckpt_lib.abstract_of(state))
  if restored is not None:
    state = restored
  start_step = int(state.step)
  evals = []
  if restored is not None:  # evaluations up to the restored step; where the weights came from
    evals = [e for e in _previous_evals(workdir) if e["step"] <= start_step]
    try:
      previous = json.loads(storage.read_text(workdir / "summary.json") or "{}")
      info.update({k: v for k, v in previous.items() if k.startswith("init")})
    except (OSError, ValueError):
      pass
  logging.info("fine-tuning %d steps (%d per epoch) from step %d, init %s",
               total_steps, steps_per_epoch, start_step, config.init or "random")

  # 5. The loop.
  def step_fn(state, step, host):
    batch = parallel.global_batch({"images": host["images"], "labels": host["labels"]}, mesh)
    mix = mixup_params(config.seed, step, config.accum_steps, config.image_size,
                       config.aug.mixup, config.aug.cutmix, config.aug.mixup_prob,
                       config.aug.mixup_switch_prob)
    return train_step(state, batch, mix, step_key)

  state, status, end_step, train_seconds = supervised_loop(
      config, workdir=workdir, state=state, pipeline=pipeline, ckpt=ckpt, train_step=step_fn,
      evaluate=lambda s: evaluator(s.params), evals=evals, start_step=start_step,
      total_steps=total_steps, steps_per_epoch=steps_per_epoch, eval_every=eval_every)

  # 6. Summary.
  summary: dict[str, Any] = {"status": status, "steps": end_step, "total_steps": total_steps,
                             "train_seconds": train_seconds, **info}
  summary.update(eval_summary(evals))
  ckpt.close()
  if jax.process_index() == 0:
    storage.write_text(workdir / "summary.json", json.dumps(summary, indent=2))
  logging.info("summary: %s", summary)
  return {"state": state, "summary": summary, "evals": evals}
