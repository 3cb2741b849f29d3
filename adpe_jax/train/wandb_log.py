"""Optional Weights & Biases logging (config field log.wandb), process 0 only.

wandb is imported only when log.wandb is true (config validation refuses the run at start
when the package is missing).  The run id is kept in WORKDIR/wandb_run_id, so a resumed run
(the same command again, a requeued job) continues the same wandb run
(`wandb.init(id=..., resume="allow")`).  wandb keeps the largest step it has seen: steps a
killed run logged after its last checkpoint are logged again by the resumed run and wandb
drops those repeats (metrics.jsonl keeps one record a step, see `metrics.trim_for_resume`).
log.wandb_mode "offline" writes the run under WORKDIR/wandb/ for a later `wandb sync`
(clusters without internet); the workdir of a gs:// run keeps the id, and wandb's own files
go to a local temporary directory.
"""

from __future__ import annotations

import json
import tempfile
import uuid

import numpy as np

from adpe_jax import storage

RUN_ID_FILE = "wandb_run_id"


class WandbLog:
  """`scalars(step, dict)`, `image(step, name, array)`, `close()`: the logged records of the
  run in a wandb run whose id the workdir keeps."""

  def __init__(self, config, workdir):
    import wandb  # noqa: PLC0415 (only when log.wandb is set)

    self.wandb = wandb
    workdir = storage.resolve(workdir)
    id_file = workdir / RUN_ID_FILE
    run_id = (storage.read_text(id_file) or "").strip() if id_file.exists() else ""
    if not run_id:
      run_id = uuid.uuid4().hex[:12]  # letters and digits, as wandb ids are
      storage.write_text(id_file, run_id + "\n")
    log = config.log
    local = tempfile.mkdtemp(prefix="adpe_wandb_") if storage.is_remote(workdir) \
        else str(workdir)
    self.run = wandb.init(
        project=log.wandb_project or None, entity=log.wandb_entity or None,
        name=log.wandb_name or workdir.name, id=run_id, resume="allow", dir=local,
        mode=log.wandb_mode, config=json.loads(config.to_json_best_effort()))
    self.run_id = run_id

  def scalars(self, step: int, values: dict) -> None:
    values = {k: v for k, v in values.items() if isinstance(v, (int, float, np.number))}
    if values:
      self.run.log(values, step=int(step))

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    self.run.log({name: self.wandb.Image(np.asarray(image))}, step=int(step))

  def close(self) -> None:
    self.run.finish()
