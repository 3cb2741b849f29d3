"""The k-NN task (`config.task = "knn"`, configs/knn.py): k-NN top-1 of config.init's
frozen encoder on data.source, train split -> test split; summary.json, no training (`TASK`
has `measure`, run by `run.run_task` under the same start, refusals, lock and summary)."""

from __future__ import annotations

import time

from adpe_jax import data
from adpe_jax.config import probe as probe_config
from adpe_jax.train import evaluate, run


def measure(config, mesh) -> dict:
  """The k-NN of config.init's encoder: its summary.json."""
  t0 = time.time()
  encoder, info, c = evaluate.load_encoder(config)

  def images(split: str, max_examples: int):
    return evaluate.LabelledImages(data.eval_source(config, split), c.image_size,
                                   max_examples, crop_fraction=config.crop_fraction)

  temperature = config.temperature if config.temperature > 0 else None
  knn = evaluate.KnnEvaluator(
      lambda params: evaluate.FrozenEncoder(encoder.fn, params),
      images(config.data.train_split, config.data.train_examples),
      images(config.data.test_split, config.data.test_examples),
      k=config.k, temperature=temperature, batch_size=config.batch_size, mesh=mesh)
  result = knn.run(encoder.params)
  train_n, test_n = knn.train.n, knn.test.n
  return {**result, "k": config.k, "temperature": temperature,
          "source": config.data.source, "train_examples": int(train_n),
          "test_examples": int(test_n), "seconds": time.time() - t0, **info}


TASK = run.Task("knn", probe_config.validate_knn, measure=measure)


def run_knn(config, workdir: str) -> dict:
  """The k-NN task in `workdir`: its summary."""
  return run.run_task(TASK, config, workdir)
