"""Sharding from config: FSDP over a (data, fsdp) mesh gives the losses of pure data
parallelism, each device holds its part of every sharded tensor, runs resume across the
two layouts; remat and bf16 train as the float32 step does."""

import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from adpe_jax.errors import ConfigError
from adpe_jax import parallel
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.train.pretrain import build_training, train_and_evaluate

MIN_SIZE = 1024  # the smoke model's kernels are small: shard everything from 1K elements


def smoke_config(**kw):
  c = pretrain_config.apply_smoke(pretrain_config.base_config())
  c.mesh.fsdp_min_size = MIN_SIZE
  c.blr = 1.5e-2
  for k, v in kw.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


@pytest.fixture(scope="module")
def batches():
  """Three real Fashion-MNIST multi-crop batches, with their ids (masks follow ids)."""
  from adpe_jax import data
  c = smoke_config()
  pipe = data.PretrainPipeline(data.get_source("fashion_mnist", "train"), c.batch_size,
                               c.image_size, c.num_crops, seed=0, num_threads=2)
  out = [pipe.get_batch(s) for s in range(3)]
  pipe.close()
  return out


def trajectory(config, mesh, batches):
  setup = build_training(config, mesh, total_steps=10, steps_per_epoch=5)
  state, losses = setup["state"], []
  for b in batches:
    state, m = setup["train_step"](state, parallel.global_batch(b, mesh), setup["step_key"])
    losses.append(float(m["loss"]))
  return losses, state, setup


def test_fsdp_matches_data_parallel_and_shards_every_big_tensor(batches):
  c = smoke_config(**{"adversary.kind": "coordinate", "model.pe": "rpe"})
  l_data, s_data, _ = trajectory(c, parallel.make_mesh(data=4), batches)
  l_fsdp, s_fsdp, setup = trajectory(c, parallel.make_mesh(fsdp=4), batches)
  np.testing.assert_allclose(l_fsdp, l_data, rtol=1e-5)
  assert l_data[-1] < l_data[0]
  sharded = 0
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(s_fsdp),
                          jax.tree.leaves(s_data)):
    name = jax.tree_util.keystr(path)
    spec = x.sharding.spec
    big = x.ndim >= 2 and x.size >= MIN_SIZE and any(d % 4 == 0 for d in x.shape)
    assert ("fsdp" in tuple(spec)) == big, (name, x.shape, spec)
    if big:
      sharded += 1
      axis = tuple(spec).index("fsdp")
      assert x.shape[axis] == max(d for d in x.shape if d % 4 == 0)   # the largest axis
      want = tuple(d // 4 if i == axis else d for i, d in enumerate(x.shape))
      shards = x.addressable_shards
      assert len(shards) == 4 and all(s.data.shape == want for s in shards), name
      assert len({str(s.index) for s in shards}) == 4     # four different quarters
    else:
      assert all(s.data.shape == x.shape for s in x.addressable_shards), name
    assert y.sharding.spec == P() or y.ndim == 0 or "fsdp" not in tuple(y.sharding.spec)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-6, err_msg=name)
  # kernels of qkv, proj, fc1, fc2 in 3 blocks, decoder_embed, decoder_pred, patch_embed,
  # each with AdamW mu and nu: many tensors are sharded
  assert sharded >= 3 * (4 * 3 + 3)
  overview = parallel.sharding_overview(s_fsdp, setup["state_sharding"])
  assert "fsdp" in overview and len(overview.splitlines()) <= 15


def test_resume_across_data_and_fsdp_layouts(tmp_path):
  straight = train_and_evaluate(smoke_config(total_steps=4, log_every_steps=1),
                                str(tmp_path / "a"))
  w = str(tmp_path / "b")
  train_and_evaluate(smoke_config(total_steps=4, log_every_steps=1, max_steps_per_run=2), w)
  resumed = train_and_evaluate(
      smoke_config(total_steps=4, log_every_steps=1, **{"mesh.fsdp": 4}), w)
  a = {r["step"]: r["loss"] for r in straight["history"]}
  b = {r["step"]: r["loss"] for r in resumed["history"]}
  assert sorted(b) == [3, 4]
  for s in (3, 4):
    assert b[s] == pytest.approx(a[s], rel=1e-5)
  assert any("fsdp" in tuple(x.sharding.spec) for x in jax.tree.leaves(resumed["state"].params))


def test_remat_and_bfloat16(batches):
  mesh = parallel.make_mesh(jax.devices()[:1])
  c = smoke_config(**{"adversary.kind": "coordinate", "adversary.lr": 0.05})
  l_none, s_none, _ = trajectory(c, mesh, batches)
  c_remat = smoke_config(**{"adversary.kind": "coordinate", "adversary.lr": 0.05,
                            "model.remat": "block"})
  l_remat, _, _ = trajectory(c_remat, mesh, batches)
  np.testing.assert_allclose(l_remat, l_none, rtol=1e-5)
  # bf16 compute: float32 master weights and adversary; the loss falls; the APE coordinate
  # adversary moves (its shift is applied in float32, so small steps are not rounded away).
  c16 = smoke_config(**{"adversary.kind": "coordinate", "adversary.lr": 0.05,
                        "model.dtype": "bfloat16"})
  l16, s16, _ = trajectory(c16, mesh, batches * 2)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(s16.params))
  shift = np.asarray(s16.adversary["adv_token"])
  assert shift.dtype == np.float32 and np.all(np.abs(shift) > 1e-4), shift
  assert l16[-1] < l16[0], l16
  assert abs(l16[0] - l_none[0]) < 0.02 * l_none[0]


@pytest.mark.parametrize("data,fsdp,needle", [(3, 1, "mesh.data=3 x mesh.fsdp=1"),
                                              (-1, 3, "mesh.data=-1 x mesh.fsdp=3"),
                                              (-1, -1, "both -1"), (0, 1, "mesh.data=0")])
def test_bad_mesh_is_one_sentence(data, fsdp, needle):
  with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
    parallel.make_mesh(data=data, fsdp=fsdp)


def test_fsdp_rule():
  assert parallel.leaf_spec((768, 3072), 8) == P(None, "fsdp")
  assert parallel.leaf_spec((3072, 768), 8) == P("fsdp", None)
  assert parallel.leaf_spec((768,), 8) == P()                 # biases, LayerNorm
  assert parallel.leaf_spec((64, 50), 8, min_size=1) == P("fsdp", None)   # 50 % 8 != 0
  assert parallel.leaf_spec((10, 10), 8, min_size=1) == P()   # nothing divides
  assert parallel.leaf_spec((768, 3072), 1) == P()            # no fsdp axis
  assert parallel.leaf_spec((16, 16), 8) == P()               # small: replicated
  assert math.prod(parallel.mesh_shape(8, -1, 4)) == 8 and parallel.mesh_shape(8, 2, -1) == (2, 4)
