"""Frozen-encoder evaluations: the k-NN entry and MAE's linear probe (tasks knn, linprobe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adpe_jax.models.probe import LinearProbe
from adpe_jax.train import evaluate, linprobe as lp
from adpe_jax.train import optimizer as optim
from adpe_jax.train import knn_metric as knn
from devices import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
needs_fmnist = pytest.mark.skipif(not os.path.exists(FMNIST),
                                  reason="Fashion-MNIST not installed (make data)")


def _run(args, timeout=240):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
  return subprocess.run([sys.executable, "-m", "adpe_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _pretrain(workdir, *extra):
  r = _run(["--config=configs/vitb_rpe_coord.py:smoke", f"--workdir={workdir}",
            "--config.total_steps=4", "--config.checkpoint_every_steps=4",
            "--config.eval.knn_source=", *extra])
  assert r.returncode == 0, r.stderr[-2000:]
  return workdir


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A pretraining smoke run of ours (RPE + coordinate adversary, 28 px, patch 4), with
  the seed configs' scanned blocks (model.scan_blocks)."""
  return _pretrain(tmp_path_factory.mktemp("pre"))


@pytest.fixture(scope="module")
def pretrained_unrolled(tmp_path_factory):
  """The same run with unrolled blocks (blocks_i, as `make demo` writes)."""
  return _pretrain(tmp_path_factory.mktemp("pre_unrolled"), "--config.model.scan_blocks=False")


# -- k-NN entry --------------------------------------------------------------------------------

@needs_fmnist
def test_knn_cli_equals_knn_eval_of_the_pretraining_model(pretrained, tmp_path):
  r = _run(["--config=configs/knn.py:smoke", f"--workdir={tmp_path}",
            f"--config.init={pretrained}"])
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert (summary["encoder"]["pe"], summary["encoder"]["rpe_lookup"]) == ("rpe", "continuous") and summary["init_adversary"] == "coordinate"
  assert (summary["train_examples"], summary["test_examples"], summary["k"]) == (500, 200, 20)
  # Independent path: the pretraining model (MAEPlus.features) on params read by
  # weights.load, images by data.labelled_arrays, knn.knn_eval.
  from adpe_jax import data, weights
  from adpe_jax.config import pretrain as pretrain_config
  from adpe_jax.train.state import build_model
  model = build_model(pretrain_config.seed_config("rpe", "coordinate", "smoke"))
  params = weights.load(pretrained).params
  def spread(split, n):   # n examples spread over the split: i * len // n
    source = data.get_source("fashion_mnist", split)
    return data.labelled_arrays(data.Subset(source, [i * len(source) // n for i in range(n)]),
                                28, n)
  train, test = spread("train", 500), spread("test", 200)
  want = knn.knn_eval(model, params, *train, *test, k=20, batch_size=64)["knn_top1"]
  assert summary["knn_top1"] == want
  assert 0.3 < want < 1.0


@pytest.mark.parametrize("config,extra,needle", [
    ("knn.py:smoke", ["--config.init=/nonexistent/run"], "does not exist"),
    ("linprobe_vitb.py:smoke", ["--config.init=/nonexistent/original.pth"], "does not exist"),
    ("knn.py", ["--config.init="], "config field model.variant is left to the checkpoint"),
])
def test_bad_init_one_sentence(tmp_path, config, extra, needle):
  r = _run([f"--config=configs/{config}", f"--workdir={tmp_path}", *extra])
  assert r.returncode == 2, r.stderr[-2000:]
  err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(err) == 1 and needle in err[0], r.stderr[-2000:]
  assert "Traceback" not in r.stderr


# -- linear probe: CLI ---------------------------------------------------------------------------

LP = ["--config=configs/linprobe_vitb.py:smoke"]


def _probe_params(workdir):
  from adpe_jax import weights
  return weights.load(workdir).params


@needs_fmnist
def test_linprobe_cli_trains_evaluates_resumes(pretrained_unrolled, tmp_path):
  pretrained = pretrained_unrolled
  full, split = tmp_path / "full", tmp_path / "split"
  r = _run([*LP, f"--workdir={full}", f"--config.init={pretrained}"])
  assert r.returncode == 0, r.stderr[-3000:]
  records = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
  losses = [x["loss"] for x in records if "loss" in x]
  evals = [x for x in records if "top1" in x]
  assert np.mean(losses[-2:]) < losses[0] - 0.1, losses
  assert [e["step"] for e in evals] == [8, 16]
  summary = json.loads((full / "summary.json").read_text())
  assert summary["status"] == "finished" and summary["encoder"]["pool"] == "cls"
  assert summary["last_top1"] == evals[-1]["top1"] and summary["last_step"] == 16
  assert summary["best_top1"] == max(e["top1"] for e in evals)
  assert 0.0 <= summary["last_top1"] <= summary["last_top5"] <= 1.0

  # Stopped after 8 steps, then the same command: identical probe and summary.
  r = _run([*LP, f"--workdir={split}", f"--config.init={pretrained}",
            "--config.max_steps_per_run=8"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads((split / "summary.json").read_text())["status"] == "stopped"
  r = _run([*LP, f"--workdir={split}", f"--config.init={pretrained}"])
  assert r.returncode == 0, r.stderr[-3000:]
  a, b = _probe_params(full), _probe_params(split)
  jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a, b)
  s2 = json.loads((split / "summary.json").read_text())
  assert (s2["last_top1"], s2["best_top1"]) == (summary["last_top1"], summary["best_top1"])


# -- linear probe: the pieces ----------------------------------------------------------------------

def test_batchnorm_without_affine_and_head_equal_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, size=(16, 8)).astype(np.float32)
  probe = LinearProbe(5)
  v = jax.jit(lambda k: probe.init(k, jnp.zeros((2, 8))))(jax.random.key(0))
  assert set(v["params"]) == {"head"} and set(v["params"]["head"]) == {"kernel", "bias"}
  assert set(v["batch_stats"]["bn"]) == {"mean", "var"}   # no scale, no bias
  w = np.asarray(v["params"]["head"]["kernel"], np.float64)
  assert abs(w.std() - 0.01) < 0.004 and np.abs(w).max() <= 0.02 + 1e-7
  w = rng.normal(size=(8, 5)) * 0.3
  b = rng.normal(size=5) * 0.1
  params = {"head": {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}}
  train = jax.jit(lambda p, s, f: probe.apply({"params": p, "batch_stats": s}, f, train=True,
                                              mutable=["batch_stats"]))
  logits, upd = train(params, v["batch_stats"], x)
  x64 = x.astype(np.float64)
  mean, var = x64.mean(0), x64.var(0)
  want = (x64 - mean) / np.sqrt(var + 1e-6) @ w + b
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
  run_mean, run_var = 0.1 * mean, 0.9 + 0.1 * var            # momentum 0.1 from (0, 1)
  np.testing.assert_allclose(upd["batch_stats"]["bn"]["mean"], run_mean, rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["bn"]["var"], run_var, rtol=1e-5)
  ev = jax.jit(lambda p, s, f: probe.apply({"params": p, "batch_stats": s}, f))(
      params, upd["batch_stats"], x)
  np.testing.assert_allclose(ev, (x64 - run_mean) / np.sqrt(run_var + 1e-6) @ w + b,
                             rtol=1e-4, atol=1e-4)


def test_lars_is_maes():
  """util/lars.py of MAE, in numpy: >1-D tensors get wd and the trust ratio, then
  mu = m mu + g, p -= lr mu (lr changing every step)."""
  rng = np.random.default_rng(1)
  p = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}
  lrs = [0.5, 1.0, 2.0]
  tx = optim.lars(lambda s: jnp.asarray(lrs)[s], weight_decay=0.05, momentum=0.9)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
  state = tx.init(params)
  mu = {k: np.zeros_like(v) for k, v in p.items()}
  want = {k: v.copy() for k, v in p.items()}
  for s in range(3):
    g = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}
    upd, state = tx.update(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), g), state, params)
    params = jax.tree.map(lambda a, u: a + u, params, upd)
    for k in want:
      dp = g[k]
      if want[k].ndim > 1:
        dp = dp + 0.05 * want[k]
        q = 0.001 * np.linalg.norm(want[k]) / np.linalg.norm(dp)
        dp = dp * q
      mu[k] = 0.9 * mu[k] + dp
      want[k] = want[k] - lrs[s] * mu[k]
  for k in want:
    np.testing.assert_allclose(params[k], want[k], rtol=1e-5, atol=1e-6)


def test_encoder_is_frozen():
  """Steps change the probe only: the encoder's arrays are neither donated nor changed, and
  no gradient reaches them (stop_gradient)."""
  from adpe_jax.config import probe as probe_config
  c = probe_config.apply_smoke(probe_config.linprobe_config())
  encoder, _, _ = evaluate.load_encoder(c)
  enc_params = jax.device_put(encoder.params)
  before = jax.tree.map(np.array, enc_params)
  probe = LinearProbe(10)
  v = probe.init(jax.random.key(0), jnp.zeros((2, 32)))
  c.total_steps, c.optimizer = 3, "sgd"
  tx, lr_fn = lp.make_optimizer(c, 3, 3.0)
  state = lp.ProbeState(jnp.zeros((), jnp.int32), v["params"], v["batch_stats"],
                        tx.init(v["params"]))
  step = jax.jit(lp.make_train_step(probe, encoder.fn, tx, lr_fn), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 28, 28, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
  head0 = np.array(v["params"]["head"]["kernel"])
  for _ in range(3):
    state, _ = step(state, enc_params, images, labels)
  assert np.abs(np.asarray(state.params["head"]["kernel"]) - head0).max() > 0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), enc_params, before)
  grads = jax.jit(jax.grad(lambda e: lp.probe_loss(
      probe, encoder.fn, state.params, state.batch_stats, e, images, labels)[0]))(enc_params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_pools_and_configs():
  """The readouts: "mean" is MAEPlus.features' pooling, "cls" the normed cls token, "avg" a
  LayerNorm without affine of the raw patch-token mean; the linprobe configs load."""
  import importlib.util
  from adpe_jax.config import probe as probe_config
  c = probe_config.apply_smoke(probe_config.knn_config())
  encoder, _, _ = evaluate.load_encoder(c)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 28, 28, 3)), jnp.float32)
  model, p = encoder.fn.module, encoder.params
  feats = {pool: np.asarray(evaluate.classifier_encoder(model, p, pool).features(x, 4))
           for pool in evaluate.POOLS}
  assert all(f.shape == (3, 32) for f in feats.values())
  assert np.allclose(feats["avg"].mean(1), 0, atol=1e-5)
  assert np.allclose(feats["avg"].std(1), 1, atol=1e-2)
  assert not np.allclose(feats["cls"], feats["mean"])
  for name in ("linprobe_vitb", "linprobe_demo", "knn"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for arg in (None, "smoke"):
      cfg = module.get_config(arg)
      if cfg.task == "linprobe":
        probe_config.validate_linprobe(cfg, num_devices=4 if arg else 8)
  vitb = probe_config.linprobe_config()
  assert (vitb.optimizer, vitb.blr, vitb.weight_decay, vitb.momentum, vitb.batch_size,
          vitb.total_epochs, vitb.warmup_epochs, vitb.model.pool) == (
              "lars", 0.1, 0.0, 0.9, 16384, 90, 10.0, "cls")
