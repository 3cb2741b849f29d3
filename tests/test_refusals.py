"""Refusals at the start of a run (issue 17 items 2, 3, 6, 7 and the validation trials):
each comes before anything is written and before the step is compiled, in one sentence.

One short real pretraining run (module fixture) makes the workdir; the checks are called
directly on it (`preflight.check_workdir`), and a few `python -m adpe_jax.main` runs show
exit 2, one sentence, config.json byte-identical and no compile.
"""

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from adpe_jax import checkpoint as ckpt_lib
from adpe_jax import export, storage
from adpe_jax.config import finetune as finetune_config
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.config import probe as probe_config
from adpe_jax.config import validate
from adpe_jax.errors import CheckpointError, ConfigError, DataError, InitError, WorkdirError
from adpe_jax.train import finetune, preflight, pretrain
from devices import xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNCHANGED = "nothing on disk was changed."


def pretrain_smoke(**kw):
  c = pretrain_config.apply_smoke(pretrain_config.base_config())
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 3, 1, 3
  c.compilation_cache = "none"
  for k, v in kw.items():
    set_field(c, k, v)
  return c


def finetune_smoke():
  return finetune_config.apply_smoke(finetune_config.finetune_config())


def linprobe_smoke():
  return probe_config.apply_smoke(probe_config.linprobe_config())


def knn_smoke():
  return probe_config.apply_smoke(probe_config.knn_config())


def set_field(c, field, value):
  node = c
  *parents, last = field.split(".")
  for p in parents:
    node = node[p]
  node[last] = value


def snapshot(path: pathlib.Path) -> dict:
  """{relative path: bytes (files) or None (directories)} of a tree."""
  return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
          for p in sorted(path.rglob("*"))}


def check(config, workdir, meta=pretrain.run_metadata):
  return preflight.check_workdir(config, str(workdir), run_metadata=meta)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A finished 3-step pretraining workdir (checkpoint 3, config.json, summary.json)."""
  w = tmp_path_factory.mktemp("pretrained")
  out = pretrain.train_and_evaluate(pretrain_smoke(), str(w))
  assert out["summary"]["status"] == "finished"
  assert (w / "checkpoints" / "3").is_dir() and (w / "config.json").is_file()
  return w


@pytest.fixture
def copy_of(pretrained, tmp_path):
  """A copy of the pretraining workdir, to change its files."""
  dst = tmp_path / "copy"
  shutil.copytree(pretrained, dst)
  return dst


# -- item 2/3: the workdir against the request ---------------------------------------------

@pytest.mark.parametrize("field,new,old", [
    ("model.variant", "reference", "test"),
    ("adversary.kind", "coordinate", "none"),
    ("model.pe", "rpe", "ape"),
    ("model.scan_blocks", True, False),
    ("batch_size", 16, 8),
    ("seed", 1, 0),
    ("blr", 3e-3, 1.5e-3),          # a finished run re-run with another blr
    ("accum_steps", 4, 2),
    ("num_crops", 4, 2),
    ("mask_ratio", 0.5, 0.75),
    ("warmup_epochs", 1.0, 0.0),
    ("min_lr", 1e-6, 0.0),
    ("weight_decay", 0.1, 0.05),
    ("data.num_examples", 128, 256),
    ("data.source", "fashion_mnist", "synthetic"),
    ("adversary.lr", 1e-2, 1.5e-3),
])
def test_a_trajectory_change_is_refused_naming_the_field(pretrained, field, new, old):
  before = snapshot(pretrained)
  with pytest.raises(WorkdirError) as e:
    check(pretrain_smoke(**{field: new}), pretrained)
  message = str(e.value)
  assert f"{field} ({old!r} -> {new!r})" in message, message
  assert f"checkpoint {pretrained}/checkpoints/3" in message and message.endswith(UNCHANGED)
  assert "total_steps and total_epochs shape" not in message
  assert snapshot(pretrained) == before  # config.json included, byte for byte


def test_a_longer_total_steps_is_refused_saying_why(pretrained):
  with pytest.raises(WorkdirError) as e:
    check(pretrain_smoke(total_steps=6, seed=2), pretrained)
  message = str(e.value)
  assert "seed (0 -> 2), total_steps (3 -> 6)" in message
  assert "cosine schedule" in message and "max_steps_per_run" in message


@pytest.mark.parametrize("field,new", [
    ("log_every_steps", 2), ("checkpoint_every_steps", 1), ("keep_checkpoints", 5),
    ("max_steps_per_run", 2), ("divergence_factor", 0.0), ("compilation_cache", "auto"),
    ("data.num_threads", 3), ("data.num_workers", 0), ("data.decoder", "simplejpeg"),
    ("data.normalize_on_device", True), ("eval.knn_every_steps", 5), ("mesh.fsdp", 2),
    ("distributed.heartbeat_timeout_seconds", 30), ("model.remat", "block"),
    ("data.bad_images", "skip"), ("data.max_bad_fraction", 0.01),
    ("eval.knn_source", "fashion_mnist"),
])
def test_fields_off_the_trajectory_may_change(pretrained, field, new):
  before = snapshot(pretrained)
  assert check(pretrain_smoke(**{field: new}), pretrained) == storage.resolve(pretrained)
  assert snapshot(pretrained) == before  # the write probe is removed again
  assert preflight.free(field)


def test_the_same_command_passes_and_unknown_fields_are_trajectory(pretrained):
  check(pretrain_smoke(), pretrained)
  assert not preflight.free("data.some_new_field") and not preflight.free("meshes")


@pytest.mark.parametrize("status", ["diverged", "non-finite"])
def test_after_a_divergence_stop_the_learning_rate_may_be_lowered(copy_of, status):
  # Both stops tell the user to start again with a lower blr (train/loop.py): the kept
  # checkpoint must accept that after either status summary.json can hold.
  (copy_of / "summary.json").write_text(json.dumps({"status": status, "step": 2}))
  check(pretrain_smoke(blr=1e-4, warmup_epochs=0.01), copy_of)
  with pytest.raises(WorkdirError, match=r"seed \(0 -> 1\)"):
    check(pretrain_smoke(blr=1e-4, seed=1), copy_of)


def test_without_config_json_the_checkpoint_metadata_is_compared(copy_of, caplog):
  (copy_of / "config.json").unlink()
  with pytest.raises(WorkdirError) as e:
    check(pretrain_smoke(**{"model.variant": "reference"}), copy_of)
  assert "model.variant ('test' there, 'reference' now)" in str(e.value)
  assert "checkpoints/3" in str(e.value)
  caplog.clear()
  check(pretrain_smoke(batch_size=16), copy_of)  # not in the metadata: only logged
  assert any("no readable config.json" in r.getMessage() for r in caplog.records)
  assert not (copy_of / "config.json").exists()


# -- item 2: another task's checkpoint ---------------------------------------------------------

@pytest.mark.parametrize("make,verb", [
    (finetune_smoke, "fine-tune"), (linprobe_smoke, "probe"), (knn_smoke, "evaluate")])
def test_a_fine_tune_pointed_at_a_pretraining_workdir_names_the_pretraining_checkpoint(
    pretrained, make, verb):
  before = snapshot(pretrained)
  with pytest.raises(WorkdirError) as e:
    check(make(), pretrained, meta=None)
  message = str(e.value)
  assert message.startswith(f"--workdir={pretrained} holds a pretraining checkpoint "
                            f"({pretrained}/checkpoints/3)"), message
  assert f"; {verb} with --config.init={pretrained} and another --workdir" in message
  assert "layout" not in message and "scan_blocks" not in message
  assert snapshot(pretrained) == before


def _fake_run(workdir, run: dict):
  state = {"params": {"w": np.zeros((2, 2), np.float32)}, "step": np.int32(4)}
  with ckpt_lib.Checkpointer(workdir, 1, metadata=run) as ckpt:
    ckpt.maybe_save(4, jax.device_put(state), force=True)


@pytest.mark.parametrize("saved,make,needle", [
    ({"task": "finetune"}, pretrain_smoke,
     "holds a fine-tuning checkpoint ({w}/checkpoints/4), not a pretraining run; pretrain in "
     "another --workdir"),
    ({"task": "linprobe"}, finetune_smoke,
     "holds a linear-probe checkpoint ({w}/checkpoints/4), not a fine-tuning run; fine-tune in "
     "another --workdir"),
    ({"task": "finetune"}, linprobe_smoke,
     "holds a fine-tuning checkpoint ({w}/checkpoints/4), not a linear-probe run; probe with "
     "--config.init={w} and another --workdir"),
])
def test_a_pretraining_command_pointed_at_a_fine_tune_workdir_is_refused(tmp_path, saved, make,
                                                                        needle):
  w = tmp_path / "other"
  _fake_run(w, saved)
  before = snapshot(w)
  with pytest.raises(WorkdirError) as e:
    check(make(), w, meta=None)
  assert needle.format(w=w) in str(e.value), str(e.value)
  assert snapshot(w) == before


def test_the_fine_tune_metadata_check_is_also_made_before_the_compile(tmp_path):
  w = tmp_path / "ft"
  c = finetune_smoke()
  _fake_run(w, {**finetune.run_metadata(c), "num_classes": 7})
  with pytest.raises(WorkdirError, match=r"num_classes \(7 there, 10 now\)"):
    preflight.check_workdir(c, str(w), run_metadata=finetune.run_metadata,
                            upgrade=validate.upgrade_run_metadata)


# -- item 6 and the validation trials: the workdir itself -------------------------------------

@pytest.mark.parametrize("workdir", ["", "  "])
def test_an_empty_workdir_is_refused_and_the_cwd_untouched(tmp_path, monkeypatch, workdir):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError, match=r"^--workdir is empty \(an unset shell variable\?\)"):
    check(pretrain_smoke(), workdir)
  assert list(tmp_path.iterdir()) == []


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  f = tmp_path / "notes.txt"
  f.write_text("mine")
  with pytest.raises(ConfigError, match=rf"^--workdir={f} is an existing file, not a directory"):
    check(pretrain_smoke(), f)
  assert f.read_text() == "mine"


def test_a_workdir_below_a_file_cannot_be_created(tmp_path):
  (tmp_path / "f").write_text("")
  with pytest.raises(ConfigError, match=r"cannot be created \(Not a directory"):
    check(pretrain_smoke(), tmp_path / "f" / "run")


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's /sys")
def test_a_workdir_that_cannot_be_written_is_refused_with_the_errno_text():
  # /sys refuses new files even to root (chmod does not stop root).
  with pytest.raises(ConfigError, match=r"^--workdir=/sys/kernel is not writable \((Permission "
                                        r"denied|Read-only file system|Operation not permitted)"):
    check(pretrain_smoke(), "/sys/kernel")


def test_a_read_only_workdir_is_refused_before_config_json(tmp_path, monkeypatch):
  def read_only(path, text):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
  monkeypatch.setattr(storage, "write_text", read_only)
  with pytest.raises(ConfigError, match=r"is not writable \(Read-only file system\)"):
    check(pretrain_smoke(), tmp_path / "run")


# -- item 7 and the validation trials: values ---------------------------------------------------

@pytest.mark.parametrize("make,field,value", [
    (pretrain_smoke, "blr", -1.0), (pretrain_smoke, "blr", 0.0),
    (pretrain_smoke, "blr", float("nan")), (pretrain_smoke, "min_lr", -1e-6),
    (pretrain_smoke, "adversary.lr", -1.0), (pretrain_smoke, "warmup_epochs", -1.0),
    (pretrain_smoke, "weight_decay", -0.05), (pretrain_smoke, "adversary.weight_decay", -1.0),
    (pretrain_smoke, "total_epochs", -1), (pretrain_smoke, "b2", 1.0),
    (pretrain_smoke, "keep_checkpoints", 0), (pretrain_smoke, "seed", -1),
    (pretrain_smoke, "data.num_threads", -1), (pretrain_smoke, "data.num_workers", -2),
    (finetune_smoke, "blr", -1e-3), (finetune_smoke, "min_lr", -1.0),
    (finetune_smoke, "warmup_epochs", -5.0), (finetune_smoke, "weight_decay", -0.05),
    (finetune_smoke, "aug.mixup_prob", 1.5), (finetune_smoke, "seed", -1),
    (finetune_smoke, "data.num_threads", -1), (finetune_smoke, "keep_checkpoints", 0),
    (linprobe_smoke, "blr", -0.1), (linprobe_smoke, "warmup_epochs", -1.0),
    (linprobe_smoke, "momentum", -0.9), (linprobe_smoke, "weight_decay", -1.0),
    (knn_smoke, "temperature", -0.07), (knn_smoke, "crop_fraction", 0.0),
    (knn_smoke, "seed", -1),
])
def test_a_bad_value_is_named_before_anything_is_written(tmp_path, make, field, value):
  c = make()
  set_field(c, field, value)
  with pytest.raises(ConfigError, match=rf"^config field {field}={value!r} is not allowed: it "
                                        rf"must be "):
    check(c, tmp_path / "run", meta=None)
  assert not (tmp_path / "run").exists()


def test_the_shipped_configs_pass_the_value_checks():
  for c in (pretrain_smoke(), pretrain_config.base_config(), finetune_smoke(),
            finetune_config.finetune_config(), linprobe_smoke(), probe_config.linprobe_config(),
            knn_smoke(), probe_config.knn_config()):
    validate.values(c)


# -- config.init, export --------------------------------------------------------------------------

def test_an_init_that_is_a_plain_file_or_missing_is_refused(tmp_path):
  f = tmp_path / "weights.txt"
  f.write_text("x")
  c = finetune_smoke()
  c.init = str(f)
  with pytest.raises(InitError, match=r"is a file but not a PyTorch checkpoint \(\.pth"):
    check(c, tmp_path / "run", meta=None)
  c.init = str(tmp_path / "missing")
  with pytest.raises(InitError, match=r"init='.*missing' does not exist"):
    check(c, tmp_path / "run2", meta=None)


def test_export_of_a_file_names_it(tmp_path):
  f = tmp_path / "f.txt"
  f.write_text("x")
  with pytest.raises(CheckpointError, match=rf"^{f} holds no checkpoint of ours"):
    export.export(str(f), str(tmp_path / "enc.safetensors"))


def test_export_out_in_a_missing_or_unwritable_directory_is_refused_first(tmp_path):
  out = tmp_path / "no" / "enc.safetensors"
  with pytest.raises(ConfigError, match=rf"its directory {tmp_path / 'no'} does not exist"):
    export.save({"a": np.zeros(2, np.float32)}, str(out))
  if os.path.isdir("/sys/kernel"):
    with pytest.raises(ConfigError, match=r"its directory /sys/kernel is not writable \("):
      export.save({"a": np.zeros(2, np.float32)}, "/sys/kernel/enc.safetensors")


def test_export_writes_the_users_mode_and_nothing_on_failure(tmp_path, monkeypatch):
  pytest.importorskip("safetensors")
  old = os.umask(0o022)
  try:
    export.save({"a": np.ones(2, np.float32)}, str(tmp_path / "a.safetensors"))
    os.umask(0o002)
    export.save({"a": np.ones(2, np.float32)}, str(tmp_path / "b.safetensors"))
  finally:
    os.umask(old)
  assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644
  assert (tmp_path / "b.safetensors").stat().st_mode & 0o777 == 0o664
  # A full disk mid-write: the errno text named, the old file kept, no temporary file left.
  import safetensors.numpy as st
  def full(tensors, path):
    pathlib.Path(path).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(st, "save_file", full)
  before = (tmp_path / "a.safetensors").read_bytes()
  with pytest.raises(ConfigError, match=r"could not be written \(No space left on device\)"):
    export.save({"a": np.zeros(2, np.float32)}, str(tmp_path / "a.safetensors"))
  assert (tmp_path / "a.safetensors").read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


# -- the command line: exit 2, one sentence, nothing written, nothing compiled ------------------

def run_cli(*args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2),
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-m", "adpe_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=240)


def one_error(r) -> str:
  assert r.returncode == 2, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "compiled the train step" not in r.stderr
  return errors[0]


SMOKE = [f"--config={ROOT}/configs/vitb_ape.py:smoke", "--config.model.scan_blocks=False",
         "--config.total_steps=3", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=3", "--config.compilation_cache=none"]


@pytest.mark.parametrize("extra,needle", [
    (["--config.seed=5", "--config.blr=3e-3"], "blr (0.0015 -> 0.003), seed (0 -> 5)"),
    (["--config.model.variant=reference"], "model.variant ('test' -> 'reference')"),
])
def test_cli_a_refused_resume_leaves_config_json_and_compiles_nothing(pretrained, extra, needle):
  before = snapshot(pretrained)
  line = one_error(run_cli(*SMOKE, f"--workdir={pretrained}", *extra))
  assert needle in line and line.endswith(UNCHANGED), line
  assert snapshot(pretrained) == before


def test_cli_fine_tune_into_a_pretraining_workdir(pretrained):
  before = snapshot(pretrained)
  line = one_error(run_cli("--config=configs/finetune_vitb_ape.py:smoke",
                           f"--workdir={pretrained}"))
  assert "holds a pretraining checkpoint" in line and f"--config.init={pretrained}" in line
  assert snapshot(pretrained) == before


def test_cli_empty_workdir_missing_config_and_bad_threads(tmp_path):
  line = one_error(run_cli(*SMOKE, "--workdir=", cwd=tmp_path))
  assert line.startswith("error: --workdir is empty")
  line = one_error(run_cli(f"--config={tmp_path}/nope.py", f"--workdir={tmp_path}/w"))
  assert line == (f"error: config file '{tmp_path}/nope.py' (from --config={tmp_path}/nope.py) "
                  f"does not exist; pass one of configs/*.py, e.g. "
                  f"--config=configs/vitb_rpe_coord.py.")
  line = one_error(run_cli(*SMOKE, f"--workdir={tmp_path}/w", "--config.data.num_threads=-1"))
  assert "config field data.num_threads=-1 is not allowed" in line
  assert list(tmp_path.iterdir()) == []  # (the cwd of the first run included)


# -- issue 28 item 11: a refused start leaves the workdir as it found it -----------------------

from test_data_faults import _prepare, jpegs  # noqa: E402,F401 (the noise JPEGs, prepared)


def _refused(entry, config, workdir, error):
  """Runs a start that must refuse; asserts the workdir afterwards is what it was before
  (absent, or byte for byte); returns the sentence."""
  before = snapshot(workdir) if workdir.exists() else None
  with pytest.raises(error) as e:
    entry(config, str(workdir))
  if before is None:
    assert not workdir.exists(), sorted(str(p) for p in workdir.rglob("*"))
  else:
    assert snapshot(workdir) == before
  return str(e.value)


@pytest.mark.parametrize("premade", [False, True])
def test_a_fine_tune_refused_for_its_init_writes_nothing(tmp_path, premade):
  (tmp_path / "empty").mkdir()
  c = finetune_smoke()
  c.init = str(tmp_path / "empty")   # exists (preflight passes), holds no checkpoint
  workdir = tmp_path / "run"
  if premade:
    workdir.mkdir()                  # a directory the user made: it stays, empty
  message = _refused(finetune.finetune, c, workdir, InitError)
  assert "holds no checkpoint of ours" in message


def test_a_batch_larger_than_the_synthetic_source_writes_nothing(tmp_path):
  message = _refused(pretrain.train_and_evaluate, pretrain_smoke(**{"data.num_examples": 4}),
                     tmp_path / "run", ConfigError)
  assert "config field batch_size=8 exceeds the 4 examples" in message


def test_an_unbuilt_tfds_dataset_with_workers_writes_nothing(tmp_path):
  (tmp_path / "tfds").mkdir()
  c = pretrain_smoke(**{"data.source": "tfds:mnist", "data.dir": str(tmp_path / "tfds"),
                        "data.num_workers": 2})
  message = _refused(pretrain.train_and_evaluate, c, tmp_path / "run", DataError)
  assert "is not prepared under" in message


def test_a_missing_prepared_shard_writes_nothing(jpegs, tmp_path):  # noqa: F811
  index = _prepare(jpegs, tmp_path / "p")
  (tmp_path / "p" / index["shards"][1]["file"]).unlink()
  c = pretrain_smoke(**{"data.source": f"prepared:{tmp_path / 'p'}"})
  message = _refused(pretrain.train_and_evaluate, c, tmp_path / "run", DataError)
  assert "does not exist" in message


def test_a_resume_refused_at_its_restore_leaves_the_run_byte_for_byte(copy_of):
  # The newest checkpoint truncated; the command changes a field off the trajectory, which
  # config.json would record once the start got past its refusals.
  data = max((copy_of / "checkpoints" / "3" / "state").rglob("d/*"),
             key=lambda p: p.stat().st_size)
  with open(data, "r+b") as f:
    f.truncate(data.stat().st_size // 3)
  message = _refused(pretrain.train_and_evaluate, pretrain_smoke(log_every_steps=2), copy_of,
                     CheckpointError)
  assert f"checkpoint {copy_of}/checkpoints/3" in message


def test_a_start_that_got_past_its_refusals_keeps_what_it_wrote(tmp_path, monkeypatch):
  from adpe_jax.train import loop
  def fails(*a, **kw):
    raise RuntimeError("a fault in the loop")
  monkeypatch.setattr(loop, "train", fails)
  workdir = tmp_path / "run"
  with pytest.raises(RuntimeError, match="a fault in the loop"):
    pretrain.train_and_evaluate(pretrain_smoke(), str(workdir))
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 3
  assert (workdir / ".adpe_lock").is_file() and (workdir / "checkpoints").is_dir()
