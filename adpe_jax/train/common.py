"""What every entry (pretrain, finetune, linprobe, knn) does the same way."""

from __future__ import annotations

from typing import Callable, Optional

import jax

from adpe_jax import parallel, storage


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
