"""adpe_jax.weights: one loader for our checkpoints and the original's / MAE's .pth, and
the fine-tune classifier initialised from them.

The original's fine-tuned classifiers (tests/data/finetune_*.npz, written by the
original's code: tests/data/make_finetune_vectors.py) are read back from a `.pth` as the
original saves it, and our classifier's logits on the same images are compared with the
original's, in float64 (float32 for pe_type 2, as the original computes it).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adpe_jax import weights
from adpe_jax.config import finetune as finetune_config
from adpe_jax.checkpoint import Checkpointer
from adpe_jax.errors import CheckpointError, InitError
from adpe_jax.train.state import build_classifier, init_classifier_params
from conftest import DATA

# The original's --pe_type in our fields (model.pe, model.rpe_lookup).
PE = {0: "ape", 1: "rpe", 2: "rpe"}
LOOKUP = {0: "integer", 1: "integer", 2: "continuous"}

FINETUNE = {  # file: (pe_type, global_pool, float64?)
    "finetune_pe0": (0, True, True), "finetune_pe1": (1, True, True),
    "finetune_pe2": (2, True, False), "finetune_pe0_cls": (0, False, True),
    "finetune_pe1_cls": (1, False, True),
}


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def _original_pth(name, tmp_path, with_args=True):
  """The reference classifier as the original's save_model writes it."""
  torch = pytest.importorskip("torch")
  ref = dict(np.load(DATA / f"{name}.npz"))
  pe_type, global_pool, _ = FINETUNE[name]
  sd = {k: torch.from_numpy(v) for k, v in ref.items() if k not in ("images", "logits")}
  ckpt = {"model": sd, "epoch": 99}
  if with_args:
    ckpt["args"] = argparse.Namespace(pe_type=pe_type, global_pool=global_pool, nb_classes=10)
  path = tmp_path / "checkpoint-99.pth"
  torch.save(ckpt, path)
  return path, ref


def _classifier(pe_type, global_pool, init, num_classes=10):
  c = finetune_config.recipe("test", PE[pe_type], "smoke", rpe_lookup=LOOKUP[pe_type])
  meta = json.loads((DATA / "finetune_pe0.json").read_text())["model"]
  assert (c.image_size, c.model.patch_size, c.data.num_classes) == (
      meta["img_size"], meta["patch_size"], meta["num_classes"])
  c.model.global_pool, c.init, c.data.num_classes = global_pool, str(init), num_classes
  assert c.model.rpe_query == "unscaled"  # the original's iRPE query (spec 9.2)
  model = build_classifier(c)
  return c, model


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("name", sorted(FINETUNE))
def test_original_finetuned_classifier_gives_its_logits(name, tmp_path, x64):
  pe_type, global_pool, f64 = FINETUNE[name]
  path, ref = _original_pth(name, tmp_path)
  dtype = jnp.float64 if f64 else jnp.float32
  c, model = _classifier(pe_type, global_pool, path)
  fresh = jax.tree.map(lambda a: a.astype(dtype),
                       model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"])
  params, info = weights.init_classifier(c, model, fresh)
  assert (info["init_kind"], info["init_head"]) == ("original_finetune", "loaded")
  images = ref["images"].transpose(0, 2, 3, 1).astype(dtype)
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
  assert logits.dtype == dtype
  assert _rel_err(logits, ref["logits"]) < (1e-10 if f64 else 2e-5)


def test_pth_kinds_and_what_load_returns(tmp_path):
  path, ref = _original_pth("finetune_pe1", tmp_path)
  w = weights.load(path)
  assert (w.kind, w.source, w.run, w.adversary) == ("original_finetune", str(path), {}, {})
  assert sorted(w.params) == ["blocks_0", "blocks_1", "cls_token", "fc_norm", "head",
                              "patch_embed", "pos_embed"]
  np.testing.assert_array_equal(w.params["head"]["kernel"], ref["head.weight"].T)
  np.testing.assert_array_equal(w.pos_embed, ref["pos_embed"][0])
  assert weights.metadata(path) is None
  # Without the original's args, an APE classifier is MAE's model (the same tensors).
  path, _ = _original_pth("finetune_pe0", tmp_path, with_args=False)
  assert weights.load(path).kind == "mae"


def test_pretraining_pth_keeps_a_fresh_head(tmp_path):
  """The original's pretraining .pth (the fidelity test's reference weights) loads its
  encoder; head and fc_norm stay as initialised, pos_embed is its fixed 7x7 table."""
  torch = pytest.importorskip("torch")
  ref = dict(np.load(DATA / "rpe_adv2.npz"))
  sd = {k: torch.from_numpy(v) for k, v in ref.items() if not k.startswith("grad/") and k
        not in ("images", "noise", "ids_shuffle", "loss", "pred", "mask", "latent")}
  path = tmp_path / "checkpoint-399.pth"
  torch.save({"model": sd}, path)
  w = weights.load(path)
  assert w.kind == "original_pretrain" and "pos_embed" not in w.params
  assert "decoder_embed" in w.params and w.adversary["blocks_0"]["attn"]["rpe_k"]["adv_shift"].shape == (2,)
  c = finetune_config.recipe("test", "rpe", "smoke", rpe_lookup="continuous")
  c.model.variant, c.init = "reference", str(path)    # the vectors' 64-wide encoder
  model = build_classifier(c)
  fresh = jax.jit(lambda k: init_classifier_params(model, k))(jax.random.key(0))
  params, info = weights.init_classifier(c, model, fresh)
  assert (info["init_kind"], info["init_head"], info["init_pos_grid"]) == (
      "original_pretrain", "fresh", 7)
  for name in ("head", "fc_norm"):
    jax.tree.map(np.testing.assert_array_equal, params[name], fresh[name])
  np.testing.assert_array_equal(params["blocks_1"]["attn"]["qkv"]["kernel"],
                                ref["blocks.1.attn.qkv.weight"].T)
  np.testing.assert_allclose(params["pos_embed"][0], ref["pos_embed"][0], atol=1e-7)


def test_a_head_of_another_pooling_stays_fresh(tmp_path):
  path, ref = _original_pth("finetune_pe0_cls", tmp_path)   # a cls-token classifier
  c, model = _classifier(0, True, path)                      # into a global-pool one
  fresh = jax.jit(lambda k: init_classifier_params(model, k))(jax.random.key(0))
  params, info = weights.init_classifier(c, model, fresh)
  assert info["init_head"] == "fresh"
  for name in ("head", "fc_norm"):
    jax.tree.map(np.testing.assert_array_equal, params[name], fresh[name])
  np.testing.assert_array_equal(params["cls_token"], ref["cls_token"].astype(np.float32))


# -- our checkpoints ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Checkpoints at steps 1 and 2 (params + 1) with run metadata."""
  wd = tmp_path_factory.mktemp("run")
  params = {"cls_token": np.arange(8, dtype=np.float32).reshape(1, 1, 8),
            "blocks_0": {"norm1": {"scale": np.ones(8, np.float32)}}}
  later = jax.tree.map(lambda a: a + 1, params)
  with Checkpointer(str(wd), 1, metadata={"model": {"patch_size": 4}, "image_size": 8}) as ck:
    ck.maybe_save(1, {"params": params, "opt": np.zeros(3, np.float32)}, force=True)
    ck.maybe_save(2, {"params": later, "opt": np.zeros(3, np.float32)}, force=True)
  return wd, params, later


def test_workdir_checkpoints_dir_and_step_dir(workdir):
  wd, first, later = workdir
  for path, step, want in ((wd, 2, later), (wd / "checkpoints", 2, later),
                           (wd / "checkpoints" / "1", 1, first)):
    w = weights.load(str(path))
    assert (w.kind, w.source) == ("ours", str(wd / "checkpoints" / str(step)))
    assert sorted(w.params) == ["blocks_0", "cls_token"]   # the optimizer state is not read
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), w.params, want)
    assert w.run == {"model": {"patch_size": 4}, "image_size": 8}
    assert weights.metadata(str(path)) == w.run
    assert w.pos_embed.shape == (1 + 2 * 2, 8)               # the 2x2 grid's sin-cos table


def test_errors_name_the_path(workdir, tmp_path):
  wd, _, _ = workdir
  for path, needle in ((tmp_path / "none", "does not exist"),
                       (tmp_path, "holds no checkpoint of ours")):
    for fn in (weights.load, weights.metadata):
      with pytest.raises(CheckpointError, match=needle) as e:
        fn(str(path))
      assert str(path) in str(e.value) and str(e.value).count(". ") == 0
  bad = tmp_path / "bad"
  shutil.copytree(wd, bad)   # well-formed files of step 1 under step 2's checksums
  shutil.rmtree(bad / "checkpoints" / "2" / "state")
  shutil.copytree(bad / "checkpoints" / "1" / "state", bad / "checkpoints" / "2" / "state")
  with pytest.raises(CheckpointError, match="checksum") as e:
    weights.load(str(bad))
  assert str(bad / "checkpoints" / "2") in str(e.value)
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a torch file")
  pytest.importorskip("torch")
  with pytest.raises(CheckpointError, match="could not be read by torch.load"):
    weights.load(str(junk))


def test_init_error_is_one_sentence(tmp_path):
  c, model = _classifier(0, True, tmp_path / "none.pth")
  fresh = jax.eval_shape(lambda: init_classifier_params(model, jax.random.key(0)))
  with pytest.raises(InitError, match=r"config field init=.*none.pth.* does not exist\.$"):
    weights.init_classifier(c, model, fresh)


# -- beside a live trainer: the checkpoint being read is deleted (issue 28 item 10) -----------

def _params_at(step):
  return {"cls_token": np.full((1, 1, 8), float(step), np.float32),
          "blocks_0": {"norm1": {"scale": np.arange(8, dtype=np.float32) * step}}}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
  """Checkpoints 1, 2, 3 whose params are `_params_at(step)`."""
  wd = tmp_path_factory.mktemp("live")
  with Checkpointer(str(wd), 1, keep=3, metadata={"model": {"patch_size": 4},
                                                  "image_size": 8}) as ck:
    for step in (1, 2, 3):
      ck.maybe_save(step, {"params": _params_at(step), "opt": np.zeros(3, np.float32)},
                    force=True)
      ck.wait()
  return wd


@pytest.fixture
def live(three_steps, tmp_path):
  wd = tmp_path / "live"
  shutil.copytree(three_steps, wd)
  return wd


def _on_open(monkeypatch, item, act):
  """Calls act(step directory) when the reader opens `item` ("state": the arrays, "meta":
  the run metadata) of a checkpoint, before the files are read: a trainer's deletion at
  that moment."""
  import orbax.checkpoint as ocp
  cls, name = ((ocp.PyTreeCheckpointer, "metadata") if item == "state"
               else (ocp.JsonCheckpointHandler, "restore"))
  real = getattr(cls, name)
  def opened(self, directory, *a, **kw):
    act(pathlib.Path(str(directory)).parent)
    return real(self, directory, *a, **kw)
  monkeypatch.setattr(cls, name, opened)


def _delete_once(step):
  done = []
  def act(step_dir):
    if step_dir.name == str(step) and not done:
      done.append(step)
      shutil.rmtree(step_dir)
  return act


@pytest.mark.parametrize("item", ["state", "meta"])
def test_a_checkpoint_deleted_while_read_falls_back_to_the_newest_complete_one(
    live, monkeypatch, caplog, item):
  _on_open(monkeypatch, item, _delete_once(3))
  with caplog.at_level("WARNING"):
    w = weights.load(str(live))
  assert w.source == str(live / "checkpoints" / "2")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), w.params,
               _params_at(2))                                    # what was saved at step 2
  said = [r.getMessage() for r in caplog.records if "deleted while it was read" in r.getMessage()]
  assert len(said) == 1 and said[0].endswith("instead, step 2"), said
  assert f"checkpoint {live}/checkpoints/3 " in said[0]


def test_the_run_metadata_read_falls_back_too(live, monkeypatch):
  _on_open(monkeypatch, "meta", _delete_once(3))
  assert weights.metadata(str(live)) == {"model": {"patch_size": 4}, "image_size": 8}
  assert not (live / "checkpoints" / "3").exists()


def test_a_trainer_that_keeps_deleting_is_named_with_what_to_do(live, monkeypatch):
  # Each opened checkpoint is overtaken by a newer one (a copy) and deleted, as a trainer
  # saving every step with keep_checkpoints=1 does: five tries, then one sentence.
  def overtake(step_dir):
    newer = step_dir.parent / str(int(step_dir.name) + 1)
    if not newer.exists():
      shutil.copytree(step_dir, newer)
    shutil.rmtree(step_dir)
  _on_open(monkeypatch, "state", overtake)
  with pytest.raises(CheckpointError) as e:
    weights.load(str(live))
  assert str(e.value) == (
      f"the checkpoints of {live} were deleted while they were read, 5 time(s) in a row "
      f"(steps 3, 4, 5, 6, 7): the run training in that workdir keeps deleting them (config "
      f"field keep_checkpoints); read it once that run has stopped, or start that run with "
      f"a larger keep_checkpoints, or pass a copy of one of its checkpoints/<step> "
      f"directories; nothing on disk was changed.")


def test_when_every_checkpoint_is_deleted_the_same_sentence_names_them(live, monkeypatch):
  _on_open(monkeypatch, "state", shutil.rmtree)
  with pytest.raises(CheckpointError, match=r"deleted while they were read, 3 time\(s\) in a "
                                            r"row \(steps 3, 2, 1\): the run training"):
    weights.load(str(live))


def test_a_named_step_deleted_while_read_is_said(live, monkeypatch):
  _on_open(monkeypatch, "state", _delete_once(2))
  with pytest.raises(CheckpointError, match=rf"^checkpoint {live}/checkpoints/2 was deleted "
                                            rf"while it was read "):
    weights.load(str(live / "checkpoints" / "2"))


def test_a_damaged_checkpoint_that_stays_is_called_damaged(live, monkeypatch):
  # The newest checkpoint's array data truncated, nothing deleted: no fallback to step 2.
  data = max((live / "checkpoints" / "3" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
  with open(data, "r+b") as f:
    f.truncate(data.stat().st_size // 3)
  with pytest.raises(CheckpointError, match=rf"^checkpoint {live}/checkpoints/3 .*; its files "
                                            rf"may be truncated or corrupt, nothing on disk "
                                            rf"was changed\.$") as e:
    weights.load(str(live))
  assert "deleted" not in str(e.value)
  assert (live / "checkpoints" / "3").is_dir()
