"""The one training loop of every task (pretrain, finetune, linprobe), and what a run
does the same way whatever its task: steps from epochs, the history of a resumed run,
summary.json.  The run around the loop (start, lock, checkpointer, restore) is
`run.run_task`.

A task supplies its state and its step, the config its evaluators; the loop knows none of
them by name:

  result = loop.train(config, workdir=..., ckpt=..., state=..., step_fn=..., batches=...,
                      total_steps=..., steps_per_epoch=..., evaluators=[...])

Per step: `step_fn(state, step, host_batch) -> (state, metrics)` (device scalars, a
"finite" flag among them), dispatched without a host sync.  Every `log_every_steps` (and
before any checkpoint, evaluation or stop) the metrics since the last fetch reach the host
once, are averaged and logged, and the per-step loss / finite flag of those steps come
with them (kept on the device meanwhile, so no extra sync): a non-finite step, or a loss
above `divergence_factor` times the run's first loss, stops the run (`DivergenceError`
naming that exact step and the last good checkpoint; summary.json says "non-finite" or
"diverged"), and these checks precede every save.
Evaluators run every `evaluator.every_steps` and at the last step; an end-of-run
evaluation that an earlier process of the run did not finish (a signal during it) runs
when the same command finds nothing left to train.  SIGTERM / preemption is agreed across
processes (`stop.AgreedStop`); `max_steps_per_run` ends a run early (status "stopped": the
same command continues).
"""

from __future__ import annotations

import dataclasses
import errno
import time
from typing import Any, Callable, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from adpe_jax import phase, storage
from adpe_jax.checkpoint import rundir
from adpe_jax.checkpoint.checkpointer import short_error
from adpe_jax.errors import CheckpointError, ConfigError, DivergenceError, RunFileError
from adpe_jax.train.metrics import CARRIED_COUNTS, MetricsLog, json_value, parse_records
from adpe_jax.train.stop import AgreedStop, PreemptedError, signal_name

# metrics of a step that are not averaged into the log record
_FLAGS = ("finite",)


class Evaluator(Protocol):
  """What the loop calls: `run(state, step) -> dict` every `every_steps` (0 = only at the
  end) and, if `at_end`, at the last step.  Scalars of the dict are logged (and kept as
  the run's evaluations); an (H, W, 3) array is written as an image.  `key` names the
  scalar that marks its records in metrics.jsonl (the history a resumed run reads back).
  The state passed is the task's train state; evaluators of frozen weights take its
  `.params` (or params themselves).  `name` names it in messages ("k-NN")."""
  every_steps: int
  at_end: bool
  key: str
  name: str

  def run(self, state, step: int) -> dict: ...


# -- steps, history, summary ------------------------------------------------------------------

def steps_from_epochs(config, num_examples: int) -> tuple[int, float]:
  """(total optimizer steps, steps per epoch): total_steps if > 0, else total_epochs of
  `num_examples // batch_size` steps (a ConfigError if the batch exceeds the data)."""
  steps_per_epoch = num_examples // config.batch_size
  if steps_per_epoch < 1:
    raise ConfigError(
        f"config field batch_size={config.batch_size} exceeds the {num_examples} examples of "
        f"data.source={config.data.source!r}.")
  total = (config.total_steps if config.total_steps > 0
           else int(config.total_epochs * steps_per_epoch))
  return total, float(steps_per_epoch)


def read_summary(workdir) -> dict:
  """summary.json of the run ({} when missing or unreadable): `rundir.read_summary`."""
  return rundir.read_summary(workdir)


def write_summary(workdir, summary: dict) -> None:
  """summary.json, written by process 0 (`rundir.write_summary`), and logged."""
  if jax.process_index() == 0:
    rundir.write_summary(workdir, summary)
  logging.info("summary: %s", summary)


def logged_records(workdir, key: str, upto: Optional[int] = None) -> list[dict]:
  """The metrics.jsonl records holding `key` (up to step `upto`), oldest first: a resumed
  run's evaluations, or its last logged loss.  Lines that are not records (cut by a kill,
  a non-UTF-8 byte) are skipped; a non-finite value reads back as None."""
  path = storage.resolve(workdir) / "metrics.jsonl"
  try:
    data = storage.read_bytes(path) if path.exists() else b""
  except OSError:
    return []
  return [r for r in parse_records(data)
          if key in r and (upto is None or (r.get("step") or 0) <= upto)]


def run_summary(result: "Result", total_steps: int, **extra) -> dict:
  """summary.json of a trained run: status, steps, timing, the task's `extra` fields and
  the best / last top-1 evaluation where the task has one; evaluation "interrupted" when a
  signal abandoned an end-of-run evaluation (re-running the same command does it)."""
  interrupted = {"evaluation": "interrupted"} if result.interrupted else {}
  return {"status": result.status, "steps": result.end_step, "total_steps": total_steps,
          "train_seconds": result.train_seconds, **extra, **best_and_last(result.evals),
          **interrupted}


def best_and_last(evals: list, key: str = "top1") -> dict:
  """best_* / last_* of the evaluation records holding `key` (top-1 and top-5), {} if none."""
  evals = [e for e in evals if key in e]
  if not evals:
    return {}
  best = max(evals, key=lambda r: r["top1"])
  last = evals[-1]
  return dict(best_top1=best["top1"], best_top5=best["top5"], best_step=best["step"],
              last_top1=last["top1"], last_top5=last["top5"], last_step=last["step"])


# -- the loop -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
  state: Any
  status: str             # finished | stopped (max_steps_per_run) | preempted
  start_step: int
  end_step: int
  train_seconds: float
  history: list           # the log records of this run
  evals: list             # evaluation records, those of earlier runs of the workdir first
  interrupted: str = ""   # "SIGTERM during the end-of-run k-NN": a signal abandoned it


def _due(evaluator, done: int, total_steps: int) -> bool:
  every = evaluator.every_steps
  return (every > 0 and done % every == 0) or (evaluator.at_end and done == total_steps)


def _not_done_at_end(evaluators, evals: list, total_steps: int) -> list:
  """The end-of-run evaluators with no record at the last step (an earlier process of the
  run was stopped during that evaluation); those without records (key "") are not known."""
  return [e for e in evaluators if e.at_end and e.key and not any(
      r.get("step") == total_steps and e.key in r for r in evals)]


def _write_result(log: MetricsLog, step: int, result: dict, epoch: float) -> dict:
  scalars = {k: v for k, v in result.items() if not isinstance(v, np.ndarray)}
  for name, image in result.items():
    if isinstance(image, np.ndarray):
      log.write_image(step, name, image)
  record = {}
  if scalars:
    record = {"step": step, "epoch": epoch, **scalars}
    log.write(record)
  return record


def first_loss(workdir, upto: int) -> Optional[float]:
  """The loss of the run's first step (of its initial weights), as its first log record
  holds it: the reference of the divergence stop, read back so a resume keeps it."""
  for record in logged_records(workdir, "first_loss", upto):
    if isinstance(record["first_loss"], (int, float)):
      return float(record["first_loss"])
  return None


def carried_counts(workdir, start_step: int) -> dict:
  """The `metrics.CARRIED_COUNTS` a resumed run starts from: each one's value in the newest
  record up to its restored step (the loop logs a record at every step it saves), {} for a
  fresh run.  Every process reads the same file, so all add the same numbers."""
  if start_step <= 0:
    return {}
  carried = {}
  for key in CARRIED_COUNTS:
    records = [r for r in logged_records(workdir, key, start_step)
               if isinstance(r[key], int) and not isinstance(r[key], bool)]
    if records:
      carried[key] = max(records, key=lambda r: r.get("step") or 0)[key]
  return carried


def first_bad_step(per_step, first_step: int, reference: Optional[float],
                   factor: float) -> Optional[tuple[int, float, str]]:
  """(step, loss, "non-finite" | "diverged") of the first bad step of a logged window.

  `per_step`: the (loss, finite flag) of steps first_step, first_step + 1, ...; a step is
  bad if its flag is 0 (a non-finite loss or gradient) or, with factor > 0, its loss
  exceeds factor * reference (NaN compares False: the flag catches it).
  """
  for i, (loss, finite) in enumerate(per_step):
    loss = float(loss)
    if not finite:
      return first_step + i, loss, "non-finite"
    if factor > 0 and reference is not None and loss > factor * reference:
      return first_step + i, loss, "diverged"
  return None


def _stop_message(kind: str, step: int, loss: float, reference: float, factor: float,
                  kept: str) -> str:
  if kind == "non-finite":
    # "at step N;" is parsed by users' scripts (and tests): keep the number alone there.
    return (f"non-finite loss or gradients at step {step}; stopping; the last good "
            f"checkpoint is kept at {kept}; start again with a lower learning rate (config "
            f"field blr) or look at the data of that step.")
  return (f"loss diverged at step {step}; stopping: its loss {loss:.4g} is more than config "
          f"field divergence_factor={factor:g} times the run's first loss {reference:.4g}; "
          f"the last good checkpoint is kept at {kept}; start again with a lower learning "
          f"rate (config field blr), or raise divergence_factor (0 disables this check).")


def train(config, *, workdir, ckpt, state, step_fn: Callable, batches, total_steps: int,
          steps_per_epoch: float, evaluators: Sequence[Evaluator] = (),
          log_extras: Optional[Callable] = None, flops_per_step: float = 0.0,
          peak_flops: Optional[float] = None, num_devices: int = 1) -> Result:
  """Runs steps int(state.step) .. min(total_steps, + max_steps_per_run).

  `batches`: the task's input pipeline (`iterate(start, count)`, `close()`), a pure
  function of the step.  `log_extras(state, step) -> dict`: task metrics added to each
  log record (e.g. the adversary's loss gap).  `flops_per_step` / `peak_flops`: TFLOP/s
  per device and MFU in the records.  The caller owns `ckpt` (restored already) and
  closes it.
  """
  start_step = int(state.step)
  log = MetricsLog(workdir, total_steps, start_step=start_step, config=config)
  stop_at = total_steps if config.max_steps_per_run <= 0 else min(
      total_steps, start_step + config.max_steps_per_run)
  keys = [e.key for e in evaluators]
  evals = [r for r in logged_records(workdir, "step", start_step)
           if any(k and k in r for k in keys)]
  history: list = []
  acc, acc_n = None, 0
  window: list = []  # (loss, finite) device scalars of each step since the last fetch
  factor = float(config.get("divergence_factor", 0.0))
  reference = first_loss(workdir, start_step)  # None: a fresh run, set from its step 1
  carried = carried_counts(workdir, start_step)  # counts of the run's earlier processes
  accumulate = jax.jit(lambda a, m: jax.tree.map(jnp.add, a, m))  # one dispatch per step
  t_last, step_last, t0 = time.time(), start_step, time.time()
  status, interrupted = "finished", ""
  stream = batches.iterate(start_step, stop_at - start_step)
  unwritten = None  # the OSError of a run file that could not be written (a full disk)
  failing = False
  # The signal guard covers the steps, the evaluations, the last save and the clean-up.
  with AgreedStop() as agreed:
    try:
      lost = agreed.requested_before_start()
      if lost is not None:
        # A stop requested before the loop whose exception was lost (inside orbax's
        # restore): the run ends before training, as that exception would have ended it.
        raise PreemptedError(lost)
      for step in range(start_step, stop_at):
        phase.enter("first step" if step == start_step else "training", step + 1)
        state, metrics = step_fn(state, step, next(stream))
        acc = metrics if acc is None else accumulate(acc, metrics)
        acc_n += 1
        window.append((metrics["loss"], metrics["finite"]))
        done = step + 1
        stop = agreed.should_stop(done)  # every host, every step: one agreed stop step
        try:
          log.tick(done)
        except OSError as e:  # (TensorBoard's flush) the log step below saves, then stops
          unwritten = e
        due_ckpt = config.checkpoint_every_steps > 0 and done % config.checkpoint_every_steps == 0
        due_eval = [e for e in evaluators if _due(e, done, total_steps)]
        if (done % config.log_every_steps == 0 or done == stop_at or due_ckpt or stop
            or due_eval or unwritten is not None):
          host, per_step = jax.device_get((acc, window))  # one transfer for the window
          now = time.time()
          rate = (done - step_last) / max(now - t_last, 1e-9)
          record = {"step": done}
          record.update({k: float(v) / acc_n for k, v in host.items() if k not in _FLAGS})
          record["img_per_s"] = rate * config.batch_size
          if flops_per_step:
            record["tflops_per_device"] = flops_per_step * rate / num_devices / 1e12
            if peak_flops:
              record["mfu"] = flops_per_step * rate / (num_devices * peak_flops)
          if reference is None:  # a fresh run: its step 1 (the initial weights) sets it
            reference = float(per_step[0][0])
            record["first_loss"] = reference
          bad = first_bad_step(per_step, step_last + 1, reference, factor)
          if log_extras is not None:
            extras = log_extras(state, done)
            record.update({k: v + carried.get(k, 0) if k in CARRIED_COUNTS else v
                           for k, v in extras.items()})
          try:
            log.write(record)
          except OSError as e:  # a full disk: the checks below, a save, then the sentence
            unwritten = e
          ckpt.check()  # a failed asynchronous save stops the run here, naming the cause
          if bad is not None:
            _stop(workdir, ckpt, bad, reference, factor, total_steps)
          history.append(record)
          logging.info("step %d loss %.4f lr %.3g %.1f img/s", done, record["loss"],
                       record.get("lr", float("nan")), record["img_per_s"])
          acc, acc_n, window, t_last, step_last = None, 0, [], now, done
          if unwritten is not None:
            _unwritable(ckpt, state, done, unwritten, workdir)
          ckpt.maybe_save(done, state)  # the checks above precede every save
        elif done % 4 == 0:
          # Bound the dispatch queue (on few CPU cores many queued collective steps can
          # time out); a cheap wait, no transfer to the host.
          jax.block_until_ready(state.step)
        if due_eval:  # (a signal of a training step is that step's stop, not an evaluation's)
          try:
            with agreed.evaluating():  # a signal abandons the evaluation at once
              phase.enter("evaluation", done)
              for evaluator in due_eval:
                _evaluate(log, evaluator, state, done, steps_per_epoch, evals)
          except PreemptedError as e:
            logging.warning("preemption: got %s during the evaluation at step %d; it is not "
                            "done (%s); saving and stopping", signal_name(e.signum), done,
                            "re-running the same command does it" if done == total_steps
                            else "the next evaluation is at its own step")
            agreed.stopped_by, stop = signal_name(e.signum), True
        if stop:
          status = "preempted"
          logging.warning("stop requested by %s at step %d: saving and exiting",
                          agreed.stopped_by, done)
          break
      end_step = int(state.step)
      ckpt.maybe_save(end_step, state, force=True)
      ckpt.wait()
      if status == "finished" and end_step == total_steps and not agreed.guard.requested:
        # The state is saved: a signal now abandons the evaluation, the run ends "preempted".
        interrupted = _evaluate_at_end(log, agreed, state, evals, evaluators, total_steps,
                                       steps_per_epoch)
        status = "preempted" if interrupted else status
    except BaseException:
      failing = True
      raise
    finally:
      stream.close()
      batches.close()
      ckpt.wait()  # a save started before an error still completes
      try:
        log.close()
      except OSError as e:  # (a last flush) never in place of the error that ended the run
        if not failing:
          raise
        logging.warning("could not close the run's logs: %s", e)
    if status == "finished" and agreed.guard.requested:
      status = "preempted"  # a signal after the last step: the run's end was not reached
  if status == "finished" and end_step < total_steps:
    status = "stopped"  # by max_steps_per_run: re-running the command continues
  return Result(state=state, status=status, start_step=start_step, end_step=end_step,
                train_seconds=time.time() - t0, history=history, evals=evals,
                interrupted=interrupted)


def _evaluate(log: MetricsLog, evaluator, state, step: int, steps_per_epoch: float,
              evals: list) -> None:
  """Runs `evaluator` on the state of `step`; its record is written, logged, added to
  `evals`."""
  record = _write_result(log, step, evaluator.run(state, step), step / steps_per_epoch)
  if record:
    evals.append(record)
    logging.info("step %d eval %s", step, {k: v for k, v in record.items()
                                           if k not in ("step", "epoch")})


def _evaluate_at_end(log: MetricsLog, agreed: AgreedStop, state, evals: list, evaluators,
                     total_steps: int, steps_per_epoch: float) -> str:
  """Runs the end-of-run evaluations not done yet (`_not_done_at_end`); their records join
  `evals`.  Returns "" or, when a signal abandoned one, "SIGTERM during the end-of-run
  NAME"."""
  missing = _not_done_at_end(evaluators, evals, total_steps)
  if not missing:
    return ""
  current = missing[0]
  try:
    with agreed.evaluating():
      for current in missing:
        _evaluate(log, current, state, total_steps, steps_per_epoch, evals)
  except PreemptedError as e:
    return f"{signal_name(e.signum)} during the end-of-run {current.name}"
  return ""


def _unwritable(ckpt, state, step: int, error: OSError, workdir):
  """A run file could not be written (`error`: a full disk, a quota): the state at `step`
  (checked: this is a log step) is saved where the checkpoint location has room, then
  `RunFileError` says which file, why, and what became of the state."""
  where = error.filename or f"a run file in {workdir} (metrics.jsonl, log.txt, events)"
  why = {errno.ENOSPC: "the device holding it is full (No space left on device)",
         errno.EDQUOT: "the disk quota there is used up"}.get(
             error.errno, error.strerror or str(error))
  try:
    if jax.process_count() > 1:  # only process 0 writes run files: its peers would not save
      last = rundir.newest_step(ckpt.directory)
      saved = (f"the state at step {step} is not saved (a save needs every process, and only "
               f"process 0 writes run files); the last complete checkpoint is "
               f"{ckpt.step_path(last) if last is not None else 'none yet'}")
    else:
      ckpt.maybe_save(step, state, force=True)  # (nothing when step is saved already)
      ckpt.wait()
      saved = f"the state at step {step} is saved in {ckpt.step_path(step)}"
  except CheckpointError as e:  # this save's, or that of an earlier step still in flight
    failed = getattr(e, "step", None) or step
    last = rundir.newest_step(ckpt.directory)
    kept = (f"the last complete checkpoint {ckpt.step_path(last)} is kept" if last is not None
            else "no complete checkpoint was saved yet")
    saved = (f"saving the state at step {failed} in {ckpt.step_path(failed)} failed as well "
             f"({short_error(e.__cause__ or e)}), so {kept}")
  raise RunFileError(f"writing {where} failed: {why}; {saved}; free space there (or give "
                     f"the run a workdir with room) and re-run the same command to "
                     f"resume.") from error


def _stop(workdir, ckpt, bad: tuple, reference: float, factor: float, total_steps: int):
  """The non-finite / divergence stop: summary.json says so, then DivergenceError."""
  step, loss, kind = bad
  ckpt.wait()  # a save in flight (of a step before the bad one) completes: it is good
  last = ckpt.latest_step()
  kept = str(ckpt.step_path(last)) if last else "(none: no checkpoint was saved yet)"
  write_summary(workdir, {"status": kind, "step": step, "loss": json_value(loss),
                          "first_loss": json_value(reference), "divergence_factor": factor,
                          "last_checkpoint_step": last, "total_steps": total_steps})
  raise DivergenceError(_stop_message(kind, step, loss, reference, factor, kept),
                         status=kind, step=step)


def already_finished(workdir, start_step: int, total_steps: int) -> Optional[dict]:
  """The kept summary of a finished run re-run with the same command (nothing to do)."""
  previous = read_summary(workdir)
  if start_step >= total_steps and previous.get("status") == "finished":
    logging.info("run in %s already finished at step %d; summary.json kept", workdir,
                 start_step)
    return previous
  return None
