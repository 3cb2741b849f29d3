"""The data of a resumed run (issue 28 item 1): every checkpoint records what its training
data is (`adpe_jax.data.identity`), and a resume on other data is refused in one sentence
saying what changed, unless data.allow_changed=True (a warning); the same data under another
path continues the same run; a checkpoint without the record still resumes, with a warning.

The data is a tiny JPEG folder (2 classes x 8 noise images, 2 steps per epoch); one run stops
at step 2 (module fixture) and each test resumes a copy of it.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from adpe_jax import data
from adpe_jax import checkpoint as ckpt_lib
from adpe_jax.checkpoint import rundir
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.data import identity, prepare
from adpe_jax.errors import WorkdirError
from adpe_jax.train import finetune, linprobe, preflight, pretrain
from devices import xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLASSES, PER_CLASS = ("cat", "dog"), 8
UNCHANGED = "nothing on disk was changed."


def make_folder(root: pathlib.Path) -> pathlib.Path:
  rng = np.random.default_rng(0)
  for name in CLASSES:
    (root / name).mkdir(parents=True)
    for k in range(PER_CLASS):
      pixels = rng.integers(0, 256, (36 + 2 * k, 40, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / name / f"{k:02d}.jpg", quality=90)
  return root


def config(root, **kw):
  c = pretrain_config.apply_smoke(pretrain_config.base_config())
  c.data.source = f"folder:{root}"
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 4, 1, 2
  for k, v in kw.items():
    node = c
    *parents, last = k.split(".")
    for p in parents:
      node = node[p]
    node[last] = v
  return c


def losses(workdir):
  return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
          if "loss" in r}


def snapshot(path: pathlib.Path) -> dict:
  return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
          for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """(folder, workdir): a pretraining run on the folder stopped at step 2 (checkpoint 2)."""
  base = tmp_path_factory.mktemp("identity")
  folder = make_folder(base / "images")
  work = base / "work"
  out = pretrain.train_and_evaluate(config(folder, max_steps_per_run=2), str(work))
  assert out["summary"]["status"] == "stopped" and out["summary"]["steps"] == 2
  return folder, work


@pytest.fixture(scope="module")
def uninterrupted(stopped, tmp_path_factory):
  """The losses of the same run trained to the end in one go."""
  work = tmp_path_factory.mktemp("uninterrupted")
  pretrain.train_and_evaluate(config(stopped[0]), str(work))
  return losses(work)


@pytest.fixture
def copies(stopped, tmp_path):
  """(the folder, a copy of the stopped workdir), to change: the folder stays at the path
  the run was trained from (the test changes it in place; it is restored afterwards)."""
  folder, work = stopped
  shutil.copytree(folder, tmp_path / "kept")
  shutil.copytree(work, tmp_path / "work")
  yield folder, tmp_path / "work"
  shutil.rmtree(folder, ignore_errors=True)
  shutil.copytree(tmp_path / "kept", folder)


def refusal(folder, work, step=2, **kw) -> str:
  before = snapshot(work)
  with pytest.raises(WorkdirError) as e:
    pretrain.train_and_evaluate(config(folder, **kw), str(work))
  assert snapshot(work) == before  # config.json included
  message = str(e.value)
  assert message.startswith(f"--workdir={work} holds a run (checkpoint {work}/checkpoints/{step}) "
                            f"trained on other data than this command reads: ")
  assert "--config.data.allow_changed=True" in message and message.endswith(UNCHANGED)
  return message


def test_the_checkpoint_records_the_data(stopped):
  folder, work = stopped
  meta = ckpt_lib.read_meta(rundir.newest_checkpoint(work))
  assert meta["data"] == identity.of(data.get_source(f"folder:{folder}"))
  assert meta["data"]["examples"] == 16 and meta["data"]["classes"] == list(CLASSES)


def test_deleted_files_are_refused_and_allow_changed_goes_on_with_a_warning(copies, caplog):
  # (a) of the issue: files deleted between a stop and the resume.
  folder, work = copies
  for k in range(4):
    (folder / "dog" / f"{k:02d}.jpg").unlink()
  message = refusal(folder, work)
  assert ": examples 16 -> 12;" in message, message
  caplog.clear()
  out = pretrain.train_and_evaluate(config(folder, **{"data.allow_changed": True}), str(work))
  assert out["summary"]["status"] == "finished"
  warned = [r.getMessage() for r in caplog.records if "data.allow_changed=True" in r.getMessage()]
  assert warned and "examples 16 -> 12" in warned[0] and "checkpoints/2" in warned[0]
  assert any(r.levelname == "WARNING" for r in caplog.records
             if "data.allow_changed=True" in r.getMessage())
  # Its checkpoints record the data it went on with: the same command resumes without it.
  assert ckpt_lib.read_meta(rundir.newest_checkpoint(work))["data"]["examples"] == 12


def test_a_renamed_class_folder_is_refused_naming_both_classes(copies):
  # (b) of the issue: labels and the epoch permutation would move.
  folder, work = copies
  (folder / "cat").rename(folder / "ant")
  message = refusal(folder, work)
  assert "class 'ant' appeared and class 'cat' disappeared" in message, message


def test_a_renamed_file_is_refused_as_another_file_list(copies):
  folder, work = copies
  (folder / "cat" / "03.jpg").rename(folder / "cat" / "03b.jpg")
  message = refusal(folder, work)
  assert "the file list differs (16 files now, 16 before)" in message, message


def test_the_same_data_under_another_path_continues_the_same_run(copies, uninterrupted):
  folder, work = copies
  moved = work.parent / "moved" / "images"
  moved.parent.mkdir()
  folder.rename(moved)
  pretrain.train_and_evaluate(config(moved), str(work))
  got = losses(work)
  assert sorted(got) == [1, 2, 3, 4]
  for s in (3, 4):
    assert got[s] == uninterrupted[s], (s, got[s], uninterrupted[s])
  assert rundir.read_config(work)["data"]["source"] == f"folder:{moved}"
  # Moved and changed: the identity still refuses (the finished run's last checkpoint).
  (moved / "dog" / "00.jpg").unlink()
  assert ": examples 16 -> 15;" in refusal(moved, work, step=4)


def _strip_data_record(work: pathlib.Path) -> None:
  """Makes the workdir one of a version without the record: no `data` in the meta item."""
  step_dir = rundir.newest_checkpoint(work)
  for f in (step_dir / rundir.META_ITEM).iterdir():
    try:
      meta = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError):
      continue
    if isinstance(meta, dict) and "data" in meta:
      del meta["data"]
      f.write_text(json.dumps(meta))
  assert "data" not in ckpt_lib.read_meta(step_dir)


def test_an_old_checkpoint_without_the_record_resumes_with_a_warning(copies, uninterrupted,
                                                                      caplog):
  folder, work = copies
  _strip_data_record(work)
  # Its data's location stays a trajectory field: nothing says the moved data is the same.
  with pytest.raises(WorkdirError, match=r"data\.source \('folder:"):
    preflight.check_workdir(config(folder.parent / "elsewhere"), str(work),
                            run_metadata=pretrain.run_metadata)
  caplog.clear()
  pretrain.train_and_evaluate(config(folder), str(work))
  assert any("records no identity of its training data" in r.getMessage()
             and r.levelname == "WARNING" for r in caplog.records)
  got = losses(work)
  assert [got[s] for s in (3, 4)] == [uninterrupted[s] for s in (3, 4)]
  assert "data" in ckpt_lib.read_meta(rundir.newest_checkpoint(work))  # recorded from now on


def test_the_cli_refuses_with_exit_2_and_one_sentence(copies):
  folder, work = copies
  for k in range(2):
    (folder / "cat" / f"{k:02d}.jpg").unlink()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2),
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  r = subprocess.run([sys.executable, "-m", "adpe_jax.main",
                      f"--config={ROOT}/configs/vitb_ape.py:smoke",
                      "--config.model.scan_blocks=False", f"--config.data.source=folder:{folder}",
                      "--config.total_steps=4", "--config.log_every_steps=1",
                      "--config.checkpoint_every_steps=2", f"--workdir={work}"],
                     env=env, capture_output=True, text=True, timeout=240)
  assert r.returncode == 2, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "examples 16 -> 14" in errors[0] and "compiled the train step" not in r.stderr


# -- the identity itself: cheap, path-free, one phrase per change ------------------------------

def test_identity_of_each_source_kind(tmp_path):
  folder = make_folder(tmp_path / "a")
  a = identity.of(data.get_source(f"folder:{folder}"))
  shutil.copytree(folder, tmp_path / "b")
  assert identity.of(data.get_source(f"folder:{tmp_path / 'b'}")) == a  # the path is not in it
  assert set(a) == {"kind", "examples", "classes", "files"}
  synthetic = identity.of(data.get_source("synthetic", num_examples=32, num_classes=4))
  assert synthetic["examples"] == 32 and synthetic["classes"] == 4
  arrays = identity.of(data.ArraySource(np.zeros((5, 4, 4), np.uint8), np.arange(5) % 2))
  assert arrays["kind"] == "arrays" and arrays["examples"] == 5
  out = tmp_path / "prepared"
  prepare.prepare(data.get_source(f"folder:{folder}"), str(out), short_side=32, num_shards=2)
  p = identity.of(data.get_source(f"prepared:{out}"))
  assert p["kind"] == "prepared" and p["examples"] == 16 and p["classes"] == list(CLASSES)
  shutil.copytree(out, tmp_path / "prepared2")
  assert identity.of(data.get_source(f"prepared:{tmp_path / 'prepared2'}")) == p


def test_changes_say_what_changed():
  old = {"kind": "folder", "examples": 64, "classes": ["a", "b"], "files": "x"}
  assert identity.changes(old, dict(old)) == []
  assert identity.changes(old, dict(old, examples=54, files="y")) == ["examples 64 -> 54"]
  assert identity.changes(old, dict(old, classes=["a", "c"], files="y")) == [
      "class 'c' appeared and class 'b' disappeared"]
  assert identity.changes(old, dict(old, files="y")) == [
      "the file list differs (64 files now, 64 before)"]
  assert identity.changes(old, {"kind": "prepared", "examples": 64}) == [
      "the data is a prepared source now, a folder source before"]


def test_every_training_task_opens_its_data_through_the_skeleton():
  # The same check for every task that trains: the skeleton opens `Task.source`.
  for task in (pretrain.TASK, finetune.TASK, linprobe.TASK):
    assert task.source is not None, task.name
  assert preflight.free("data.allow_changed") and not preflight.free("data.dir")
