"""What every entry (pretrain, finetune, linprobe, knn) does the same way."""

from __future__ import annotations

import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from absl import logging

from adpe_jax import checkpoint as ckpt_lib
from adpe_jax import parallel, storage
from adpe_jax.train.metrics import MetricsLog


def start_run(config, workdir, validate: Optional[Callable] = None):
  """Join the processes, build the (data, fsdp) mesh, validate the config against it, make
  the workdir (an epath.Path: local and absolute, or gs://...) and write config.json from
  process 0.  Returns (mesh, workdir)."""
  parallel.initialize_distributed(config)
  mesh = parallel.mesh_from_config(config)
  if validate is not None:
    validate(config, num_devices=mesh.size)
  workdir = storage.makedirs(storage.resolve(workdir))
  if jax.process_index() == 0:
    storage.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
  return mesh, workdir


def eval_summary(evals: list) -> dict:
  """best_* / last_* top-1, top-5 and step of a run's evaluation records ({} if none)."""
  if not evals:
    return {}
  best = max(evals, key=lambda r: r["top1"])
  last = evals[-1]
  return dict(best_top1=best["top1"], best_top5=best["top5"], best_step=best["step"],
              last_top1=last["top1"], last_top5=last["top5"], last_step=last["step"])


def supervised_loop(config, *, workdir, state, pipeline, ckpt, train_step: Callable,
                    evaluate: Callable, evals: list, start_step: int, total_steps: int,
                    steps_per_epoch: int, eval_every: int):
  """The training loop of the supervised entries (fine-tune, linear probe).

  Runs steps start_step .. min(total_steps, start_step + max_steps_per_run) with
  `train_step(state, step, host_batch) -> (state, metrics)` (metrics: device scalars,
  "finite" among them, averaged over the steps since the last log line) and
  `evaluate(state) -> dict` every `eval_every` steps and at the end (appended to `evals`);
  logs, checkpoints, and stops on SIGTERM / preemption agreed across processes
  (`checkpoint.AgreedStop`) or, raising FloatingPointError that names the steps and the
  last good checkpoint, on non-finite metrics.  Returns (state, status, end_step,
  train_seconds); status is "finished", "stopped" (max_steps_per_run) or "preempted".
  """
  log = MetricsLog(workdir, total_steps)
  stop_at = total_steps if config.max_steps_per_run <= 0 else min(
      total_steps, start_step + config.max_steps_per_run)
  acc, acc_n, t_last, step_last, t0 = None, 0, time.time(), start_step, time.time()
  status, end_step = "finished", start_step
  accumulate = jax.jit(lambda a, m: jax.tree.map(jnp.add, a, m))
  batches = pipeline.iterate(start_step, stop_at - start_step)
  try:
    with ckpt_lib.AgreedStop() as agreed:
      for step in range(start_step, stop_at):
        state, metrics = train_step(state, step, next(batches))
        acc = metrics if acc is None else accumulate(acc, metrics)
        acc_n += 1
        done = step + 1
        stop = agreed.should_stop(done)
        log.tick(done)
        due_ckpt = config.checkpoint_every_steps > 0 and done % config.checkpoint_every_steps == 0
        due_eval = done % eval_every == 0 or done == total_steps
        if done % config.log_every_steps == 0 or done == stop_at or due_ckpt or stop or due_eval:
          h = jax.device_get(acc)
          now = time.time()
          record = {"step": done, **{k: float(v) / acc_n for k, v in h.items() if k != "finite"}}
          record["img_per_s"] = (done - step_last) * config.batch_size / max(now - t_last, 1e-9)
          log.write(record)
          if h["finite"] != acc_n:
            ckpt.wait()
            last = ckpt.latest_step()
            raise FloatingPointError(
                f"non-finite loss or gradients between steps {step_last + 1} and {done}; "
                f"stopping; the last good checkpoint is kept at "
                f"{ckpt.step_path(last) if last else '(none)'}.")
          logging.info("step %d loss %.4f lr %.3g", done, record["loss"], record["lr"])
          acc, acc_n, t_last, step_last = None, 0, now, done
        if due_eval:
          result = {"step": done, "epoch": done / steps_per_epoch, **evaluate(state)}
          log.write(result)
          evals.append(result)
          logging.info("step %d eval top-1 %.4f top-5 %.4f", done, result["top1"], result["top5"])
        ckpt.maybe_save(done, state)
        end_step = done
        if stop:
          status = "preempted"
          break
      end_step = int(state.step)
      ckpt.maybe_save(end_step, state, force=True)
      ckpt.wait()
  finally:
    batches.close()
    pipeline.close()
    ckpt.wait()
  log.close()
  if status == "finished" and end_step < total_steps:
    status = "stopped"
  return state, status, end_step, time.time() - t0
