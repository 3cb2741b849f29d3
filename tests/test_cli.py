"""The entry point and the configs: smoke runs, and bad input stopping with one sentence."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.errors import ConfigError
from adpe_jax.models import variants
from devices import xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("vit*.py"))


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def run_cli(*args, timeout=300):
  env = dict(os.environ, XLA_FLAGS=xla_flags(2))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compilation_cache=auto: the workdir's own
  return subprocess.run([sys.executable, "-m", "adpe_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_cli_smoke_run_writes_metrics_and_loss_falls(tmp_path):
  # A relative workdir, as `make demo` passes (orbax itself needs absolute paths).
  r = run_cli("--config=configs/vitb_ape.py:smoke", f"--workdir={os.path.relpath(tmp_path, ROOT)}",
              "--config.eval.knn_source=fashion_mnist", "--config.eval.knn_every_steps=15",
              "--config.eval.knn_train_examples=500", "--config.eval.knn_test_examples=100")
  assert r.returncode == 0, r.stderr[-3000:]
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model"]["variant"] == "test"
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [r_ for r_ in records if "loss" in r_]
  assert [r_["step"] for r_ in train] == [5, 10, 15, 20, 25, 30]
  for rec in train:
    assert {"step", "loss", "lr", "img_per_s"} <= set(rec)
  assert train[-1]["loss"] < train[0]["loss"]
  knn = [r_ for r_ in records if "knn_top1" in r_]
  assert [r_["step"] for r_ in knn] == [15, 30] and 0.1 < knn[-1]["knn_top1"] <= 1.0
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert {"knn_top1", "knn_top1_random_init", "steps", "train_seconds"} <= set(summary)
  assert summary["steps"] == 30 and summary["status"] == "finished"
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["15", "30"]
  assert (tmp_path / "reconstructions.png").exists() and (tmp_path / "log.txt").exists()
  assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
  # The persistent compilation cache (compilation_cache=auto): the compiled step is kept.
  assert len(list((tmp_path / "jax_cache").iterdir())) >= 1


@pytest.mark.parametrize("override,needle", [
    ("--config.bogus=1", "config field 'bogus'"),
    ("--config.mask_ratio=1.0", "mask_ratio=1.0"),
    ("--config.image_size=30", "image_size=30"),
    ("--config.batch_size=6", "batch_size=6"),
    ("--config.eval.evaluators=('knn', 'classifier')", "names 'classifier', not an evaluator"),
])
def test_cli_bad_input_one_sentence(tmp_path, override, needle):
  r = run_cli("--config=configs/vitb_ape.py:smoke", f"--workdir={tmp_path}", override, timeout=120)
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and needle in last, r.stderr[-2000:]
  assert "Traceback" not in r.stderr


@pytest.mark.parametrize("field,value,needle", [
    ("mask_ratio", 0.0, "mask_ratio=0.0"),
    ("model.pe", "abs", "model.pe='abs'"),
    ("adversary.kind", "pgd", "adversary.kind='pgd'"),
    ("adversary.norm", "l3", "adversary.norm='l3'"),
    ("model.variant", "giant", "model.variant='giant'"),
    ("accum_steps", 3, "accum_steps=3"),
])
def test_validate_names_field(field, value, needle):
  c = load_config("vitb_ape", "smoke")
  node = c
  parts = field.split(".")
  for p in parts[:-1]:
    node = node[p]
  node[parts[-1]] = value
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
    pretrain_config.validate(c, num_devices=4)


def test_batch_not_divisible_by_devices():
  c = load_config("vitb_ape", "smoke")
  c.batch_size, c.accum_steps = 6, 1
  with pytest.raises(ConfigError, match="not divisible by the 4 devices"):
    pretrain_config.validate(c, num_devices=4)


# The original's model factories: adpe_vit_{base,large}_patch16, adpe_vit_huge_patch14,
# each with a 512-wide, 8-deep, 16-head decoder.
ORIGINAL_GEOMETRY = {
    "vitb": ("base", 16, 768, 12, 12),
    "vitl": ("large", 16, 1024, 24, 16),
    "vith": ("huge", 14, 1280, 32, 16),
}
ADVERSARY_BY_SUFFIX = {"embed": "embedding", "coord": "coordinate"}


def test_there_are_seed_configs_for_every_size():
  assert {name.split("_")[0] for name in CONFIGS} == set(ORIGINAL_GEOMETRY)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_is_the_seed_recipe(name):
  c = load_config(name)
  pretrain_config.validate(c, num_devices=8)
  # Model geometry: the file name's size is the original's factory.
  size, pe, *rest = name.split("_")
  variant, patch, embed_dim, depth, heads = ORIGINAL_GEOMETRY[size]
  assert (c.model.variant, c.model.patch_size) == (variant, patch)
  assert tuple(variants.VARIANTS[c.model.variant]) == (embed_dim, depth, heads, 512, 8, 16)
  # Positional encoding and adversary: from the file name.
  assert c.model.pe == pe and pe in ("ape", "rpe")
  assert len(rest) <= 1
  assert c.adversary.kind == (ADVERSARY_BY_SUFFIX[rest[0]] if rest else "none")
  # The seed README's recipe.
  assert (c.image_size, c.num_crops, c.batch_size, c.blr, c.adversary.lr) == (
      112, 4, 4096, 1.5e-4, 1.5e-4)
  assert (c.total_epochs, c.warmup_epochs) == (400, 20)
  long = load_config(name, "1600ep")
  assert (long.total_epochs, long.warmup_epochs) == (1600, 40)
  assert (long.model.variant, long.model.patch_size) == (variant, patch)
  with pytest.raises(ConfigError, match="bogus"):
    load_config(name, "bogus")


def test_demo_config_rejects_unknown_arguments():
  pretrain_config.validate(load_config("demo"), num_devices=4)
  with pytest.raises(ConfigError, match="1600ep"):
    load_config("demo", "1600ep")
  with pytest.raises(ConfigError, match="bogus"):
    load_config("demo", "smoke,bogus")
