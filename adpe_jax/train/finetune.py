"""The fine-tuning task (spec 6): `finetune(config, workdir)`, `config.task = "finetune"`.

Phases as in `pretrain.train_and_evaluate`: (1) config and mesh, (2) input, (3) model,
optimizer (`optimizer.finetune_optimizer`), initial weights (`config.init`) and the
compiled step, (4) resume, (5) the one loop (`loop.train`) with top-1 / top-5
(`evaluate.ClassifierEvaluator`) every epoch (or every `eval.every_steps`), (6)
summary.json with the best and the last evaluation.

The original's recipe (spec 6): AdamW (0.9, 0.999) with layer-wise lr decay
(`param_groups_lrd`: cls_token, pos_embed, patch_embed -> layer 0, blocks_k -> k + 1, the
rest -> depth + 1; scale layer_decay ** (depth + 1 - layer)); no weight decay for 1-D
tensors, pos_embed and cls_token; warmup + cosine to min_lr with the rate set at the first
micro-step of each optimizer step (`it % accum_iter == 0`); Mixup / CutMix with label
smoothing inside and a soft-target cross-entropy.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging

from adpe_jax import checkpoint as ckpt_lib
from adpe_jax import data, parallel, weights, workdir_lock
from adpe_jax.config import finetune as finetune_config
from adpe_jax.config import validate as check
from adpe_jax.data import bad_images
from adpe_jax.data.finetune import FinetunePipeline, mixup_params
from adpe_jax.errors import ConfigError
from adpe_jax.train import evaluate, loop
from adpe_jax.train import optimizer as optim
from adpe_jax.train.metrics import bad_image_metrics
from adpe_jax.train.mixup import mix_batch, soft_cross_entropy
from adpe_jax.train.state import build_classifier, init_classifier_params
from adpe_jax.train.step import split_micro


@flax.struct.dataclass
class FinetuneState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


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



def run_metadata(config) -> dict:
  m = config.model
  return {"task": "finetune",
          "model": {"variant": m.variant, "patch_size": m.patch_size, "pe": m.pe,
                    "rpe_lookup": m.rpe_lookup if m.pe == "rpe" else None,
                    "global_pool": m.global_pool},
          "image_size": config.image_size, "num_classes": config.data.num_classes}


@workdir_lock.released_at_end
def finetune(config, workdir: str) -> dict:
  # 1. Config and mesh.
  mesh, workdir = loop.start_run(config, workdir, finetune_config.validate, run_metadata,
                                 check.upgrade_run_metadata)

  # 2. Input.
  source = data.from_config(config, config.data.train_split)
  if getattr(source, "num_classes", None) and source.num_classes > config.data.num_classes:
    raise ConfigError(f"config field data.num_classes={config.data.num_classes} is below the "
                      f"{source.num_classes} classes of data.source={config.data.source!r}.")
  total_steps, steps_per_epoch = loop.steps_from_epochs(config, len(source))
  pipeline = FinetunePipeline(
      source, config.batch_size, config.image_size, seed=config.seed,
      randaug=config.aug.randaug, reprob=config.aug.reprob,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data.num_threads or None,
      bad_images=bad_images.Policy.from_config(config.data, source))

  # 3. Model, optimizer, initial weights, compiled steps.
  model = build_classifier(config)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  params_shape = jax.eval_shape(lambda: init_classifier_params(model, init_key))
  tx, lr_fn = optim.finetune_optimizer(config, params_shape, model.depth, total_steps,
                                       steps_per_epoch)
  create = lambda p: FinetuneState(jnp.zeros((), jnp.int32), p, tx.init(p))  # noqa: E731
  state_sharding = parallel.state_shardings(mesh, jax.eval_shape(create, params_shape),
                                            config.mesh.fsdp_min_size)
  repl = parallel.replicated(mesh)
  info: dict[str, Any] = {"init": config.init or "random"}
  ckpt = ckpt_lib.Checkpointer(workdir, config.checkpoint_every_steps,
                               config.keep_checkpoints, metadata=run_metadata(config),
                               upgrade=check.upgrade_run_metadata)
  resuming = ckpt.latest_step() is not None
  params = jax.jit(lambda k: init_classifier_params(model, k))(init_key)
  if config.init and not resuming:
    params, info = weights.init_classifier(config, model, params)
  # Host copies: the state is then created straight into its (possibly sharded) layout.
  state = jax.jit(create, out_shardings=state_sharding)(jax.device_get(params))
  del params
  train_step = jax.jit(
      parallel.under_mesh(make_train_step(model, tx, config.accum_steps, lr_fn,
                                          config.data.num_classes, config.aug.smoothing), mesh),
      in_shardings=(state_sharding, parallel.batch_sharding(mesh), repl, repl),
      out_shardings=(state_sharding, repl), donate_argnums=(0,))
  evaluator = evaluate.ClassifierEvaluator(
      model, data.eval_source(config, config.data.eval_split), mesh,
      image_size=config.image_size, batch_size=config.eval.batch_size,
      max_examples=config.eval.max_examples, crop_fraction=config.eval.crop_fraction,
      every_steps=config.eval.every_steps or int(steps_per_epoch))

  # 4. Resume (where the weights came from is kept from the first run's summary).
  restored = ckpt.restore(ckpt_lib.abstract_of(state))
  if restored is not None:
    state = restored
    info.update({k: v for k, v in loop.read_summary(workdir).items() if k.startswith("init")})
  start_step = int(state.step)
  kept = loop.already_finished(workdir, start_step, total_steps)
  if kept is not None:
    ckpt.close()
    pipeline.close()
    return {"state": state, "summary": kept, "evals": []}
  logging.info("fine-tuning %d steps (%d per epoch) from step %d, init %s",
               total_steps, steps_per_epoch, start_step, config.init or "random")

  # 5. The loop.
  def step_fn(state, step, host):
    batch = parallel.global_batch({"images": host["images"], "labels": host["labels"]}, mesh)
    mix = mixup_params(config.seed, step, config.accum_steps, config.image_size,
                       config.aug.mixup, config.aug.cutmix, config.aug.mixup_prob,
                       config.aug.mixup_switch_prob)
    return train_step(state, batch, mix, step_key)

  result = loop.train(config, workdir=workdir, ckpt=ckpt, state=state, step_fn=step_fn,
                      batches=pipeline, total_steps=total_steps,
                      steps_per_epoch=steps_per_epoch, evaluators=[evaluator],
                      log_extras=lambda state, done: bad_image_metrics(pipeline),
                      num_devices=mesh.size)
  ckpt.close()

  # 6. Summary.
  summary = loop.run_summary(result, total_steps, **info)
  loop.write_summary(workdir, summary)
  return {"state": result.state, "summary": summary, "evals": result.evals}
