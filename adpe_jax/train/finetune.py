"""The fine-tuning task (spec 6): `finetune(config, workdir)`, `config.task = "finetune"`.

Its own pieces (`TASK`, run by `run.run_task` as every task): (1) input, (2) model,
optimizer (`optimizer.finetune_optimizer`), initial weights (`config.init`, not read again
by a resumed run) and the compiled step, (3) the step and what its evaluator reads
(config.eval.evaluators: "classifier", top-1 / top-5 every epoch or every
`eval.every_steps`); summary.json has the best and the last evaluation.

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

from adpe_jax import data, parallel, weights
from adpe_jax.config import finetune as finetune_config
from adpe_jax.config import validate as check
from adpe_jax.data import bad_images
from adpe_jax.data.finetune import FinetunePipeline, mixup_params
from adpe_jax.train import loop, run
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


def build(config, mesh, workdir, resuming: bool, source) -> run.Built:
  # 1. Input.
  check.num_classes(config, getattr(source, "num_classes", None))
  total_steps, steps_per_epoch = loop.steps_from_epochs(config, len(source))
  pipeline = FinetunePipeline(
      source, config.batch_size, config.image_size, seed=config.seed,
      randaug=config.aug.randaug, reprob=config.aug.reprob,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data.num_threads or None,
      bad_images=bad_images.Policy.from_config(config.data, source))

  # 2. Model, optimizer, initial weights, compiled step.
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
  params = jax.jit(lambda k: init_classifier_params(model, k))(init_key)
  if config.init and not resuming:
    params, info = weights.init_classifier(config, model, params)
  if resuming:  # where the weights came from: kept from the first run's summary
    info.update({k: v for k, v in loop.read_summary(workdir).items() if k.startswith("init")})
  # Host copies: the state is then created straight into its (possibly sharded) layout.
  state = jax.jit(create, out_shardings=state_sharding)(jax.device_get(params))
  del params
  train_step = jax.jit(
      parallel.under_mesh(make_train_step(model, tx, config.accum_steps, lr_fn,
                                          config.data.num_classes, config.aug.smoothing), mesh),
      in_shardings=(state_sharding, parallel.batch_sharding(mesh), repl, repl),
      out_shardings=(state_sharding, repl), donate_argnums=(0,))

  # 3. The step; the evaluator reads the model.
  def step_fn(state, step, host):
    batch = parallel.global_batch({"images": host["images"], "labels": host["labels"]}, mesh)
    mix = mixup_params(config.seed, step, config.accum_steps, config.image_size,
                       config.aug.mixup, config.aug.cutmix, config.aug.mixup_prob,
                       config.aug.mixup_switch_prob)
    return train_step(state, batch, mix, step_key)

  return run.Built(state=state, step_fn=step_fn, batches=pipeline, total_steps=total_steps,
                   steps_per_epoch=steps_per_epoch, context={"model": model},
                   summary=lambda result: info,
                   log_extras=lambda state, done: bad_image_metrics(pipeline),
                   note=f"init {config.init or 'random'}")


def training_source(config):
  """The data the task trains on (`run.Task.source`: the skeleton opens it once, compares
  its identity with the checkpoint's and hands it to `build`)."""
  return data.from_config(config, config.data.train_split)


TASK = run.Task("finetune", finetune_config.validate, build=build, source=training_source,
                run_metadata=run_metadata, upgrade=check.upgrade_run_metadata,
                evaluators=("classifier",))


def finetune(config, workdir: str) -> dict:
  """Fine-tunes in `workdir` (the same command resumes): {"state", "summary", "history",
  "evals"}."""
  return run.run_task(TASK, config, workdir)
