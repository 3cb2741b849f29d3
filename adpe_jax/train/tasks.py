"""`config.task` -> the task's entry `(config, workdir) -> result` (each a call of
`run.run_task` with the task module's `TASK`); `run` is what main calls."""

from __future__ import annotations

import os

import jax

from adpe_jax.config import validate
from adpe_jax.train import finetune, knn, linprobe, pretrain

ENTRIES = {
    "pretrain": pretrain.train_and_evaluate,   # configs/vit*.py, configs/demo.py
    "finetune": finetune.finetune,             # configs/finetune_*.py
    "linprobe": linprobe.linprobe,             # configs/linprobe_*.py
    "knn": knn.run_knn,                        # configs/knn.py
}


def enable_compilation_cache(config, workdir: str) -> str | None:
  """XLA's persistent compilation cache (config field compilation_cache): a re-run, a
  resumed run or another run of the same program loads the compiled step instead of
  compiling it again.  Returns the directory used (None = off)."""
  setting = str(config.get("compilation_cache", "auto"))
  if setting in ("none", ""):  # "" is refused at start (config.validate.values)
    return None
  if setting == "auto":
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # jax has read it already
      return os.environ["JAX_COMPILATION_CACHE_DIR"]
    setting = (workdir.rstrip("/") + "/jax_cache" if "://" in workdir
               else os.path.join(os.path.abspath(workdir), "jax_cache"))
  jax.config.update("jax_compilation_cache_dir", setting)
  return setting


def run(config, workdir: str):
  """The task of `config.task` ("pretrain" when the config has no such field)."""
  entry = ENTRIES[validate.task_of(config)]
  enable_compilation_cache(config, workdir)
  return entry(config, workdir)
