"""The pretraining loop: `train_and_evaluate(config, workdir)`.

Reads top to bottom in numbered phases: (1) config and mesh, (2) input, (3) model,
optimizer and the compiled step, (4) checkpoint / resume, (5) the loop, (6) the end of
the run: final checkpoint, k-NN, reconstructions and summary.json.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import logging

from adpe_jax import checkpoint as ckpt_lib
from adpe_jax import defaults, flops, parallel, storage
from adpe_jax.train import optimizer as optim
from adpe_jax.train.common import start_run
from adpe_jax.train.metrics import MetricsLog, device_peak_flops
from adpe_jax.train.state import build_model, create_train_state, init_params
from adpe_jax.train.step import make_adversary_gap, make_train_step


def total_and_epoch_steps(config, num_examples: int) -> tuple[int, float]:
  steps_per_epoch = num_examples // config.batch_size
  if steps_per_epoch < 1:
    raise defaults.ConfigError(
        f"config field batch_size={config.batch_size} exceeds the {num_examples} examples of "
        f"data.source={config.data.source!r}.")
  total = config.total_steps if config.total_steps > 0 else int(config.total_epochs * steps_per_epoch)
  return total, float(steps_per_epoch)


def make_source(config, split=None, source=None):
  from adpe_jax import data  # noqa: PLC0415 (keeps the model path free of data deps)
  name = source or config.data.source
  options = {}
  if name.startswith("synthetic"):
    options = dict(num_examples=config.data.num_examples or 1024, seed=config.seed)
  # data.dir belongs to data.source; another source (eval.knn_source) uses its default.
  data_dir = (config.data.dir or None) if name == config.data.source else None
  return data.get_source(name, split or config.data.split, data_dir, **options)


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
  state = jax.jit(create, out_shardings=state_sharding)(init_key)
  train_step = jax.jit(
      make_train_step(model, tx, adv_tx, config.accum_steps, lr_fn, adv_lr_fn,
                      inner_steps=config.adversary.inner_steps, adv_norm=config.adversary.norm,
                      adv_eps=config.adversary.eps,
                      inner_step_size=config.adversary.inner_step_size),
      in_shardings=(state_sharding, parallel.batch_sharding(mesh), repl),
      out_shardings=(state_sharding, repl),
      donate_argnums=(0,))
  return dict(model=model, tx=tx, adv_tx=adv_tx, lr_fn=lr_fn, adv_lr_fn=adv_lr_fn, state=state,
              state_sharding=state_sharding, train_step=train_step, step_key=step_key,
              init_key=init_key)


def _batch_spec(config, sharding):
  n = config.num_crops * config.batch_size
  return {"images": jax.ShapeDtypeStruct((n, config.image_size, config.image_size, 3),
                                         jnp.float32, sharding=sharding),
          "ids": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding)}


def _read_summary(workdir) -> dict:
  try:
    out = json.loads(storage.read_text(workdir / "summary.json") or "{}")
    return out if isinstance(out, dict) else {}
  except (OSError, ValueError):
    return {}


def _last_logged_loss(workdir):
  """The loss of the newest metrics.jsonl record (a resumed run that had nothing to do)."""
  last = None
  try:
    for line in (storage.read_text(workdir / "metrics.jsonl") or "").splitlines():
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and "loss" in record:
        last = record["loss"]
  except OSError:
    pass
  return last


class KnnEvaluator:
  """k-NN top-1 (cosine, k = eval.knn_k) of frozen encoder features on a labelled set."""

  def __init__(self, config, model, mesh):
    from adpe_jax import data  # noqa: PLC0415
    name = config.eval.knn_source
    self.train = data.labelled_arrays(make_source(config, "train", name), config.image_size,
                                      config.eval.knn_train_examples)
    self.test = data.labelled_arrays(make_source(config, "test", name), config.image_size,
                                     config.eval.knn_test_examples)
    self.model, self.mesh, self.k = model, mesh, config.eval.knn_k

  def __call__(self, params) -> float:
    from adpe_jax.train import evaluate  # noqa: PLC0415 (the evaluators' one interface)
    metric = evaluate.KnnMetric(*self.train, *self.test, k=self.k,
                                batch_size=64 * self.mesh.size, mesh=self.mesh)
    return metric(evaluate.mae_encoder(self.model, params))["knn_top1"]


def write_reconstructions(config, model, state, images, key, workdir, log, step):
  from adpe_jax.train import reconstruction  # noqa: PLC0415
  pred, mask = reconstruction.reconstruct(model, state.params, images, key,
                                          adversary=state.adversary)
  grid = reconstruction.reconstruction_grid(images, pred, mask, config.model.patch_size)
  if jax.process_index() == 0:
    zoom = max(1, 112 // config.image_size)  # small crops (28 px) enlarged for the eye
    reconstruction.save_png(grid.repeat(zoom, 0).repeat(zoom, 1),
                            storage.resolve(workdir) / "reconstructions.png")
  log.write_image(step, "reconstructions", grid)


def train_and_evaluate(config, workdir: str) -> dict:
  # 1. Config and mesh. ----------------------------------------------------------------
  mesh, workdir = start_run(config, workdir, defaults.validate)

  # 2. Input: this process's part of every global batch, a pure function of the step.
  from adpe_jax import data  # noqa: PLC0415
  source = make_source(config)
  total_steps, steps_per_epoch = total_and_epoch_steps(config, len(source))
  pipeline = data.PretrainPipeline(
      source, config.batch_size, config.image_size, config.num_crops, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data.num_threads or None)

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
  peak = device_peak_flops()
  knn_eval = KnnEvaluator(config, model, mesh) if config.eval.knn_source else None
  adv_gap = None
  if config.adversary.kind != "none":
    adv_gap = jax.jit(make_adversary_gap(model))

  # 4. Checkpoint / resume: the same command with the same workdir continues the run.
  ckpt = ckpt_lib.Checkpointer(workdir, config.checkpoint_every_steps,
                               config.keep_checkpoints, metadata=run_metadata(config))
  restored = ckpt.restore(ckpt_lib.abstract_of(state))
  if restored is not None:
    state = restored
  start_step = int(state.step)
  previous = _read_summary(workdir)
  if start_step >= total_steps and previous.get("status") == "finished":
    # Re-running a finished run changes nothing (no repeated k-NN, summary kept).
    logging.info("run in %s already finished at step %d; summary.json kept", workdir,
                 start_step)
    ckpt.close()
    pipeline.close()
    return {"state": state, "history": [], "summary": previous}
  logging.info("training %d steps (%.1f per epoch) on %d devices from step %d",
               total_steps, steps_per_epoch, mesh.size, start_step)

  # 5. The loop: metrics reach the host only every log_every_steps. ---------------------
  log = MetricsLog(workdir, total_steps)
  stop_at = total_steps
  if config.max_steps_per_run > 0:
    stop_at = min(total_steps, start_step + config.max_steps_per_run)
  history, acc, acc_n = [], None, 0
  accumulate = jax.jit(lambda a, m: jax.tree.map(jnp.add, a, m))  # one dispatch per step
  t_last, step_last, t_train = time.time(), start_step, time.time()
  recon_images = None
  status = "finished"
  batches = pipeline.iterate(start_step, stop_at - start_step)
  try:
    with ckpt_lib.AgreedStop() as agreed:
      for step in range(start_step, stop_at):
        host_batch = next(batches)
        if recon_images is None:
          recon_images = host_batch["images"][:8]
        batch = parallel.global_batch(host_batch, mesh)
        state, metrics = train_step(state, batch, step_key)
        acc = metrics if acc is None else accumulate(acc, metrics)
        acc_n += 1
        done = step + 1
        stop = agreed.should_stop(done)  # every host, every step: one agreed stop step
        log.tick(done)
        due_ckpt = config.checkpoint_every_steps > 0 and done % config.checkpoint_every_steps == 0
        if done % config.log_every_steps == 0 or done == stop_at or due_ckpt or stop:
          host = jax.device_get(acc)
          now = time.time()
          record = {"step": done}
          record.update({k: float(v) / acc_n for k, v in host.items() if k != "finite"})
          record["img_per_s"] = (done - step_last) * config.batch_size / max(now - t_last, 1e-9)
          steps_per_s = (done - step_last) / max(now - t_last, 1e-9)
          record["tflops_per_device"] = flops_per_step * steps_per_s / mesh.size / 1e12
          if peak:
            record["mfu"] = flops_per_step * steps_per_s / (mesh.size * peak)
          if adv_gap is not None:
            record["adv_loss_gap"] = float(adv_gap(state.params, state.adversary, batch,
                                                   jax.random.fold_in(step_key, done)))
          if host["finite"] != acc_n:
            log.write(record)
            ckpt.wait()
            where = (f"at step {done}" if done == step_last + 1
                     else f"between steps {step_last + 1} and {done}")
            last = ckpt.latest_step()
            raise FloatingPointError(
                f"non-finite loss or gradients {where}; stopping; the last good checkpoint "
                f"is kept at {ckpt.step_path(last) if last else '(none)'}.")
          log.write(record)
          history.append(record)
          logging.info("step %d loss %.4f lr %.3g %.1f img/s", done, record["loss"],
                       record.get("lr", float("nan")), record["img_per_s"])
          acc, acc_n, t_last, step_last = None, 0, now, done
          ckpt.maybe_save(done, state)  # the finiteness check above precedes every save
        elif done % 4 == 0:
          # Bound the dispatch queue (on few CPU cores many queued collective steps can
          # time out); a cheap wait, no transfer to the host.
          jax.block_until_ready(state.step)
        if (knn_eval is not None and config.eval.knn_every_steps
            and done % config.eval.knn_every_steps == 0 and done != total_steps):
          log.write({"step": done, "knn_top1": knn_eval(state.params)})
        if config.eval.recon_every_steps and done % config.eval.recon_every_steps == 0:
          write_reconstructions(config, model, state, recon_images, step_key, workdir,
                                log, done)
        if stop:
          status = "preempted"
          logging.warning("stop requested by %s at step %d: saving and exiting",
                          agreed.stopped_by, done)
          break
      end_step = int(state.step)
      ckpt.maybe_save(end_step, state, force=True)
      ckpt.wait()
  finally:
    batches.close()
    pipeline.close()
    ckpt.wait()  # a save started before an error still completes
  train_seconds = time.time() - t_train

  # 6. End of run: k-NN, reconstructions, summary. ---------------------------------------
  if status == "finished" and end_step < total_steps:
    status = "stopped"  # by max_steps_per_run: re-running the command continues
  summary = {"status": status, "steps": end_step, "total_steps": total_steps,
             "train_seconds": train_seconds, "compile_seconds": compile_seconds,
             "step_flops": flops_per_step,
             "final_loss": history[-1]["loss"] if history else _last_logged_loss(workdir)}
  if status == "finished":
    if recon_images is not None:
      write_reconstructions(config, model, state, recon_images, step_key, workdir,
                            log, end_step)
    if knn_eval is not None:
      t0 = time.time()
      summary["knn_top1"] = knn_eval(state.params)
      summary["knn_top1_random_init"] = knn_eval(
          jax.jit(lambda k: init_params(model, k))(setup["init_key"]))
      summary["knn_seconds"] = time.time() - t0
      log.write({"step": end_step, **{k: summary[k] for k in ("knn_top1", "knn_top1_random_init")}})
  log.close()
  ckpt.close()
  if jax.process_index() == 0:
    storage.write_text(workdir / "summary.json", json.dumps(summary, indent=2))
  logging.info("summary: %s", summary)
  return {"state": state, "history": history, "summary": summary}
