"""The pretraining task: `train_and_evaluate(config, workdir)`.

Reads top to bottom in numbered phases: (1) config and mesh, (2) input, (3) model,
optimizer and the compiled step, (4) checkpoint / resume, (5) its evaluators (k-NN,
reconstructions) and the one loop (`loop.train`), (6) summary.json (with the k-NN of a
random init beside the final one).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from adpe_jax import checkpoint as ckpt_lib
from adpe_jax import data, flops, parallel, storage, workdir_lock
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.data import bad_images
from adpe_jax.train import evaluate, loop, reconstruction, stop
from adpe_jax.train import optimizer as optim
from adpe_jax.train.metrics import bad_image_metrics, device_peak_flops
from adpe_jax.train.state import build_model, create_train_state, init_params
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


class Reconstructions:
  """The reconstruction grid of the first batch's first 8 crops (an evaluator: every
  eval.recon_every_steps and at the end), also saved as WORKDIR/reconstructions.png."""
  key = ""

  def __init__(self, config, model, step_key, workdir, every_steps: int):
    self.config, self.model, self.rng, self.workdir = config, model, step_key, workdir
    self.every_steps, self.at_end = every_steps, True
    self.images = None        # set from the first host batch

  def run(self, state, step: int) -> dict:
    del step
    if self.images is None:
      return {}
    pred, mask = reconstruction.reconstruct(self.model, state.params, self.images, self.rng,
                                            adversary=state.adversary)
    grid = reconstruction.reconstruction_grid(
        self.images, pred, mask, self.config.model.patch_size,
        norm_pix=self.config.model.get("norm_pix_loss", True))
    if jax.process_index() == 0:
      zoom = max(1, 112 // self.config.image_size)  # small crops (28 px) enlarged for the eye
      reconstruction.save_png(grid.repeat(zoom, 0).repeat(zoom, 1),
                              storage.resolve(self.workdir) / "reconstructions.png")
    return {"reconstructions": np.asarray(grid)}


@workdir_lock.released_at_end
def train_and_evaluate(config, workdir: str) -> dict:
  # 1. Config and mesh. ----------------------------------------------------------------
  mesh, workdir = loop.start_run(config, workdir, pretrain_config.validate, run_metadata)

  # 2. Input: this process's part of every global batch, a pure function of the step.
  source = data.from_config(config, config.data.split)
  total_steps, steps_per_epoch = loop.steps_from_epochs(config, len(source))
  pipeline = data.PretrainPipeline(
      source, config.batch_size, config.image_size, config.num_crops, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data.num_threads or None,
      num_workers=data.resolve_num_workers(config.data.num_workers, jax.default_backend()),
      decoder=config.data.decoder, draft=config.data.draft,
      output="uint8" if config.data.normalize_on_device else "float32",
      bad_images=bad_images.Policy.from_config(config.data, source))

  # 3. Model, optimizer, shardings and the compiled step. -------------------------------
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

  # 4. Checkpoint / resume: the same command with the same workdir continues the run.
  ckpt = ckpt_lib.Checkpointer(workdir, config.checkpoint_every_steps,
                               config.keep_checkpoints, metadata=run_metadata(config))
  restored = ckpt.restore(ckpt_lib.abstract_of(state))
  if restored is not None:
    state = restored
  start_step = int(state.step)
  kept = loop.already_finished(workdir, start_step, total_steps)
  if kept is not None:  # re-running a finished run changes nothing
    ckpt.close()
    pipeline.close()
    return {"state": state, "history": [], "summary": kept}
  logging.info("training %d steps (%.1f per epoch) on %d devices from step %d",
               total_steps, steps_per_epoch, mesh.size, start_step)

  # 5. Evaluators and the loop. ---------------------------------------------------------
  evaluators = []
  knn = None
  if config.eval.knn_source:
    knn = evaluate.KnnEvaluator.from_pretrain_config(config, model, mesh)
    evaluators.append(knn)
  recon = Reconstructions(config, model, step_key, workdir, config.eval.recon_every_steps)
  evaluators.append(recon)
  last = {}

  def step_fn(state, step, host_batch):
    del step
    if recon.images is None:
      recon.images = data.normalize(host_batch["images"][:8]) if (
          host_batch["images"].dtype == np.uint8) else host_batch["images"][:8]
    last["batch"] = parallel.global_batch(host_batch, mesh)
    return train_step(state, last["batch"], step_key)

  def log_extras(state, done):
    extras = bad_image_metrics(pipeline)  # {"bad_images": n} under data.bad_images=skip
    if adv_gap is None:
      return extras
    return {**extras, "adv_loss_gap": float(adv_gap(state.params, state.adversary,
                                                    last["batch"],
                                                    jax.random.fold_in(step_key, done)))}

  result = loop.train(config, workdir=workdir, ckpt=ckpt, state=state, step_fn=step_fn,
                      batches=pipeline, total_steps=total_steps,
                      steps_per_epoch=steps_per_epoch, evaluators=evaluators,
                      log_extras=log_extras, flops_per_step=flops_per_step,
                      peak_flops=device_peak_flops(), num_devices=mesh.size)
  ckpt.close()

  # 6. Summary. ---------------------------------------------------------------------------
  final_loss = (result.history[-1]["loss"] if result.history else
                (loop.logged_records(workdir, "loss") or [{}])[-1].get("loss"))
  summary = loop.run_summary(result, total_steps, compile_seconds=compile_seconds,
                             step_flops=flops_per_step, final_loss=final_loss)
  if result.status == "finished" and knn is not None:
    try:  # the state is saved: a signal now abandons the k-NN and ends the run "preempted"
      with stop.interruptible():
        logging.info("end-of-run k-NN (%d train / %d test examples)", knn.train.n, knn.test.n)
        final = [e for e in result.evals if "knn_top1" in e and e["step"] == result.end_step]
        # (none only when the last step ran in an earlier process that ended before its
        # summary, or was preempted during its evaluation)
        summary["knn_top1"] = (final[-1]["knn_top1"] if final
                               else knn.run(result.state)["knn_top1"])
        seconds = knn.seconds
        summary["knn_top1_random_init"] = knn.run(
            jax.jit(lambda k: init_params(model, k))(setup["init_key"]))["knn_top1"]
        summary["knn_seconds"] = seconds + knn.seconds  # the final and the random-init k-NN
    except stop.PreemptedError as e:
      summary.update(status="preempted", evaluation="interrupted")
      logging.warning("preemption: got %s during the end-of-run k-NN; the run is trained and "
                      "saved at step %d; summary.json says preempted; re-running the same "
                      "command does the k-NN", stop.signal_name(e.signum), result.end_step)
  loop.write_summary(workdir, summary)
  return {"state": result.state, "history": result.history, "summary": summary}
