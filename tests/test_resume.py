"""A real run: exact resume, SIGTERM save, corrupt checkpoints, non-finite stop."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from adpe_jax import checkpoint as ckpt_lib
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.train.pretrain import step_flops, train_and_evaluate
from adpe_jax.train.state import build_model
from devices import xla_flags
from watched import Watched

ROOT = pathlib.Path(__file__).resolve().parent.parent


def fmnist_config(**kw):
  c = pretrain_config.apply_smoke(pretrain_config.base_config())
  c.data.source = "fashion_mnist"
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 6, 1, 3
  for k, v in kw.items():
    c[k] = v
  return c


def losses(workdir):
  return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
          if "loss" in r}


def adversarial_config(**kw):
  c = fmnist_config(**kw)
  c.adversary.kind = "coordinate"  # the adversary and its optimizer state resume too
  c.adversary.lr = 0.05
  return c


def test_resumed_run_is_exact_and_summaries_say_how_it_ended(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  out_a = train_and_evaluate(adversarial_config(), a)
  first = train_and_evaluate(adversarial_config(max_steps_per_run=3), b)
  assert first["summary"]["steps"] == 3
  stopped = json.loads(open(os.path.join(b, "summary.json")).read())
  assert stopped["status"] == "stopped" and stopped["steps"] == 3
  assert stopped["final_loss"] == losses(b)[3]
  c = adversarial_config()
  assert stopped["step_flops"] == step_flops(c, build_model(c)) > 0   # analytic, any accum
  out_b = train_and_evaluate(adversarial_config(), b)  # the same command again: resumes at 3
  la, lb = losses(a), losses(b)
  assert sorted(lb) == [1, 2, 3, 4, 5, 6]
  for s in (4, 5, 6):
    assert la[s] == lb[s], (s, la[s], lb[s])
  assert np.any(np.asarray(out_a["state"].adversary["adv_token"]) != 0)
  for x, y in zip(jax.tree.leaves(jax.device_get(out_a["state"])),
                  jax.tree.leaves(jax.device_get(out_b["state"]))):
    np.testing.assert_array_equal(x, y)  # params, adversary and both optimizer states
  # A finished run re-run: nothing is redone and its summary is kept as it was.
  finished = open(os.path.join(b, "summary.json")).read()
  metrics_before = open(os.path.join(b, "metrics.jsonl")).read()
  assert json.loads(finished)["status"] == "finished"
  assert json.loads(finished)["final_loss"] == lb[6]
  again = train_and_evaluate(adversarial_config(), b)
  assert again["summary"] == json.loads(finished) and again["history"] == []
  assert open(os.path.join(b, "summary.json")).read() == finished
  assert open(os.path.join(b, "metrics.jsonl")).read() == metrics_before


def test_incompatible_checkpoint_names_path_and_keeps_files(tmp_path):
  w = str(tmp_path)
  train_and_evaluate(fmnist_config(total_steps=3), w)
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  c = fmnist_config(total_steps=6)
  c.model.variant = "reference"
  with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoints/3"):
    train_and_evaluate(c, w)
  after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  assert set(before) <= set(after)


def test_corrupt_checkpoint_cli_one_sentence(tmp_path):
  w = str(tmp_path)
  train_and_evaluate(fmnist_config(total_steps=3), w)
  data_files = [p for p in (tmp_path / "checkpoints" / "3").rglob("*")
                if p.is_file() and p.stat().st_size > 1000 and "d" in p.parent.name]
  assert data_files
  for f in data_files:  # truncate every data file: no leaf can be read intact
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  victim = data_files[0]
  r = subprocess.run([sys.executable, "-m", "adpe_jax.main", "--config=configs/vitb_ape.py:smoke",
                      f"--workdir={w}", "--config.data.source=fashion_mnist",
                      # the run's own trajectory (another is refused before the restore)
                      "--config.model.scan_blocks=False", "--config.total_steps=3",
                      "--config.checkpoint_every_steps=3"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  # Background (orbax / absl) log lines may interleave: find the one error sentence.
  errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, r.stderr[-2000:]
  assert errors[0].startswith("error: checkpoint ") and "checkpoints/3" in errors[0], errors
  assert "Traceback" not in r.stderr
  assert victim.exists()


def test_sigterm_saves_current_step_and_exits_cleanly(tmp_path):
  w = str(tmp_path)
  cmd = [sys.executable, "-m", "adpe_jax.main", "--config=configs/vitb_ape.py:smoke",
         f"--workdir={w}", "--config.total_steps=100000", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=0"]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    time.sleep(0.5)
  assert metrics.exists(), "the run did not start logging"
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == "preempted"
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] == summary["steps"] >= 3


def test_non_finite_loss_stops_with_step_and_keeps_good_checkpoint(tmp_path):
  # Weight decay 12 at lr 1 overshoots: AdamW's p -= lr * wd * p multiplies the decayed
  # weights by 1 - 12 = -11 per step, so float32 overflows after a few steps,
  # deterministically (a negative weight decay, as before, is refused at start now).
  w = str(tmp_path)
  c = fmnist_config(total_steps=60, checkpoint_every_steps=2, blr=32.0, warmup_epochs=0.0,
                    weight_decay=12.0, divergence_factor=0.0)  # the non-finite stop itself
  with pytest.raises(FloatingPointError, match=r"non-finite loss or gradients at step (\d+)") as e:
    train_and_evaluate(c, w)
  bad = int(e.value.args[0].split("at step ")[1].split(";")[0])
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert (summary["status"], summary["step"]) == ("non-finite", bad)
  from adpe_jax.train.pretrain import run_metadata
  cp = ckpt_lib.Checkpointer(w, 2, metadata=run_metadata(c))
  step = cp.latest_step()
  assert step is not None and step < bad and f"checkpoints/{step}" in e.value.args[0]
  from adpe_jax import parallel
  from adpe_jax.train.pretrain import build_training
  state = build_training(c, parallel.make_mesh(), 60, 7500)["state"]
  restored = cp.restore(ckpt_lib.abstract_of(state))
  assert int(restored.step) == step
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored.params))
  cp.close()


def test_divergence_stops_at_the_first_step_above_the_factor_after_a_resume(tmp_path):
  # blr=1e2 over a 20-step warmup: the loss stays finite but jumps above 10x its first
  # value within a few steps (1e4x later), deterministically.
  kw = dict(total_steps=12, blr=1e2, warmup_epochs=20 / 7500, checkpoint_every_steps=2)
  ref = tmp_path / "ref"
  train_and_evaluate(fmnist_config(**kw, divergence_factor=0.0), str(ref))  # every step, no stop
  per_step = losses(ref)
  expected = next(s for s in sorted(per_step) if per_step[s] > 10 * per_step[1])
  # Logged every 2 steps (the checkpoints): the bad step must not open its window, so a
  # range ("between steps 3 and 4") would not do.
  assert expected % 2 == 0 and expected > 2, per_step
  w = tmp_path / "run"
  c = fmnist_config(**kw, log_every_steps=10)
  first = train_and_evaluate(fmnist_config(**kw, log_every_steps=10, max_steps_per_run=2), str(w))
  assert first["summary"]["status"] == "stopped"
  # The resumed run keeps the first run's reference (its step-1 loss), not its own first.
  with pytest.raises(FloatingPointError, match=rf"loss diverged at step {expected}; ") as e:
    train_and_evaluate(c, str(w))
  from adpe_jax.errors import AdpeError, DivergenceError
  assert isinstance(e.value, AdpeError) and isinstance(e.value, DivergenceError)
  kept = max(range(2, expected, 2))      # saved at every 2nd step before the bad one
  assert f"checkpoints/{kept};" in str(e.value) and "divergence_factor=10" in str(e.value)
  summary = json.loads((w / "summary.json").read_text())
  assert (summary["status"], summary["step"], summary["last_checkpoint_step"]) == (
      "diverged", expected, kept)
  assert summary["first_loss"] == pytest.approx(per_step[1], rel=1e-6)
  saved = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
  assert saved[-1] == kept


def test_a_failed_save_stops_the_run_at_the_next_log_step_naming_the_cause(tmp_path,
                                                                           monkeypatch):
  # Disk full while the save of step 10 is written (in orbax's background thread): the
  # meta item's write fails as a full disk makes it fail.
  import errno
  import orbax.checkpoint as ocp
  real = ocp.JsonCheckpointHandler._save_fn

  async def full_disk(self, x, directory):
    if x.get("step") == 10:
      path = directory / "metadata"
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return await real(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_disk)
  w = tmp_path
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    train_and_evaluate(fmnist_config(total_steps=30, checkpoint_every_steps=5), str(w))
  message = str(e.value)
  assert "saving checkpoint" in message and "checkpoints/10 failed" in message
  assert "No space left on device at " in message and "checkpoints/10" in message
  assert "metadata" in message.split("No space left on device at ")[1].split(";")[0]
  assert "the last complete checkpoint is " in message and message.count("checkpoints/5") == 1
  # Reported at a log step soon after (log_every_steps=1), not at the next save (15).
  logged = max(losses(w))
  assert 10 < logged < 15, logged


def test_sigterm_during_the_end_of_run_knn_saves_says_so_and_the_rerun_evaluates(tmp_path):
  # The k-NN over 20000 + 5000 Fashion-MNIST images takes seconds: long enough to be
  # interrupted; the trained state is saved before it.
  args = ["--config=configs/vitb_ape.py:smoke", f"--workdir={tmp_path}",
          "--config.data.source=fashion_mnist", "--config.total_steps=4",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=0",
          "--config.eval.knn_source=fashion_mnist", "--config.eval.knn_train_examples=20000",
          "--config.eval.knn_test_examples=5000"]
  summary = lambda: json.loads((tmp_path / "summary.json").read_text())  # noqa: E731
  # One device: no collectives to time out on a loaded CPU while a k-NN is interrupted.
  one = dict(os.environ, XLA_FLAGS=xla_flags(1))
  # 1. During the k-NN of the last step (inside the loop).
  run = Watched(args, env=one)
  run.wait_for("step 4 loss")
  run.proc.send_signal(signal.SIGTERM)
  rc, err = run.finish()
  assert rc == 0, err[-3000:]
  assert "got SIGTERM during the evaluation at step 4" in err, err[-3000:]
  assert summary()["status"] == "preempted" and summary()["steps"] == 4
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["4"]
  assert not loop_records(tmp_path, "knn_top1")
  # 2. The same command: nothing left to train; its end-of-run k-NN is interrupted too.
  run = Watched(args, env=one)
  run.wait_for("end-of-run k-NN (")
  run.proc.send_signal(signal.SIGTERM)
  rc, err = run.finish()
  assert rc == 0, err[-3000:]
  assert "got SIGTERM during the end-of-run k-NN" in err.splitlines()[-1] or any(
      "got SIGTERM during the end-of-run k-NN" in l for l in err.splitlines()[-5:]), err[-3000:]
  assert (summary()["status"], summary()["evaluation"]) == ("preempted", "interrupted")
  # 3. Once more, uninterrupted: the evaluation is done and the run is finished (a smaller
  # k-NN: the evaluation's fields may change on resume, they change no step).
  small = [a for a in args if "knn_t" not in a] + [
      "--config.eval.knn_train_examples=2000", "--config.eval.knn_test_examples=500"]
  r = subprocess.run([sys.executable, "-m", "adpe_jax.main", *small], cwd=ROOT, env=one,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert summary()["status"] == "finished" and 0 < summary()["knn_top1"] <= 1
  assert "knn_top1_random_init" in summary() and "evaluation" not in summary()


def loop_records(workdir, key):
  from adpe_jax.train import loop
  return loop.logged_records(workdir, key)
