"""Fine-tuning (spec 6): the pieces pinned to the original, and the CLI end to end."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adpe_jax import convert
from adpe_jax.data import finetune as ft_data
from adpe_jax import layout
from adpe_jax.models import posembed
from adpe_jax.models.classifier import ViTClassifier
from adpe_jax.train.state import build_classifier, init_classifier_params
from adpe_jax.train import optimizer as optim
from adpe_jax.train import mixup
from devices import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


# -- position table resize: torch's bicubic, written out independently ------------------------

def _torch_bicubic_reference(grid: np.ndarray, out: int, a: float = -0.75) -> np.ndarray:
  """F.interpolate(mode='bicubic', align_corners=False) of a (G, G, D) grid, pixel by pixel:
  source x = (dst + 0.5) * in / out - 0.5, taps floor(x) - 1 .. floor(x) + 2 clamped to the
  border, Keys weights with A = -0.75 (aten upsample_bicubic2d)."""
  g = grid.shape[0]

  def w(t):  # the four tap weights for fractional offset t
    def near(x):
      return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
      return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return [far(t + 1), near(t), near(1 - t), far(2 - t)]

  res = np.zeros((out, out, grid.shape[2]))
  s = g / out
  for oy in range(out):
    y = (oy + 0.5) * s - 0.5
    y0 = math.floor(y)
    wy = w(y - y0)
    for ox in range(out):
      x = (ox + 0.5) * s - 0.5
      x0 = math.floor(x)
      wx = w(x - x0)
      acc = 0.0
      for i in range(4):
        for j in range(4):
          yy = min(max(y0 - 1 + i, 0), g - 1)
          xx = min(max(x0 - 1 + j, 0), g - 1)
          acc = acc + wy[i] * wx[j] * grid[yy, xx]
      res[oy, ox] = acc
  return res


@pytest.mark.parametrize("old,new", [(7, 14), (14, 7), (7, 7), (4, 9)])
def test_resize_table_is_torch_bicubic(old, new):
  table = posembed.sincos_table(old, 16)
  got = posembed.resize_table(table, new)
  want = _torch_bicubic_reference(table[1:].reshape(old, old, 16), new)
  np.testing.assert_array_equal(got[0], table[0])  # cls row kept
  np.testing.assert_allclose(got[1:].reshape(new, new, 16), want, rtol=0, atol=1e-12)
  try:
    import torch
  except ImportError:
    return
  t = torch.from_numpy(table[1:].reshape(1, old, old, 16)).permute(0, 3, 1, 2)
  t = torch.nn.functional.interpolate(t, size=(new, new), mode="bicubic", align_corners=False)
  np.testing.assert_allclose(got[1:], t.permute(0, 2, 3, 1).reshape(-1, 16).numpy(), atol=1e-12)


# -- layer-wise lr decay: the original's optimizer/lr_decay.py::param_groups_lrd ---------------

def _param_groups_lrd(named_shapes: dict, weight_decay: float, no_weight_decay_list,
                      layer_decay: float, depth: int) -> dict:
  """The original's function on {torch name: shape}: name -> (lr_scale, weight_decay)."""
  num_layers = depth + 1
  layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]

  def get_layer_id_for_vit(name):
    if name in ["cls_token", "pos_embed"]:
      return 0
    if name.startswith("patch_embed"):
      return 0
    if name.startswith("blocks"):
      return int(name.split(".")[1]) + 1
    return num_layers

  out = {}
  for n, shape in named_shapes.items():
    this_decay = 0.0 if (len(shape) == 1 or n in no_weight_decay_list) else weight_decay
    out[n] = (layer_scales[get_layer_id_for_vit(n)], this_decay)
  return out


def test_layer_decay_groups_match_param_groups_lrd():
  model = ViTClassifier(num_classes=10, image_size=28, patch_size=4, embed_dim=32, depth=3,
                        num_heads=4, pe="rpe", drop_path=0.1)
  params = jax.eval_shape(lambda: init_classifier_params(model, jax.random.key(0)))
  scales = optim.lr_scales(params, 3, 0.65)
  decay = optim.classifier_decay_mask(params)
  from flax import traverse_util
  named, ours = {}, {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    name, arr = convert.tensor_to_torch(path, np.zeros(leaf.shape, np.float32))
    named[name] = arr.shape     # torch shapes (conv 4-D, rpe table (1, hd, 50))
    ours[name] = (traverse_util.flatten_dict(scales)[path],
                  0.05 if traverse_util.flatten_dict(decay)[path] else 0.0)
  want = _param_groups_lrd(named, 0.05, {"pos_embed", "cls_token"}, 0.65, 3)
  assert set(want) == set(ours)
  for n in want:
    assert ours[n][0] == pytest.approx(want[n][0], rel=1e-12), n
    assert ours[n][1] == want[n][1], n
  # The spots the spec names: RPE tables decayed at their block's rate, head at 1.
  assert ours["blocks.1.attn.rpe_k.lookup_table_weight"] == (pytest.approx(0.65 ** 2), 0.05)
  assert ours["head.weight"][0] == 1.0 and ours["pos_embed"] == (pytest.approx(0.65 ** 4), 0.0)


def test_schedule_is_set_at_the_first_micro_step():
  """lr(step s) = the original's adjust_learning_rate at t = s * accum / len(loader)."""
  class C:
    blr, batch_size, min_lr, warmup_epochs = 1e-3, 4096, 1e-6, 5.0
  total, spe = 1000, 20.0
  lr = optim.finetune_schedule(C, total, spe)
  peak = 1e-3 * 4096 / 256
  for s in (0, 7, 100, 101, 500, 999):
    epoch = s / spe
    if epoch < 5:
      want = peak * epoch / 5
    else:
      want = 1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * (epoch - 5) / (total / spe - 5)))
    assert float(lr(s)) == pytest.approx(want, rel=1e-5, abs=1e-9)


# -- Mixup / CutMix / label smoothing targets ---------------------------------------------------

def test_mixup_cutmix_targets_by_hand():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
  y = np.array([0, 1, 2, 3, 4, 5])
  k, s = 7, 0.1
  off, on = s / k, 1 - s + s / k
  one_hot = np.full((6, k), off)
  one_hot[np.arange(6), y] = on
  mix_jit = jax.jit(mixup.mix_batch, static_argnums=(5, 6))

  # Mixup: lam x + (1 - lam) x.flip(0); targets likewise.
  xm, tm = mix_jit(x, y, 0.3, False, np.zeros(4, np.int32), k, s)
  np.testing.assert_allclose(xm, 0.3 * x + 0.7 * x[::-1], atol=1e-6)
  np.testing.assert_allclose(tm, 0.3 * one_hot + 0.7 * one_hot[::-1], atol=1e-6)

  # CutMix: the box comes from the flipped batch; lam is the box-corrected one.
  params = None
  for step in range(50):  # find a step whose micro-batch 0 draws CutMix with a real box
    p = ft_data.mixup_params(0, step, 1, 8, 0.8, 1.0)
    if p["cutmix"][0] and p["lam"][0] < 1:
      params = p
      break
  assert params is not None
  yl, yh, xl, xh = params["box"][0]
  assert params["lam"][0] == pytest.approx(1 - (yh - yl) * (xh - xl) / 64)
  want = x.copy()
  want[:, yl:yh, xl:xh] = x[::-1][:, yl:yh, xl:xh]
  xc, tc = mix_jit(x, y, params["lam"][0], True, params["box"][0], k, s)
  np.testing.assert_array_equal(np.asarray(xc), want)
  lam = params["lam"][0]
  np.testing.assert_allclose(tc, lam * one_hot + (1 - lam) * one_hot[::-1], atol=1e-6)

  # No mixing: label smoothing alone; the soft CE is LabelSmoothingCrossEntropy(0.1).
  xn, tn = mix_jit(x, y, 1.0, False, np.zeros(4, np.int32), k, s)
  np.testing.assert_array_equal(np.asarray(xn), x)
  np.testing.assert_allclose(tn, one_hot, atol=1e-7)
  logits = rng.normal(size=(6, k)).astype(np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ls_ce = (1 - s) * -logp[np.arange(6), y] + s * -logp.mean(-1)
  np.testing.assert_allclose(mixup.soft_cross_entropy(jnp.asarray(logits), tn), ls_ce, rtol=1e-5)


def test_mixup_params_switch_and_beta():
  """About half the batches are CutMix (switch 0.5); all are mixed (prob 1)."""
  p = [ft_data.mixup_params(3, s, 2, 28, 0.8, 1.0) for s in range(200)]
  cut = np.concatenate([q["cutmix"] for q in p])
  lam = np.concatenate([q["lam"] for q in p])
  assert 0.4 < cut.mean() < 0.6
  assert ((lam > 0) & (lam <= 1)).all() and (lam < 1).mean() > 0.9
  off = ft_data.mixup_params(3, 0, 2, 28, 0.0, 0.0)
  assert (off["lam"] == 1).all() and not off["cutmix"].any()


def test_random_erasing_and_randaugment_deterministic():
  img = np.zeros((28, 28, 3), np.float32)
  erased = [ft_data.random_erasing(img.copy(), ft_data._rng(0, 3, 0, i), 0.25)
            for i in range(400)]
  frac = np.mean([np.any(e != 0) for e in erased])
  assert 0.18 < frac < 0.32
  areas = [np.mean(e != 0) for e in erased if np.any(e != 0)]
  assert min(areas) >= 0.015 and max(areas) <= 0.4  # (h, w rounded)
  from PIL import Image
  ra = ft_data.RandAugment("rand-m9-mstd0.5-inc1")
  src = Image.fromarray((np.arange(28 * 28 * 3) % 255).astype(np.uint8).reshape(28, 28, 3))
  a = np.asarray(ra(src, ft_data._rng(0, 2, 0, 5)))
  b = np.asarray(ra(src, ft_data._rng(0, 2, 0, 5)))
  np.testing.assert_array_equal(a, b)
  for name in ft_data.RAND_INCREASING_OPS:  # every op runs at both ends of the range
    for m in (0.0, 10.0):
      assert ft_data.apply_op(src, name, m, True).size == (28, 28)


# -- the CLI: train, evaluate, resume exactly, summary; bad input --------------------------------

def _run(args, env_extra=None, timeout=240):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "adpe_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A pretraining smoke run of ours (RPE, coordinate adversary: 28 px, patch 4)."""
  workdir = tmp_path_factory.mktemp("pre")
  r = _run(["--config=configs/vitb_rpe_coord.py:smoke", f"--workdir={workdir}",
            "--config.total_steps=4", "--config.checkpoint_every_steps=4"])
  assert r.returncode == 0, r.stderr[-2000:]
  return workdir


FT = ["--config=configs/finetune_vitb_rpe_interp.py:smoke", "--config.data.source=fashion_mnist"]


def _final_params(workdir):
  from adpe_jax import weights
  return weights.load(workdir).params


@pytest.mark.skipif(not os.path.exists(FMNIST), reason="Fashion-MNIST not installed (make data)")
def test_cli_finetune_trains_evaluates_resumes(pretrained, tmp_path):
  full, split = tmp_path / "full", tmp_path / "split"
  r = _run([*FT, f"--workdir={full}", f"--config.init={pretrained}"])
  assert r.returncode == 0, r.stderr[-3000:]
  records = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
  losses = [x["loss"] for x in records if "loss" in x]
  evals = [x for x in records if "top1" in x]
  assert losses[-1] < losses[0]
  assert [e["step"] for e in evals] == [12, 24]
  summary = json.loads((full / "summary.json").read_text())
  assert summary["status"] == "finished" and summary["init_adversary"] == "coordinate"
  assert summary["last_top1"] == evals[-1]["top1"]
  assert summary["best_top1"] == max(e["top1"] for e in evals)
  assert 0.0 <= summary["last_top1"] <= summary["last_top5"] <= 1.0

  # The same run in two pieces (stop after 12 steps, then the same command) is identical.
  r = _run([*FT, f"--workdir={split}", f"--config.init={pretrained}",
            "--config.max_steps_per_run=12"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads((split / "summary.json").read_text())["status"] == "stopped"
  r = _run([*FT, f"--workdir={split}", f"--config.init={pretrained}"])
  assert r.returncode == 0, r.stderr[-3000:]
  a, b = _final_params(full), _final_params(split)
  jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a, b)
  s2 = json.loads((split / "summary.json").read_text())
  assert s2["last_top1"] == summary["last_top1"] and s2["best_top1"] == summary["best_top1"]


@pytest.mark.parametrize("extra,needle", [
    (["--config.init=/nonexistent/run"], "does not exist"),
    (["--config.model.variant=tiny"], "does not fit model.variant='tiny'"),
    (["--config.init=/nonexistent/original.pth"], "does not exist"),
    (["--config.model.rpe_lookup=bilinear"], "model.rpe_lookup='bilinear' is not allowed"),
    (["--config.model.pe_type=2"], "was replaced by model.pe and model.rpe_lookup"),
    (["--config.faithful=False"], "was replaced by model.rpe_query"),
])
def test_cli_bad_input_one_sentence(pretrained, tmp_path, extra, needle):
  args = ["--config=configs/finetune_vitb_rpe_interp.py:smoke", f"--workdir={tmp_path}",
          f"--config.init={pretrained}", *extra]
  r = _run(args)
  assert r.returncode == 2, r.stderr[-2000:]
  err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(err) == 1 and needle in err[0], r.stderr[-2000:]
  assert "Traceback" not in r.stderr


# -- configs, the model's pe_type / faithful switches, loading a pretrained encoder ------------

CONFIGS = ["finetune_vitb_ape", "finetune_vitb_rpe", "finetune_vitb_rpe_interp",
           "finetune_vitl_rpe_interp", "demo_finetune"]


@pytest.mark.parametrize("name", CONFIGS)
def test_finetune_configs_load_and_validate(name):
  import importlib.util
  from adpe_jax.config import finetune as finetune_config
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for arg in (None, "smoke"):
    c = module.get_config(arg)
    assert c.task == "finetune"
    finetune_config.validate(c, num_devices=4 if arg else 8)
  c = module.get_config(None)
  if name.startswith("finetune_vitb"):
    assert (c.layer_decay, c.model.drop_path, c.total_epochs) == (0.65, 0.1, 100)
    assert (c.batch_size, c.accum_steps) == ((1024, 1) if "ape" in name else (4096, 4))
  if name.startswith("finetune_vitl"):
    assert (c.layer_decay, c.model.drop_path, c.total_epochs) == (0.75, 0.2, 50)


def test_faithful_rpe_uses_the_unscaled_query():
  """faithful(table) == corrected(table * sqrt(head_dim)): the RPE term sees q, not q/sqrt(hd)."""
  kw = dict(num_classes=5, image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
            pe="rpe", rpe_lookup="continuous", drop_path=0.0)
  faithful, corrected = ViTClassifier(rpe_unscaled_query=True, **kw), ViTClassifier(
      rpe_unscaled_query=False, **kw)
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  p = faithful.init(jax.random.key(0), x)["params"]
  p = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(1), a.shape), p)
  scaled = jax.tree_util.tree_map_with_path(
      lambda path, a: a * 16 ** 0.5 if path[-1].key == "lookup_table" else a, p)
  a = faithful.apply({"params": p}, x)
  b = corrected.apply({"params": scaled}, x)
  c = corrected.apply({"params": p}, x)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4


PE_TYPES = {0: ("ape", "integer"), 1: ("rpe", "integer"), 2: ("rpe", "continuous")}


@pytest.mark.parametrize("pe_type", [0, 1, 2])
def test_load_init_from_our_pretraining(pretrained, pe_type):
  from adpe_jax import weights
  from adpe_jax.config import finetune as finetune_config
  pe, lookup = PE_TYPES[pe_type]
  c = finetune_config.recipe("base", pe, "smoke", rpe_lookup=lookup)
  c.image_size, c.init = 56, str(pretrained)          # 14x14 fine-tune grid from a 7x7 one
  model = build_classifier(c)
  fresh = jax.jit(lambda k: init_classifier_params(model, k))(jax.random.key(0))
  params, info = weights.init_classifier(c, model, fresh)
  pre = layout.to_unrolled(weights.load(pretrained).params)  # scanned seed config
  assert info["init_pos_grid"] == 7 and info["init_adversary"] == "coordinate"
  assert info["init_kind"] == "ours" and info["init_head"] == "fresh"
  np.testing.assert_array_equal(params["blocks_1"]["mlp"]["fc1"]["kernel"],
                                pre["blocks_1"]["mlp"]["fc1"]["kernel"])
  np.testing.assert_array_equal(params["head"]["kernel"], fresh["head"]["kernel"])
  want_pos = posembed.resize_table(posembed.sincos_table(7, 32), 14)[None]
  np.testing.assert_allclose(params["pos_embed"], want_pos, atol=1e-6)
  assert ("rpe_k" in params["blocks_0"]["attn"]) == (pe_type > 0)
  logits = jax.jit(lambda p, im: model.apply({"params": p}, im))(params, jnp.zeros((2, 56, 56, 3)))
  assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()


def test_load_init_from_the_originals_pth(pretrained, tmp_path, monkeypatch):
  """The original's .pth (convert.to_torch of our checkpoint) initialises the same weights;
  without torch the error is one sentence."""
  torch = pytest.importorskip("torch")
  from adpe_jax import errors, weights
  from adpe_jax.config import finetune as finetune_config
  pre = weights.load(pretrained).params
  sd = convert.to_torch({"params": jax.tree.map(np.asarray, pre), "adversary": {}}, grid=7)
  path = tmp_path / "checkpoint-399.pth"
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}, path)
  c = finetune_config.recipe("base", "rpe", "smoke", rpe_lookup="continuous")
  model = build_classifier(c)
  fresh = jax.jit(lambda k: init_classifier_params(model, k))(jax.random.key(0))
  c.init = str(pretrained)
  ours, _ = weights.init_classifier(c, model, fresh)
  c.init = str(path)
  theirs, info = weights.init_classifier(c, model, fresh)
  assert info["init_kind"] == "original_pretrain" and info["init_head"] == "fresh"
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7),
               ours, theirs)
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(errors.InitError, match="needs torch"):
    weights.init_classifier(c, model, fresh)


# -- preemption and the non-finite stop: the pretraining machinery, reached from fine-tuning --

def test_cli_finetune_sigterm_saves_the_current_step(tmp_path):
  cmd = [sys.executable, "-m", "adpe_jax.main", *FT, f"--workdir={tmp_path}",
         "--config.init=", "--config.data.source=synthetic", "--config.total_steps=100000",
         "--config.log_every_steps=1", "--config.checkpoint_every_steps=0",
         "--config.eval.every_steps=100000"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    time.sleep(0.5)
  assert metrics.exists(), "the fine-tune did not start logging"
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == "preempted", summary
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] == summary["steps"] >= 3


def test_cli_finetune_non_finite_stops_and_keeps_the_good_checkpoint(tmp_path):
  # A weight decay far above 1 / lr overshoots (p -= lr * wd * p: the head's weights times
  # 1 - 31.25 * 0.4 = -11.5 per step): float32 overflows after a few steps,
  # deterministically; checkpoints every 2 steps precede it.  (A negative weight decay,
  # as before, is refused at start now.)
  r = _run([*FT, f"--workdir={tmp_path}", "--config.init=", "--config.data.source=synthetic",
            "--config.total_steps=200", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=2", "--config.eval.every_steps=1000",
            "--config.blr=500.0", "--config.weight_decay=0.4",
            "--config.divergence_factor=0"])  # the non-finite stop itself
  assert r.returncode != 0
  message = [l for l in r.stderr.splitlines() if "non-finite loss or gradients" in l]
  assert message, r.stderr[-3000:]
  bad = int(re.search(r"at step (\d+);", message[-1]).group(1))
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] < bad
  assert f"checkpoints/{saved[-1]}" in message[-1]
  params = _final_params(tmp_path)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
