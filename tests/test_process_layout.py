"""The same run on 2 processes x 1 device as on 1 process x 2 devices, to the last bit (issue 28
item 2), on a folder of JPEGs with a file that does not decode (data.bad_images="skip").

Each device must hold the same rows, in the same order, in both layouts: the pipeline orders
its rows by batch shard (one per device of the batch axes), then crop, then example
(`adpe_jax.data.pipeline`). The first test checks the batches themselves, cheaply, against the
one-shard (crop-major) batch of one process; the second runs both layouts and compares every
logged metric bit for bit and the params of the checkpoint they write.
"""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from adpe_jax import data
from adpe_jax.checkpoint import checkpointer
from adpe_jax.data import bad_images
from test_multihost import env, finish, free_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP = bad_images.Policy("skip", 0.2)


def make_folder(root: pathlib.Path, per_class: int) -> pathlib.Path:
  """root/<class>/<k>.JPEG, noise JPEGs of assorted sizes (ImageNet layout)."""
  rng = np.random.default_rng(0)
  for name in ("n01440764", "n01443537"):
    (root / name).mkdir(parents=True)
    for k in range(per_class):
      h, w = rng.integers(30, 70, 2)
      pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / name / f"{k:02d}.JPEG", quality=90)
  return root


def break_file(path: str) -> None:
  pathlib.Path(path).write_bytes(b"\xff\xd8 not a JPEG")


def test_batches_per_device_do_not_depend_on_the_process_count(tmp_path):
  source = data.get_source(f"folder:{make_folder(tmp_path / 'images', 16)}", "train")
  break_file(source.paths[int(data.epoch_permutation(0, 0, len(source))[3])])  # step 0
  batch, crops, shards = 28, 4, 4     # 7 examples a shard: thread chunks cut across shards
  kw = dict(seed=0, num_threads=2, bad_images=SKIP)
  with data.PretrainPipeline(source, batch, 16, crops, **kw) as one_shard, \
       data.PretrainPipeline(source, batch, 16, crops, num_shards=shards, **kw) as one, \
       data.PretrainPipeline(source, batch, 16, crops, process_index=0, process_count=2,
                             num_shards=shards, output="uint8", **kw) as p0, \
       data.PretrainPipeline(source, batch, 16, crops, process_index=1, process_count=2,
                             num_shards=shards, output="uint8", **kw) as p1:
    for step in (0, 1):
      ref = one_shard.get_batch(step)   # crop-major: row k * batch + e, id = that row
      np.testing.assert_array_equal(ref["ids"], np.arange(crops * batch))
      assert step > 0 or ref["bad_images"] == 1
      got = one.get_batch(step)
      two = [p0.get_batch(step), p1.get_batch(step)]
      # What device d holds: rows [d * R, (d + 1) * R), crop k of its 7 examples in turn.
      per = batch // shards
      want = np.array([k * batch + d * per + i for d in range(shards) for k in range(crops)
                       for i in range(per)])
      np.testing.assert_array_equal(got["ids"], want)
      np.testing.assert_array_equal(got["images"], ref["images"][want])
      np.testing.assert_array_equal(np.concatenate([b["ids"] for b in two]), want)
      np.testing.assert_array_equal(data.normalize(np.concatenate([b["images"] for b in two])),
                                    ref["images"][want])


def _run(workdir, devices, overrides, process=None, port=None):
  cmd = [sys.executable, "-m", "adpe_jax.main", "--config=configs/vitb_ape.py:smoke",
         f"--workdir={workdir}", *overrides]
  if process is not None:
    cmd += [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={process}"]
  return subprocess.Popen(cmd, cwd=ROOT, env=env(devices), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def _records(workdir) -> list:
  timing = ("img_per_s", "tflops_per_device")
  return [{k: v for k, v in r.items() if k not in timing}
          for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]


def test_two_processes_by_one_device_equal_one_by_two_on_a_folder(tmp_path):
  """2 steps of 8 images: step 1 reads good files only, step 2 one that does not decode."""
  root = make_folder(tmp_path / "images", 8)
  source = data.get_source(f"folder:{root}", "train")
  break_file(source.paths[int(data.epoch_permutation(0, 0, len(source))[12])])  # step 2
  overrides = [f"--config.data.source=folder:{root}", "--config.data.bad_images=skip",
               "--config.data.max_bad_fraction=0.2", "--config.total_steps=2",
               "--config.log_every_steps=1", "--config.checkpoint_every_steps=2"]
  port = free_port()
  procs = [_run(tmp_path / "one", 2, overrides)]
  procs += [_run(tmp_path / "two", 1, overrides, i, port) for i in (0, 1)]
  for i, (rc, err) in enumerate(finish(procs)):
    assert rc == 0, f"run {i}: {err[-3000:]}"
  one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
  assert [r.get("bad_images") for r in one if "loss" in r] == [0, 1]
  assert one == two      # losses, grad norms, lr, the bad-image count: to the last bit
  saved = [tmp_path / w / "checkpoints" / "2" for w in ("one", "two")]
  metas = [checkpointer.read_meta(s) for s in saved]
  assert metas[0]["checksums"] == metas[1]["checksums"]   # the whole state
  params = [checkpointer.read_params(s) for s in saved]
  for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
