"""The pretraining task: `train_and_evaluate(config, workdir)`.

Its own pieces (`TASK`, run by `run.run_task`: start, refusals, lock, checkpoint, the one
loop, summary.json): (1) input, (2) model, optimizer and the compiled step, (3) what its
evaluators read (config.eval.evaluators: "knn", "reconstructions"; the k-NN at the end also
measures a random init) and its summary fields.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from adpe_jax import data, flops, parallel
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.data import bad_images
from adpe_jax.train import loop, run
from adpe_jax.train import optimizer as optim
from adpe_jax.train.metrics import bad_image_metrics, device_peak_flops
from adpe_jax.train.state import build_model, create_train_state
from adpe_jax.train.step import make_adversary_gap, make_train_step


def run_metadata(config) -> dict:
  """What a checkpoint must agree on with the run that resumes it.

  `adversary.rpe_embedding` only matters for an RPE embedding adversary; elsewhere it is
  recorded as None, so changing the unused field does not refuse a checkpoint.
  """
  rpe_embedding = (config.adversary.rpe_embedding
                   if (config.model.pe, config.adversary.kind) == ("rpe", "embedding") else None)
  return {"model": {"variant": config.model.variant, "patch_size": config.model.patch_size,
                    "pe": config.model.pe,
                    "encoder_sees_mask_tokens": config.model.encoder_sees_mask_tokens},
          "adversary": {"kind": config.adversary.kind, "rpe_embedding": rpe_embedding},
          "image_size": config.image_size}


def step_flops(config, model) -> float:
  """Analytic FLOPs of one optimizer step (all `accum_steps` micro-batches; `flops`)."""
  return flops.train_step_flops(model, config.num_crops * config.batch_size,
                                config.adversary.inner_steps)


def build_training(config, mesh, total_steps: int, steps_per_epoch: float) -> dict:
  """Model, optimizer, the initial state (created already sharded) and the jitted step.

  The state is sharded by the FSDP rule (`parallel.state_shardings`: replicated when
  mesh.fsdp is 1) and created already sharded (eval_shape -> shardings -> jit(init,
  out_shardings)); the batch is split over (data, fsdp); the state is donated; the step
  RNG is fold_in(step_key, step) inside the step.
  """
  model = build_model(config)
  tx, adv_tx = optim.make_optimizers(config, total_steps, steps_per_epoch)
  lr_fn, adv_lr_fn = optim.schedules(config, total_steps, steps_per_epoch)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  repl = parallel.replicated(mesh)
  create = lambda k: create_train_state(model, tx, adv_tx, k)  # noqa: E731
  state_sharding = parallel.state_shardings(mesh, jax.eval_shape(create, init_key),
                                            config.mesh.fsdp_min_size)
  state = jax.jit(parallel.under_mesh(create, mesh), out_shardings=state_sharding)(init_key)
  train_step = jax.jit(
      parallel.under_mesh(make_train_step(
          model, tx, adv_tx, config.accum_steps, lr_fn, adv_lr_fn,
          inner_steps=config.adversary.inner_steps, adv_norm=config.adversary.norm,
          adv_eps=config.adversary.eps, inner_step_size=config.adversary.inner_step_size),
          mesh),
      in_shardings=(state_sharding, parallel.batch_sharding(mesh), repl),
      out_shardings=(state_sharding, repl),
      donate_argnums=(0,))
  return dict(model=model, tx=tx, adv_tx=adv_tx, lr_fn=lr_fn, adv_lr_fn=adv_lr_fn, state=state,
              state_sharding=state_sharding, train_step=train_step, step_key=step_key,
              init_key=init_key)


def _batch_spec(config, sharding):
  # uint8 crops (data.normalize_on_device) are normalised by the step's first op.
  n = config.num_crops * config.batch_size
  dtype = jnp.uint8 if config.data.normalize_on_device else jnp.float32
  return {"images": jax.ShapeDtypeStruct((n, config.image_size, config.image_size, 3),
                                         dtype, sharding=sharding),
          "ids": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding)}


def build(config, mesh, workdir, resuming: bool, source) -> run.Built:
  del resuming  # a resumed run restores over the initial state
  # 1. Input: this process's part of every global batch, a pure function of the step.
  total_steps, steps_per_epoch = loop.steps_from_epochs(config, len(source))
  pipeline = data.PretrainPipeline(
      source, config.batch_size, config.image_size, config.num_crops, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_shards=math.prod(mesh.shape[a] for a in parallel.BATCH_AXES),
      num_threads=config.data.num_threads or None,
      num_workers=data.resolve_num_workers(config.data.num_workers, jax.default_backend()),
      decoder=config.data.decoder, draft=config.data.draft,
      output="uint8" if config.data.normalize_on_device else "float32",
      bad_images=bad_images.Policy.from_config(config.data, source))

  # 2. Model, optimizer, shardings and the compiled step. -------------------------------
  setup = build_training(config, mesh, total_steps, steps_per_epoch)
  model, state, step_key = setup["model"], setup["state"], setup["step_key"]
  if jax.process_index() == 0:
    logging.info("mesh %s over %d processes\n%s", dict(mesh.shape), jax.process_count(),
                 parallel.sharding_overview(state, setup["state_sharding"]))
  batch_sharding = parallel.batch_sharding(mesh)
  t0 = time.time()
  lowered = setup["train_step"].lower(state, _batch_spec(config, batch_sharding), step_key)
  # MFU counts the analytic FLOPs: XLA's cost analysis counts the accumulation scan's
  # body once (a quarter of the work at accum_steps=4), see adpe_jax/flops.py.
  flops_per_step = step_flops(config, model)
  xla_flops = (lowered.cost_analysis() or {}).get("flops", 0.0)
  train_step = lowered.compile()
  compile_seconds = time.time() - t0
  logging.info("compiled the train step in %.1f s (%.3g GFLOP per step analytic; XLA's "
               "cost analysis: %.3g with the accumulation loop counted once)",
               compile_seconds, flops_per_step / 1e9, xla_flops / 1e9)
  adv_gap = (jax.jit(parallel.under_mesh(make_adversary_gap(model), mesh))
             if config.adversary.kind != "none" else None)

  # 3. The step, its log extras, what its evaluators read, its summary fields. ----------
  last = {}

  def step_fn(state, step, host_batch):
    del step
    if "sample" not in last:  # the reconstructions' crops: the first batch's 8 lowest ids
      sample = host_batch["images"][np.argsort(host_batch["ids"])[:8]]
      last["sample"] = data.normalize(sample) if sample.dtype == np.uint8 else sample
    last["batch"] = parallel.global_batch(host_batch, mesh)
    return train_step(state, last["batch"], step_key)

  def log_extras(state, done):
    extras = bad_image_metrics(pipeline)  # {"bad_images": n} under data.bad_images=skip
    if adv_gap is None:
      return extras
    return {**extras, "adv_loss_gap": float(adv_gap(state.params, state.adversary,
                                                    last["batch"],
                                                    jax.random.fold_in(step_key, done)))}

  def summary(result: loop.Result) -> dict:
    final_loss = (result.history[-1]["loss"] if result.history else
                  (loop.logged_records(workdir, "loss") or [{}])[-1].get("loss"))
    out = dict(compile_seconds=compile_seconds, step_flops=flops_per_step,
               final_loss=final_loss)
    if result.status == "finished" and config.eval.knn_source and (
        "knn" in config.eval.evaluators):
      # The evaluator's run at the last step (this process's or an earlier one's).
      final = [e for e in result.evals if "knn_top1" in e and e["step"] == result.end_step]
      out.update({k: final[-1][k] for k in KNN_SUMMARY if final and k in final[-1]})
    heldout = [e for e in result.evals if "heldout_loss" in e]
    if heldout:  # the newest (at the end of a finished run: its last step's)
      out.update({k: heldout[-1][k] for k in ("heldout_loss", "heldout_loss_adv",
                                              "heldout_gap_se") if k in heldout[-1]},
                 heldout_step=heldout[-1]["step"])
    return out

  return run.Built(
      state=state, step_fn=step_fn, batches=pipeline, total_steps=total_steps,
      steps_per_epoch=steps_per_epoch, summary=summary, log_extras=log_extras,
      flops_per_step=flops_per_step, peak_flops=device_peak_flops(),
      context=dict(model=model, step_key=step_key, init_key=setup["init_key"],
                   sample_images=lambda: last.get("sample")))


# summary.json's fields from the k-NN at the end (evaluate.KnnEvaluator with random_init)
KNN_SUMMARY = ("knn_top1", "knn_top1_random_init", "knn_seconds")


def training_source(config):
  """The data the task trains on (`run.Task.source`: the skeleton opens it once, compares
  its identity with the checkpoint's and hands it to `build`)."""
  return data.from_config(config, config.data.split)


TASK = run.Task("pretrain", pretrain_config.validate, build=build, source=training_source,
                run_metadata=run_metadata, evaluators=("knn", "reconstructions", "heldout",
                                                       "adversary_plot"))


def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrains in `workdir` (the same command resumes): {"state", "summary", "history",
  "evals"}."""
  return run.run_task(TASK, config, workdir)
