"""The held-out reconstruction loss (evaluator "heldout", eval.heldout_split)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from adpe_jax import data, parallel
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.models.mae import patchify
from adpe_jax.train import evaluate
from adpe_jax.train.pretrain import train_and_evaluate
from adpe_jax.train.state import build_model, init_variables


def _config():
  c = pretrain_config.apply_smoke(pretrain_config.base_config())
  c.model.pe, c.adversary.kind, c.adversary.norm = "ape", "coordinate", "l2"
  c.data.source, c.data.num_examples = "synthetic", 64
  return c


def test_heldout_loss_is_the_masked_patch_mse_of_fixed_masks():
  """Against a numpy computation from the model's own prediction and mask on the same
  images and noise (one pass over all images, not chunked), with the adversary at zero and
  as given (a shift that changes the loss)."""
  c = _config()
  model = build_model(c)
  variables = init_variables(model, jax.random.key(0))
  params, adversary = variables["params"], variables["adversary"]
  adversary = jax.tree.map(lambda a: jnp.full_like(a, 0.7), adversary)
  mesh = parallel.make_mesh()
  source = data.get_source("synthetic", "test", num_examples=20, seed=3)
  ev = evaluate.HeldoutLoss(model, source, c.image_size, examples=12, every_steps=0, mesh=mesh,
                            seed=5, chunk=4)
  assert ev.n == 12

  class State:
    pass
  state = State()
  state.params, state.adversary = params, adversary
  got = ev.run(state, 1)

  # The 12 examples spread over the 20 (i * 20 // 12: 0, 1, 3, 5, 6, 8, ...).
  picked = data.Subset(source, [i * 20 // 12 for i in range(12)])
  images, _ = data.labelled_arrays(picked, c.image_size, 12)
  noise = np.asarray(jax.random.uniform(jax.random.key(5), (12, model.num_patches)))
  chunk_losses = {}
  for adv, key in ((jax.tree.map(jnp.zeros_like, adversary), "heldout_loss"),
                   (adversary, "heldout_loss_adv")):
    _, pred, mask = model.apply({"params": params, "adversary": adv}, images, noise=noise,
                                rngs={"masking": jax.random.key(9)})
    t = np.asarray(patchify(images, c.model.patch_size), np.float64)
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True, ddof=1) + 1e-6)
    m = np.asarray(mask, np.float64)
    per_patch = ((np.asarray(pred, np.float64) - t) ** 2).mean(-1) * m
    expect = per_patch.sum() / m.sum()
    np.testing.assert_allclose(got[key], expect, rtol=2e-5)
    chunk_losses[key] = per_patch.reshape(3, 4, -1).sum((1, 2)) / m.reshape(3, 4, -1).sum((1, 2))
  assert abs(got["heldout_loss_adv"] - got["heldout_loss"]) > 1e-4  # the shift matters
  # The gap's noise level: the standard error over the 3 chunks of each chunk's gap.
  gaps = chunk_losses["heldout_loss_adv"] - chunk_losses["heldout_loss"]
  np.testing.assert_allclose(got["heldout_gap_se"], gaps.std(ddof=1) / np.sqrt(3), rtol=2e-2)
  assert ev.run(state, 2) == got  # fixed images and masks: the same weights, the same number


def test_a_run_logs_the_heldout_loss_and_keeps_it_in_the_summary(tmp_path):
  c = _config()
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 4, 2, 4
  c.eval.knn_source = ""
  c.eval.heldout_split, c.eval.heldout_examples, c.eval.heldout_every_steps = "test", 8, 2
  out = train_and_evaluate(c, str(tmp_path))
  records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  held = [r for r in records if "heldout_loss" in r]
  assert [r["step"] for r in held] == [2, 4]
  assert all(np.isfinite(r["heldout_loss"]) and np.isfinite(r["heldout_loss_adv"]) for r in held)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["heldout_loss"] == held[-1]["heldout_loss"] == out["summary"]["heldout_loss"]
  assert summary["heldout_loss_adv"] == held[-1]["heldout_loss_adv"]
  # (8 images: one chunk, no noise level to tell; test above: several chunks)
  assert "heldout_gap_se" not in summary and "heldout_gap_se" not in held[-1]
  assert summary["heldout_step"] == 4
  # The adversary's picture beside the reconstructions (evaluator "adversary_plot").
  from PIL import Image
  with Image.open(tmp_path / "adversary.png") as im:
    assert im.format == "PNG" and im.size[0] >= 720 and im.size[1] > 480
