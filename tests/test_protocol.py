"""The CIFAR-10 protocol (configs/cifar10_*.py, benchmarks/adpe_vs_maeplus.py --protocol
cifar10): its configs, its cost against a hand count, and a smoke pretraining on a tiny
generated image folder (no real data: a clone elsewhere has none)."""

import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from adpe_jax import flops
from adpe_jax.config import finetune as finetune_config
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.config import probe as probe_config
from adpe_jax.train import optimizer as optim
from test_cli import load_config, run_cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def benchmark():
  spec = importlib.util.spec_from_file_location("adpe_vs_maeplus",
                                                ROOT / "benchmarks" / "adpe_vs_maeplus.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# -- the configs --------------------------------------------------------------------------------

def test_the_three_pretraining_arms_differ_only_in_pe_and_adversary():
  arms = {a: load_config("cifar10_pretrain", a) for a in (None, "mae_plus", "ape")}
  for c in arms.values():
    pretrain_config.validate(c, num_devices=8)
    assert (c.image_size // c.model.patch_size, c.model.variant) == (7, "small")
  flat = {a: dict(_flat(c)) for a, c in arms.items()}
  for a in ("mae_plus", "ape"):
    diff = {k for k in flat[None] if flat[None][k] != flat[a][k]}
    assert diff == {"mae_plus": {"adversary.kind"}, "ape": {"model.pe"}}[a], diff
  assert (arms[None].model.pe, arms[None].adversary.kind) == ("rpe", "coordinate")
  assert arms["mae_plus"].adversary.kind == "none" and arms["ape"].model.pe == "ape"
  with pytest.raises(Exception, match="two arms"):
    load_config("cifar10_pretrain", "mae_plus,ape")


def _flat(c, prefix=""):
  for k, v in c.items():
    if hasattr(v, "items"):
      yield from _flat(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def test_the_adversary_gets_the_original_recipe_and_a_budget_past_its_bound():
  """The rule the config states: the original's rate (adversary.lr = blr, scaled by the
  batch), whose budget over 77,600 steps is about 11.6 eps -- a hand sum of the schedule."""
  c = load_config("cifar10_pretrain")
  per_epoch = 50000 // c.batch_size
  total = int(c.total_epochs * per_epoch)
  assert (per_epoch, total, c.adversary.lr) == (97, 77600, c.blr)
  peak, warmup = c.adversary.lr * c.batch_size / 256, c.warmup_epochs * per_epoch
  u = np.arange(total, dtype=np.float64)        # accum 1: no micro-step offset
  lr = np.where(u < warmup, peak * u / warmup,
                peak * 0.5 * (1 + np.cos(np.pi * (u - warmup) / (total - warmup))))
  got = optim.adversary_budget(c, total, per_epoch)
  assert got == pytest.approx(lr.sum(), rel=1e-4)
  assert got / c.adversary.eps == pytest.approx(11.64, abs=0.01)


@pytest.mark.parametrize("arg,pe,lookup", [(None, "rpe", "continuous"),
                                           ("mae_plus", "rpe", "integer"),
                                           ("ape", "ape", "integer"),
                                           ("random", "rpe", "continuous")])
def test_finetune_follows_each_pretraining_with_its_pe_type(arg, pe, lookup):
  for a in (arg, f"{arg},smoke" if arg else "smoke"):
    c = load_config("cifar10_finetune", a)
    finetune_config.validate(c, num_devices=4)
    assert (c.model.pe, c.model.rpe_lookup) == (pe, lookup)
    assert c.init == ("" if arg == "random" else "runs/cifar10_pretrain")
  assert (c.data.source, c.data.eval_split, c.data.num_classes) == ("folder", "test", 10)


def test_linprobe_configs_validate():
  for a in (None, "cls", "smoke", "random,smoke"):
    c = load_config("cifar10_linprobe", a)
    probe_config.validate_linprobe(c, num_devices=4)
    assert c.model.pool == ("cls" if a == "cls" else "avg")
  assert c.init == "" and c.model.variant == "test"


def test_every_stage_of_every_arm_gets_its_config_and_the_data():
  b = benchmark()
  opts = type("Opts", (), {"protocol": "cifar10", "smoke": False, "data": "/d"})()
  expect = {"mae_plus_rpe": ("mae_plus", "mae_plus"), "adpe_rpe_coord": ("", ""),
            "adpe_ape_coord": ("ape", "ape"), "random_init": (None, "random")}
  for arm, (pre, ft) in expect.items():
    args = b.stage_args(arm, pathlib.Path("/w/pretrain"), ["--config.seed=1"], opts)
    assert ("pretrain" in args) == (pre is not None)
    if pre is not None:
      assert args["pretrain"] == [f"--config=configs/cifar10_pretrain.py{':' + pre if pre else ''}",
                                  "--config.data.dir=/d", "--config.seed=1"]
    init = [] if pre is None else ["--config.init=/w/pretrain"]
    assert args["finetune"] == [f"--config=configs/cifar10_finetune.py{':' + ft if ft else ''}",
                                "--config.data.dir=/d", *init, "--config.seed=1"]
    assert args["linprobe"] == [
        f"--config=configs/cifar10_linprobe.py{':random' if pre is None else ''}",
        "--config.data.dir=/d", *init, "--config.seed=1"]
  # --dtype bfloat16 reaches every stage, and every stage's config has the field.
  opts.dtype = "bfloat16"
  args = b.stage_args("adpe_rpe_coord", pathlib.Path("/w/pretrain"), [], opts)
  for stage, a in args.items():
    assert a[-1] == "--config.model.dtype=bfloat16"
    assert "dtype" in load_config(f"cifar10_{stage}").model


# -- the cost -------------------------------------------------------------------------------------

def _block(t, w, rpe):
  """One block by hand: qkv + proj + MLP (12 w^2 per token), q k^T + attn v, rpe q . R."""
  return 2 * (t * 12 * w * w + 2 * t * t * w + rpe * t * t * w)


def test_pretraining_cost_is_the_hand_count():
  """ViT-S/4 at 28 px, RPE-coordinate: T = 50 tokens, D 384, decoder 256 x 4, patches of 48
  values; 77,600 steps of 2,048 crops; 16 held-out evaluations of 9,984 images (off and on);
  k-NN on 60,000 images, trained and at initialisation."""
  c = load_config("cifar10_pretrain")
  t, d, dd, p = 50, 384, 256, 48
  fwd = (2 * 49 * p * d + 12 * _block(t, d, 2) + 2 * t * d * dd + 4 * _block(t, dd, 2)
         + 2 * t * dd * p)
  encoder = 2 * 49 * p * d + 12 * _block(t, d, 1)
  train = 77600 * 2048 * 3 * fwd
  heldout = 16 * 2 * 9984 * fwd
  knn = 2 * 60000 * encoder
  got = flops.run_flops(c, 50000, 10000)
  assert got["train"] == pytest.approx(train, rel=1e-12)
  assert got["eval"] == pytest.approx(heldout + knn, rel=1e-12)
  mae = flops.run_flops(load_config("cifar10_pretrain", "mae_plus"), 50000, 10000)
  fwd1 = (2 * 49 * p * d + 12 * _block(t, d, 1) + 2 * t * d * dd + 4 * _block(t, dd, 1)
          + 2 * t * dd * p)
  assert mae["train"] == pytest.approx(77600 * 2048 * 3 * fwd1, rel=1e-12)


def test_finetune_and_probe_cost_is_the_hand_count():
  """Fine-tune: 9,700 steps x 512 images x 3 forwards + 100 evaluations of 10,000 images;
  probe: 4,320 steps x 1,024 forwards + the eval features once.  A 10-way head."""
  t, d, p = 50, 384, 48
  fwd = 2 * 49 * p * d + 12 * _block(t, d, 1) + 2 * d * 10
  got = flops.run_flops(load_config("cifar10_finetune"), 50000, 10000)
  assert got["total"] == pytest.approx(9700 * 512 * 3 * fwd + 100 * 10000 * fwd, rel=1e-12)
  c = load_config("cifar10_linprobe", "random")
  got = flops.run_flops(c, 50000, 10000)
  assert got["total"] == pytest.approx(4320 * 1024 * fwd + 10000 * fwd, rel=1e-12)
  ape = 2 * 49 * p * d + 12 * _block(t, d, 0) + 2 * d * 10
  got = flops.run_flops(load_config("cifar10_finetune", "ape"), 50000, 10000)
  assert got["train"] == pytest.approx(9700 * 512 * 3 * ape, rel=1e-12)


def test_hours_and_the_published_numbers_are_the_commands():
  # One hour of an H100 at 30 %: 989e12 * 0.3 * 3600 FLOPs.
  assert flops.accelerator_hours(989e12 * 0.3 * 3600, flops.PEAK_BF16["H100"], 0.3) == (
      pytest.approx(1.0))
  b = benchmark()
  cost = b.protocol_cost(["mae_plus_rpe", "adpe_rpe_coord", "adpe_ape_coord"], 3, 1)
  per_seed = sum(f for (arm, _), f in cost["per_run"].items() if arm != "random_init")
  baseline = sum(f for (arm, _), f in cost["per_run"].items() if arm == "random_init")
  assert cost["total"] == pytest.approx(3 * per_seed + baseline)
  assert len(cost["per_run"]) == 3 * 3 + 2
  # docs/results.md and the pretraining config's docstring quote the command's output.
  table = b.cost_table(cost)
  total_row = table.splitlines()[len(cost["per_run"]) + 2]
  assert total_row in (ROOT / "docs" / "results.md").read_text()
  h100, a100 = (float(x) for x in total_row.split("|")[3:5])
  text = (ROOT / "configs" / "cifar10_pretrain.py").read_text()
  assert f"{h100:.1f} h on one H100 / {a100:.1f} h on one A100" in text
  pre = cost["per_run"][("adpe_rpe_coord", "pretrain")]
  assert re.search(rf"one pretraining\s+{pre / 1e15:,.0f} PFLOP", text)


# -- a smoke pretraining on a generated folder ------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """root/{train,test}/{a,b}/<k>.jpg: 8 random 32 px RGB JPEGs per class and split."""
  root = tmp_path_factory.mktemp("cifar_like")
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for cls in ("a", "b"):
      (root / split / cls).mkdir(parents=True)
      for k in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
            root / split / cls / f"{k}.jpg")
  return root


def test_smoke_pretraining_runs_on_a_folder_and_reports_the_heldout_loss(folder, tmp_path):
  r = run_cli("--config=configs/cifar10_pretrain.py:smoke", f"--config.data.dir={folder}",
              f"--workdir={tmp_path}", timeout=240)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == "finished" and summary["steps"] == 10
  # 16 test images: one chunk of 16, losses finite and positive (norm-pix MSE of noise ~ 1).
  assert 0.1 < summary["heldout_loss"] < 10 and 0.1 < summary["heldout_loss_adv"] < 10
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["data"]["dir"] == str(folder) and config["adversary"]["kind"] == "coordinate"
