"""The pretraining loop: `train_and_evaluate(config, workdir)`.

Reads top to bottom in numbered phases: (1) config and mesh, (2) input, (3) model and
optimizer, (4) shardings and the compiled step, (5) checkpoint / resume, (6) the loop,
(7) the end-of-run summary.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from adpe_jax import defaults, parallel
from adpe_jax.train import optimizer as optim
from adpe_jax.train.state import TrainState, build_model, create_train_state
from adpe_jax.train.step import make_train_step


def total_and_epoch_steps(config, num_examples: int) -> tuple[int, float]:
  steps_per_epoch = num_examples // config.batch_size
  if steps_per_epoch < 1:
    raise defaults.ConfigError(
        f"config field batch_size={config.batch_size} exceeds the {num_examples} examples of "
        f"data.source={config.data.source!r}.")
  total = config.total_steps if config.total_steps > 0 else int(config.total_epochs * steps_per_epoch)
  return total, float(steps_per_epoch)


def make_source(config, split=None):
  from adpe_jax import data  # noqa: PLC0415 (keeps the model path free of data deps)
  options = {}
  if config.data.source.startswith("synthetic"):
    options = dict(num_examples=config.data.num_examples or 1024, seed=config.seed)
  return data.get_source(config.data.source, split or config.data.split,
                         config.data.dir or None, **options)


def _to_python(tree) -> dict:
  return {k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist() for k, v in tree.items()}


class MetricsLog:
  """metrics.jsonl: one JSON object per logged step (appended: resumed runs continue it)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, record: dict) -> None:
    if jax.process_index() != 0:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def build_training(config, mesh, total_steps: int, steps_per_epoch: float) -> dict:
  """Model, optimizer, the initial state (created already sharded) and the jitted step.

  The state is replicated, the batch split over `data`, the state donated; the step RNG
  is fold_in(step_key, step) inside the step.
  """
  model = build_model(config)
  tx = optim.make_optimizer(config, total_steps, steps_per_epoch)
  lr_fn, adv_lr_fn = optim.schedules(config, total_steps, steps_per_epoch)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  repl = parallel.replicated(mesh)
  create = lambda k: create_train_state(model, tx, k)  # noqa: E731
  state_sharding = jax.tree.map(lambda _: repl, jax.eval_shape(create, init_key))
  state = jax.jit(create, out_shardings=state_sharding)(init_key)
  train_step = jax.jit(
      make_train_step(model, tx, config.accum_steps, lr_fn, adv_lr_fn,
                      inner_steps=config.adversary.inner_steps, adv_norm=config.adversary.norm,
                      adv_eps=config.adversary.eps,
                      inner_step_size=config.adversary.inner_step_size),
      in_shardings=(state_sharding, parallel.batch_sharding(mesh), repl),
      out_shardings=(state_sharding, repl),
      donate_argnums=(0,))
  return dict(model=model, tx=tx, lr_fn=lr_fn, adv_lr_fn=adv_lr_fn, state=state,
              state_sharding=state_sharding, train_step=train_step, step_key=step_key)


def train_and_evaluate(config, workdir: str) -> dict:
  # 1. Config and mesh. ----------------------------------------------------------------
  parallel.maybe_initialize_distributed()
  mesh = parallel.make_mesh()
  defaults.validate(config, num_devices=mesh.size)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # 2. Input: this process's part of every global batch, a pure function of the step.
  from adpe_jax import data  # noqa: PLC0415
  source = make_source(config)
  total_steps, steps_per_epoch = total_and_epoch_steps(config, len(source))
  pipeline = data.PretrainPipeline(
      source, config.batch_size, config.image_size, config.num_crops, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data.num_threads or None)

  # 3-4. Model, optimizer, shardings and the compiled step. -----------------------------
  setup = build_training(config, mesh, total_steps, steps_per_epoch)
  state, train_step, step_key = setup["state"], setup["train_step"], setup["step_key"]
  batch_sharding = parallel.batch_sharding(mesh)

  # 5. Checkpoint / resume (adpe_jax.checkpoint; seam kept here). -----------------------
  start_step = int(state.step)

  # 6. The loop: metrics reach the host only every log_every_steps. ---------------------
  log = MetricsLog(workdir)
  logging.info("training %d steps (%.1f per epoch) on %d devices from step %d",
               total_steps, steps_per_epoch, mesh.size, start_step)
  t_compile = time.time()
  lowered = train_step.lower(state, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((config.num_crops * config.batch_size,) + x.shape[1:],
                                     x.dtype, sharding=batch_sharding),
      {"images": np.zeros((1, config.image_size, config.image_size, 3), np.float32)}), step_key)
  compiled = lowered.compile()
  compile_seconds = time.time() - t_compile
  logging.info("compiled the train step in %.1f s", compile_seconds)

  history = []
  acc, acc_n = None, 0
  t_last, step_last = time.time(), start_step
  t_train = time.time()
  batches = pipeline.iterate(start_step, total_steps - start_step)
  try:
    for step in range(start_step, total_steps):
      batch = parallel.global_batch(next(batches), mesh)
      state, metrics = compiled(state, batch, step_key)
      acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
      acc_n += 1
      done = step + 1
      if done % config.log_every_steps == 0 or done == total_steps:
        host = jax.device_get(acc)
        now = time.time()
        record = {"step": done}
        record.update({k: (float(v) / acc_n if k != "finite" else bool(v == acc_n))
                       for k, v in host.items()})
        record["img_per_s"] = (done - step_last) * config.batch_size / max(now - t_last, 1e-9)
        log.write(record)
        history.append(record)
        logging.info("step %d loss %.4f lr %.3g %.1f img/s", done, record["loss"],
                     record.get("lr", float("nan")), record["img_per_s"])
        if not record["finite"]:
          raise FloatingPointError(
              f"non-finite loss or gradients at step {done}; stopping (see metrics.jsonl).")
        acc, acc_n, t_last, step_last = None, 0, now, done
      elif done % 4 == 0:
        # Bound the dispatch queue (on few CPU cores many queued collective steps can
        # time out); a cheap wait, no transfer to the host.
        jax.block_until_ready(state.step)
  finally:
    batches.close()
    pipeline.close()
  jax.block_until_ready(state)
  train_seconds = time.time() - t_train

  # 7. Summary. -------------------------------------------------------------------------
  summary = {"steps": total_steps, "train_seconds": train_seconds,
             "compile_seconds": compile_seconds,
             "final_loss": history[-1]["loss"] if history else None}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return {"state": state, "history": history, "summary": summary}
