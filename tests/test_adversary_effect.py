"""benchmarks/adversary_effect.py: the locality metrics on hand-built attention, the
attention probabilities the model sows against plain numpy, and the script on two tiny
pretraining runs against their own held-out evaluator."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.models.vit import ATTENTION, Attention
from adpe_jax.train.pretrain import train_and_evaluate
from test_rpe import ref_bucket_ids, ref_continuous_table

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _script():
  spec = importlib.util.spec_from_file_location(
      "adversary_effect", ROOT / "benchmarks" / "adversary_effect.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


effect = _script()
GRID = 7
T = 1 + GRID * GRID


def _row(weights: dict) -> np.ndarray:
  """One attention row over the T tokens from {token index: weight} (cls = 0, patch
  (r, c) = 1 + 7 r + c), normalised."""
  row = np.zeros(T)
  for j, w in weights.items():
    row[j] = w
  return row / row.sum()


def _patch(r: int, c: int) -> int:
  return 1 + GRID * r + c


def test_locality_metrics_on_hand_built_attention():
  centre = (3, 3)
  nbrs = [(3 + dr, 3 + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]
  probs = np.full((T, T), 1.0 / T)            # every row uniform over all 50 tokens
  i = _patch(*centre)
  probs[i] = _row({_patch(*n): 1.0 for n in nbrs})           # uniform over the 8 neighbours
  j = _patch(0, 0)
  probs[j] = _row({0: 3.0, _patch(0, 0): 1.0, _patch(6, 6): 1.0})  # cls, self and far corner
  k = _patch(6, 0)
  probs[k] = _row({0: 1.0, _patch(5, 0): 1.0, _patch(5, 1): 1.0})  # cls and two neighbours
  m = effect.attention_metrics(probs, GRID)
  nbr, dist = m["nbr"], m["dist"]
  assert nbr.shape == dist.shape == (GRID * GRID,)
  # Uniform over the 8 neighbours: all of the mass off the query's own patch.
  assert nbr[i - 1] == pytest.approx(1.0)
  assert dist[i - 1] == pytest.approx((4 * 1 + 4 * math.sqrt(2)) / 8)
  # Uniform over all tokens: 8 of the 48 other patches for an interior query, 5 on an
  # edge, 3 in a corner; distance: the mean distance to all 49 patch centres.
  assert nbr[_patch(2, 4) - 1] == pytest.approx(8 / 48)
  assert nbr[_patch(0, 3) - 1] == pytest.approx(5 / 48)
  assert nbr[_patch(6, 6) - 1] == pytest.approx(3 / 48)
  far = [math.hypot(2 - r, 4 - c) for r in range(7) for c in range(7)]
  assert dist[_patch(2, 4) - 1] == pytest.approx(sum(far) / 49)
  # cls dropped and self excluded: (0, 0) puts its other-patch mass on (6, 6) only.
  assert nbr[j - 1] == pytest.approx(0.0)
  assert dist[j - 1] == pytest.approx(0.5 * math.hypot(6, 6))   # half on self at 0
  # cls dropped, renormalised: the two neighbours carry it all.
  assert nbr[k - 1] == pytest.approx(1.0)
  assert dist[k - 1] == pytest.approx((1 + math.sqrt(2)) / 2)
  # Chance level over the whole 7x7 grid: 25 interior, 20 edge, 4 corner patches.
  ref = effect.uniform_reference(GRID)
  assert ref["nbr"] == pytest.approx((25 * 8 + 20 * 5 + 4 * 3) / (49 * 48))
  # Visible / masked split: the accumulator averages each group's own queries.
  acc = effect.Accumulator()
  mask = np.zeros((1, 49), bool)
  mask[0, i - 1] = True
  acc.add(0, probs[None, None], mask, GRID)
  got = acc.result()["layers"][0]
  assert got["nbr_masked"] == pytest.approx(1.0)
  assert got["nbr_visible"] == pytest.approx((nbr.sum() - 1.0) / 48)


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("impl,lookup,adversary", [
    ("xla", "continuous", "coordinate"),   # the AdPE RPE-coordinate layer, shift applied
    ("xla", "integer", "none"),            # the MAE+ RPE layer
    ("pallas", "continuous", "coordinate"),  # the (B, T, H, hd) path (interpreted on CPU)
])
def test_sown_attention_probs_equal_numpy(impl, lookup, adversary):
  """One attention layer of the `test` variant (D 32, 4 heads, 7x7 grid): the sown
  probabilities equal numpy softmax(q k^T / sqrt(hd) + iRPE bias) from the same params
  (the bias from tests/test_rpe.py's plain-Python tables), the output equals numpy's
  probs @ v through the projection, and asking for the probabilities leaves the output
  bit for bit as it is without (no collection appears then)."""
  d, h, b = 32, 4, 2
  hd = d // h
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, T, d)).astype(np.float32)
  mask = np.zeros((b, T), bool)
  mask[:, 1:] = rng.random((b, T - 1)) < 0.7
  mod = Attention(h, rpe=dict(grid=GRID, lookup=lookup, adversary=adversary),
                  attention_impl=impl)
  variables = mod.init(jax.random.key(1), jnp.asarray(x), jnp.asarray(mask))
  params = jax.tree.map(np.asarray, variables["params"])
  params["qkv"]["kernel"] = (rng.standard_normal((d, 3 * d)) * 0.3).astype(np.float32)
  params["qkv"]["bias"] = (rng.standard_normal(3 * d) * 0.1).astype(np.float32)
  table = rng.standard_normal((hd, 50)).astype(np.float32)
  params["rpe_k"]["lookup_table"] = table
  shift = np.array([0.37, -0.61], np.float32)
  var = {"params": params}
  if adversary != "none":
    var["adversary"] = {"rpe_k": {"adv_shift": shift}}

  out_plain = mod.apply(var, jnp.asarray(x), jnp.asarray(mask))
  assert not isinstance(out_plain, tuple)
  out, state = mod.apply(var, jnp.asarray(x), jnp.asarray(mask), mutable=[ATTENTION])
  (probs,) = state[ATTENTION]["probs"]
  np.testing.assert_array_equal(np.asarray(out), np.asarray(out_plain))

  x64 = x.astype(np.float64)
  qkv = x64 @ params["qkv"]["kernel"].astype(np.float64) + params["qkv"]["bias"]
  q, k, v = (qkv[..., s * d:(s + 1) * d].reshape(b, T, h, hd).transpose(0, 2, 1, 3)
             for s in range(3))
  qs = q / math.sqrt(hd)
  t64 = table.astype(np.float64)
  if lookup == "integer":
    r0 = rs = t64[:, ref_bucket_ids(GRID)]
  else:
    r0 = ref_continuous_table(t64, GRID, (0.0, 0.0))
    rs = ref_continuous_table(t64, GRID, shift.astype(np.float64)) if adversary != "none" else r0
  bias = np.where(mask[:, None, :, None], np.einsum("bhid,dij->bhij", qs, rs),
                  np.einsum("bhid,dij->bhij", qs, r0))
  want = _softmax(np.einsum("bhid,bhjd->bhij", qs, k) + bias)
  assert probs.shape == (b, h, T, T)
  np.testing.assert_allclose(np.asarray(probs), want, rtol=2e-5, atol=2e-6)
  heads = np.einsum("bhij,bhjd->bihd", want, v).reshape(b, T, d)
  want_out = heads @ params["proj"]["kernel"].astype(np.float64) + params["proj"]["bias"]
  np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-4, atol=1e-5)


def _pretrain(workdir: pathlib.Path, adversary: str, pe: str = "rpe") -> None:
  c = pretrain_config.apply_smoke(pretrain_config.base_config())
  c.model.pe = pe
  c.adversary.kind, c.adversary.norm, c.adversary.eps = adversary, "l2", 1.0
  c.adversary.lr = 0.5                       # a shift that shows in two steps
  c.data.source, c.data.num_examples = "synthetic", 64
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 2, 1, 2
  c.batch_size, c.accum_steps = 4, 1
  c.eval.knn_source, c.eval.recon_every_steps = "", 0
  c.eval.heldout_split, c.eval.heldout_examples, c.eval.heldout_every_steps = "test", 64, 0
  train_and_evaluate(c, str(workdir))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  """A study directory as benchmarks/adpe_vs_maeplus.py lays it out: its three arms, one
  tiny run each."""
  out = tmp_path_factory.mktemp("study")
  _pretrain(out / "mae_plus_rpe" / "seed0" / "pretrain", "none")
  _pretrain(out / "adpe_rpe_coord" / "seed0" / "pretrain", "coordinate")
  _pretrain(out / "adpe_ape_coord" / "seed0" / "pretrain", "coordinate", pe="ape")
  return out


def test_script_on_tiny_runs_matches_their_heldout_evaluator(study, capsys):
  """The loss the script measures (64 held-out images, masks from seed 0 = config.seed)
  equals what each run's own `heldout` evaluator logged at its end, adversary off and on:
  the same params, adversary, images and masks were read back."""
  assert effect.main([str(study), "--smoke", "--mask-seed", "0"]) == 0
  md = (study / "adversary_effect.md").read_text()
  assert md.strip() in capsys.readouterr().out
  assert "| neighbour mass, masked queries |" in md
  assert "adpe_rpe_coord − mae_plus_rpe" in md and "adpe_rpe_coord: adversary on − off" in md
  got = json.loads((study / "adversary_effect.json").read_text())
  runs = {r["arm"]: r for r in got["runs"]}
  assert set(runs) == {"mae_plus_rpe", "adpe_rpe_coord", "adpe_ape_coord"}
  for arm, r in runs.items():
    summary = json.loads((study / arm / "seed0" / "pretrain" / "summary.json").read_text())
    assert r["step"] == 2 and r["examples"] == 64
    np.testing.assert_allclose(r["off"]["loss"], summary["heldout_loss"], rtol=1e-5)
    if r["adv"] is not None:
      np.testing.assert_allclose(r["adv"]["loss"], summary["heldout_loss_adv"], rtol=1e-5)
    assert len(r["off"]["layers"]) == 2    # the test variant's encoder depth
    for row in r["off"]["layers"]:
      assert 0 <= row["nbr_masked"] <= 1 and 0 <= row["nbr_visible"] <= 1
      assert 0 < row["dist_all"] < math.hypot(6, 6)
  adpe = runs["adpe_rpe_coord"]
  assert runs["mae_plus_rpe"]["adv"] is None and adpe["adv"] is not None
  # The APE shift moves the masked tokens' sin-cos input at once (the iRPE tables start at
  # zero, so the RPE shift barely shows after two steps): read back, it shows in the loss.
  ape = runs["adpe_ape_coord"]
  assert abs(ape["adv"]["loss"] - ape["off"]["loss"]) > 1e-4 * ape["off"]["loss"]
  assert ape["adv_norm"] and all(v > 0 for v in ape["adv_norm"].values())
  diff = got["paired"]["adpe_rpe_coord"]["metrics"]["nbr_masked"]["minus_baseline"]
  want = adpe["off"]["mean"]["nbr_masked"] - runs["mae_plus_rpe"]["off"]["mean"]["nbr_masked"]
  assert diff == [pytest.approx(want)]
