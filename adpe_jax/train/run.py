"""The run of every task, written once: `run_task(task, config, workdir)`.

A task module supplies only what is its own, as a `Task`: its config validation, its run
metadata, and `build` (input, model, state, compiled step, its summary fields, what its
evaluators read).  The run reads top to bottom in numbered phases, as big_vision's
train.py:

  1. start: join the processes, one config for all, the mesh, the task's validation;
  2. the refusals before the lock (values, the workdir made and writable);
  3. `with` the workdir's one-writer lock: the saved run compared with this command, the
     training data opened (`task.source`) and its identity compared with the one the
     checkpoint records;
  4. the task's pieces (`task.build`, given that source: its refusals of the data's size
     and of config.init, the compile), `with` the Checkpointer (which records the data's
     identity in every checkpoint): restore or the built init, nothing to do for a
     finished run, then config.json, the evaluators named by config.eval.evaluators
     (`evaluate.from_config`), the one loop (`loop.train`);
  5. summary.json: `loop.run_summary` and the task's fields.

A task that trains nothing (knn) supplies `measure` instead of `build`: phase 4 is that
one call, under the same start, refusals, lock and summary.  (Not in train/tasks.py: each
task module builds its `Task` with this module and calls `run_task` from its public entry,
and tasks.py imports the task modules.)

A start refused (or failed) before config.json is written leaves the workdir as it found
it (`_undone_unless_trained`): what this start created there -- the lock file, an empty
checkpoints/, a new workdir -- is removed, and nothing an earlier run wrote is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import jax
from absl import logging

from adpe_jax import checkpoint as ckpt_lib
from adpe_jax import parallel, phase, workdir_lock
from adpe_jax.checkpoint import rundir
from adpe_jax.config import validate as check
from adpe_jax.data import identity as data_identity
from adpe_jax.train import evaluate, loop, preflight, stop


@dataclasses.dataclass
class Built:
  """What a training task builds for its run (`Task.build`)."""
  state: Any                  # the initial state (a checkpoint restores into its shardings)
  step_fn: Callable           # (state, step, host_batch) -> (state, metrics)
  batches: Any                # the input pipeline: iterate(start, count), close()
  total_steps: int
  steps_per_epoch: float
  context: dict = dataclasses.field(default_factory=dict)  # what its evaluators read
  summary: Callable = lambda result: {}  # (loop.Result) -> its fields of summary.json
  log_extras: Optional[Callable] = None  # (state, step) -> metrics added to each log record
  flops_per_step: float = 0.0            # analytic: TFLOP/s and MFU in the log
  peak_flops: Optional[float] = None
  outputs: dict = dataclasses.field(default_factory=dict)  # returned beside the state
  note: str = ""                         # added to the log line that starts the loop


@dataclasses.dataclass(frozen=True)
class Task:
  """A task's own pieces; `run_task` sequences the run.  Exactly one of `build` (a
  training task) and `measure` (no training: the k-NN task).  `source` opens the data a
  training task trains on: the skeleton compares its identity with the checkpoint's
  (`preflight.check_saved_data`) and hands it to `build` (None without `source`)."""
  name: str                                        # config.task
  validate: Callable                               # (config, num_devices) -> None
  build: Optional[Callable] = None     # (config, mesh, workdir, resuming, source) -> Built
  measure: Optional[Callable] = None               # (config, mesh) -> summary dict
  source: Optional[Callable] = None                # (config) -> the training data (a Source)
  run_metadata: Optional[Callable] = None          # (config) -> what a checkpoint must match
  upgrade: Optional[Callable] = None               # saved run metadata -> today's names
  evaluators: tuple = ()                           # the evaluate.EVALUATORS its context serves


def start(task: Task, config, workdir):
  """Join the processes, agree on one config, build the (data, fsdp) mesh, validate the
  config against it (and eval.evaluators against the task).  Returns the mesh."""
  parallel.initialize_distributed(config)
  parallel.agree_on_config(config, workdir)  # several processes: one config, before compiling
  mesh = parallel.mesh_from_config(config)
  task.validate(config, num_devices=mesh.size)
  check.evaluators(config, task.evaluators)
  return mesh


def write_config(path, config) -> None:
  """config.json (process 0): written once every refusal has passed (after the build and
  the restore, before the loop), so it is the config of the workdir's checkpoints."""
  if jax.process_index() == 0:
    rundir.write_config(path, config)


@contextlib.contextmanager
def _undone_unless_trained(before):
  """On an exception before `trained()` is called (a refusal: config.init, the data's
  size, an unbuilt or damaged source; a failed build or compile; SIGTERM / SIGINT / SIGHUP
  while starting, `stop.PreemptedError`), process 0 removes what this start created in the
  workdir: the lock file (held: a contender re-opens the path, `workdir_lock._same_file`),
  an empty checkpoints/, and the workdir itself if it is new and then empty.  Files of an
  earlier run, and anything once the loop may have written, stay."""
  state = {"trained": False}
  try:
    yield lambda: state.update(trained=True)
  except (Exception, stop.PreemptedError, KeyboardInterrupt):
    if not state["trained"] and jax.process_index() == 0:
      rundir.undo_start(before)
    raise


def run_task(task: Task, config, workdir) -> dict:
  """The run of `task` in `workdir`: {"state", "summary", "history", "evals", ...the task's
  outputs} (the k-NN task: its summary)."""
  # 1. Processes, mesh, validation. ------------------------------------------------------------
  mesh = start(task, config, workdir)

  # 2. Refusals before the lock: nothing is written before every refusal has passed. ---------
  before = rundir.before_start(workdir)
  path = preflight.prepare_workdir(config, workdir)

  # 3. The one-writer lock (before the saved run is read), the saved run, the data. -----------
  #    Until config.json, a refusal leaves the workdir as it was (`_undone_unless_trained`).
  with workdir_lock.acquire(path, config), _undone_unless_trained(before) as trained:
    resuming = preflight.check_saved_run(config, path, workdir, task.run_metadata, task.upgrade)
    source = task.source(config) if task.source is not None else None
    data = None if source is None else data_identity.of(source)
    if resuming and data is not None:
      preflight.check_saved_data(config, path, workdir, data)
    if task.measure is not None:  # no training: measure, then config.json and summary.json
      summary = task.measure(config, mesh)
      write_config(path, config)
      loop.write_summary(path, summary)
      return summary

    # 4. The task's pieces, the checkpoint (restore or init), the evaluators and the loop. ---
    phase.enter("compile")  # (memory exhausted from here on names its phase)
    built = task.build(config, mesh, path, resuming, source)
    try:
      with ckpt_lib.Checkpointer(
          path, config.checkpoint_every_steps, config.keep_checkpoints,
          metadata=task.run_metadata(config) if task.run_metadata else None,
          upgrade=task.upgrade, data=data) as ckpt:
        phase.enter("restore")
        restored = ckpt.restore(ckpt_lib.abstract_of(built.state))
        state = built.state if restored is None else restored
        kept = loop.already_finished(path, int(state.step), built.total_steps)
        if kept is not None:  # re-running a finished run changes nothing
          return {"state": state, "summary": kept, "history": [], "evals": [],
                  **built.outputs}
        write_config(path, config)
        trained()  # from here on the loop writes: nothing is undone
        logging.info("%s: %d steps (%.1f per epoch) on %d devices from step %d%s", task.name,
                     built.total_steps, built.steps_per_epoch, mesh.size, int(state.step),
                     f", {built.note}" if built.note else "")
        context = dict(built.context, mesh=mesh, workdir=path, total_steps=built.total_steps,
                       steps_per_epoch=built.steps_per_epoch)
        result = loop.train(config, workdir=path, ckpt=ckpt, state=state,
                            step_fn=built.step_fn, batches=built.batches,
                            total_steps=built.total_steps,
                            steps_per_epoch=built.steps_per_epoch,
                            evaluators=evaluate.from_config(config, context),
                            log_extras=built.log_extras, flops_per_step=built.flops_per_step,
                            peak_flops=built.peak_flops, num_devices=mesh.size)
    finally:
      built.batches.close()  # (the loop closes it too; a refusal or a finished run does not)

    # 5. Summary. --------------------------------------------------------------------------------
    summary = loop.run_summary(result, built.total_steps, **built.summary(result))
    if result.interrupted:
      logging.warning("preemption: got %s; the run is trained and saved at step %d; "
                      "summary.json says preempted; re-running the same command does it",
                      result.interrupted, result.end_step)
    loop.write_summary(path, summary)
  return {"state": result.state, "summary": summary, "history": result.history,
          "evals": result.evals, **built.outputs}
