"""The input's throughput options keep its contract: worker processes, JPEG fast paths, prepare,
uint8 crops normalised on the device.

References: `get_batch` of the faithful in-process pipeline (itself checked against torchvision
and Pillow in test_data.py), Pillow's own decode, hand-computed DCT reductions, the files
`prepare` was given. Images are Fashion-MNIST mosaics (real pictures, large enough to crop)
written as JPEG files in an ImageFolder tree.
"""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from adpe_jax import data, parallel
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.data import jpeg, multicrop, prepare, workers
from adpe_jax.errors import DataError
from adpe_jax.train.pretrain import build_training
from adpe_jax.train.step import normalize_on_device


def _mosaic(fmnist, rng, height, width):
  """An RGB picture of Fashion-MNIST items (each tinted), resized to (height, width)."""
  tiles = fmnist.images[rng.integers(0, len(fmnist), 12)]
  grid = np.concatenate([np.concatenate(list(tiles[r * 4:(r + 1) * 4]), axis=1)
                         for r in range(3)], axis=0)  # (84, 112)
  tint = rng.uniform(0.5, 1.0, 3)
  rgb = (grid[:, :, None] * tint).astype(np.uint8)
  return Image.fromarray(rgb).resize((width, height), Image.BICUBIC)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
  """24 JPEGs, 3 classes, sides 90-300, qualities 75-95, one PNG among them."""
  fmnist = data.get_source("fashion_mnist", "train")
  root = tmp_path_factory.mktemp("jpegs")
  rng = np.random.default_rng(0)
  for i in range(24):
    folder = root / f"class{i % 3}"
    folder.mkdir(exist_ok=True)
    h, w = int(rng.integers(90, 300)), int(rng.integers(90, 300))
    image = _mosaic(fmnist, rng, h, w)
    if i == 5:
      image.save(folder / f"{i:03d}.png")
    else:
      image.save(folder / f"{i:03d}.JPEG", quality=int(rng.integers(75, 96)))
  return str(root)


# -- worker processes ---------------------------------------------------------------------------

class FailingSource(data.ArraySource):
  """An in-memory source whose example `bad` cannot be read (defined here: workers unpickle it)."""

  def __init__(self, images, bad):
    super().__init__(images)
    self.bad = bad

  def __getitem__(self, index):
    if index == self.bad:
      raise DataError(f"example {index} is unreadable")
    return super().__getitem__(index)


def test_worker_processes_give_get_batch_in_order_and_restart_exactly():
  source = data.get_source("synthetic:40", "train", num_examples=48)
  with data.PretrainPipeline(source, 8, 24, 2, seed=3, num_workers=2, prefetch=2) as pipe:
    got = list(pipe.iterate(4, 7))  # crosses the epoch boundary (6 steps per epoch)
    abandoned = pipe.iterate(0)      # left with requests in flight,
    next(abandoned)
    abandoned.close()
    again = list(pipe.iterate(9, 2))  # a restart at step 9 sees what an unbroken run saw
    pipe.num_workers = 0
    for k, batch in enumerate(got):
      reference = pipe.get_batch(4 + k)
      assert batch.keys() == reference.keys()
      for key in batch:
        np.testing.assert_array_equal(batch[key], reference[key])
    for key in again[0]:
      np.testing.assert_array_equal(again[0][key], got[5][key])


def test_a_worker_error_reaches_the_consumer_and_a_dead_worker_is_named():
  images = np.zeros((16, 8, 8, 3), np.uint8)
  pipe = data.PretrainPipeline(FailingSource(images, bad=-1), 4, 8, 1, num_workers=1)
  bad = int(pipe.example_indices(2)[0])
  pipe.close()
  with data.PretrainPipeline(FailingSource(images, bad), 4, 8, 1, num_workers=1) as pipe:
    with pytest.raises(DataError, match=f"example {bad} is unreadable"):
      list(pipe.iterate(0, 4))
    pool = pipe._workers
    pool._procs[0].kill()
    with pytest.raises(DataError, match="Input worker process 0 .* died"):
      list(pipe.iterate(0, 1))


def test_auto_workers_only_on_accelerators():
  assert workers.resolve_num_workers(-1, "cpu") == 0
  assert workers.resolve_num_workers(-1, "gpu") == len(os.sched_getaffinity(0))
  assert workers.resolve_num_workers(3, "cpu") == 3


# -- JPEG fast paths ----------------------------------------------------------------------------

def test_simplejpeg_decodes_what_pillow_decodes(jpeg_folder):
  source = data.FolderSource(jpeg_folder)
  for i in range(len(source)):
    encoded, _ = source.encoded(i)
    if jpeg.header_size(encoded) is None:
      assert source.paths[i].endswith(".png")
      continue
    for reduction in (1, 2, 4):
      with Image.open(source.paths[i]) as pil:
        w, h = pil.size
        if reduction > 1:
          pil.draft("RGB", (w // reduction, h // reduction))
        expected = np.asarray(pil.convert("RGB"))
      assert expected.shape[:2] == (-(-h // reduction), -(-w // reduction))
      np.testing.assert_array_equal(jpeg.decode(encoded, "simplejpeg", reduction), expected)
      np.testing.assert_array_equal(jpeg.decode(encoded, "pil", reduction), expected)


def test_fast_decoders_without_draft_give_the_faithful_batch(jpeg_folder):
  source = data.FolderSource(jpeg_folder)
  with data.PretrainPipeline(source, 8, 32, 4, seed=1, num_threads=2) as faithful, \
       data.PretrainPipeline(source, 8, 32, 4, seed=1, num_threads=2,
                             decoder="simplejpeg") as fast:
    assert fast._from_encoded and not faithful._from_encoded
    for step in range(3):  # every example, the PNG (decoded by the source) among them
      np.testing.assert_array_equal(fast.get_batch(step)["images"],
                                    faithful.get_batch(step)["images"])


def test_draft_reduction_is_the_largest_that_keeps_every_crop_big_enough():
  assert jpeg.draft_reduction([300, 250], [260, 240], 112) == 2
  assert jpeg.draft_reduction([300, 250], [260, 223], 112) == 1
  assert jpeg.draft_reduction([900, 500], [460, 448], 112) == 4
  assert jpeg.draft_reduction([2000], [1000], 112) == 8
  assert jpeg.draft_reduction([80], [500], 112) == 1


def test_draft_crops_are_close_to_the_faithful_ones(jpeg_folder):
  source = data.FolderSource(jpeg_folder)
  kw = dict(seed=2, num_threads=2, output="uint8")
  with data.PretrainPipeline(source, 24, 24, 4, **kw) as faithful, \
       data.PretrainPipeline(source, 24, 24, 4, draft=True, **kw) as draft:
    a = faithful.get_batch(0)["images"].astype(np.float64)
    b = draft.get_batch(0)["images"].astype(np.float64)
  indices = faithful.example_indices(0)
  u = data.augmentation_uniforms(2, 0, indices, 4).transpose(1, 0, 2).reshape(-1, 23)
  shapes = [source[int(i)][0].shape for i in indices]
  example = np.tile(np.arange(24), 4)
  p = data.crop_params(u, np.array([s[0] for s in shapes])[example],
                       np.array([s[1] for s in shapes])[example])
  reduced = np.zeros(24, bool)
  for e in range(24):
    rows = np.flatnonzero(example == e)
    reduced[e] = min(p.height[rows].min(), p.width[rows].min()) >= 2 * 24
  diff = np.abs(a - b).reshape(4, 24, -1)
  assert reduced.any() and not reduced.all()
  assert diff[:, ~reduced].max() == 0  # no reduction possible: the faithful crops
  mse = np.mean(diff[:, reduced] ** 2)
  assert mse > 0 and 10 * np.log10(255 ** 2 / mse) > 28  # PSNR in dB


# -- prepare ------------------------------------------------------------------------------------

def test_prepare_bounds_sides_keeps_labels_resumes_and_runs_in_processes(jpeg_folder, tmp_path):
  source = data.FolderSource(jpeg_folder)
  out = tmp_path / "prepared"
  index = prepare.prepare(source, str(out), short_side=100, quality=90, num_shards=4,
                          num_processes=2, source_name="test")
  assert [s["count"] for s in index["shards"]] == [6, 6, 6, 6]
  prepared = data.get_source(f"prepared:{out}")
  assert len(prepared) == len(source) and prepared.num_classes == 3
  for i in range(len(source)):
    image, label = prepared[i]
    original, original_label = source[i]
    assert label == original_label
    h, w = original.shape[:2]
    if min(h, w) <= 100 and not source.paths[i].endswith(".png"):
      assert prepared.encoded(i)[0] == source.encoded(i)[0]  # small JPEGs kept as they are
    else:
      assert min(image.shape[:2]) == 100
      assert abs(image.shape[0] / image.shape[1] - h / w) < 0.02
      small = np.asarray(Image.fromarray(original).resize(image.shape[1::-1], Image.BICUBIC))
      assert np.abs(image.astype(int) - small).mean() < 4  # the same picture, JPEG-coded
  # Resume: finished shards are not rewritten; a missing one is.
  shard = out / index["shards"][2]["file"]
  stamps = {s["file"]: os.stat(out / s["file"]).st_mtime_ns for s in index["shards"]}
  shard.unlink()
  prepare.prepare(source, str(out), short_side=100, quality=90, num_shards=4, source_name="test")
  for s in index["shards"]:
    if s["file"] != shard.name:
      assert os.stat(out / s["file"]).st_mtime_ns == stamps[s["file"]]
  assert [prepared.encoded(i) for i in range(12, 18)] == [
      data.get_source(f"prepared:{out}").encoded(i) for i in range(12, 18)]
  assert not list(out.glob("*.tmp*"))
  with pytest.raises(DataError, match="prepared with"):
    prepare.prepare(source, str(out), short_side=128, num_shards=4, source_name="test")
  (out / prepare.INDEX).write_text(json.dumps({"format": "other"}))
  with pytest.raises(DataError, match="format"):
    data.get_source(f"prepared:{out}")


# -- uint8 crops, normalised in the step --------------------------------------------------------

def test_uint8_crops_normalised_in_the_step_give_the_same_loss():
  c = pretrain_config.apply_smoke(pretrain_config.base_config())
  fmnist = data.get_source("fashion_mnist", "train")
  with data.PretrainPipeline(fmnist, c.batch_size, c.image_size, c.num_crops, seed=0,
                             num_threads=1) as host, \
       data.PretrainPipeline(fmnist, c.batch_size, c.image_size, c.num_crops, seed=0,
                             num_threads=1, output="uint8") as device:
    floats, uint8s = host.get_batch(0), device.get_batch(0)
  assert uint8s["images"].dtype == np.uint8 and uint8s["images"].shape[-1] == 3
  np.testing.assert_array_equal(multicrop.normalize(uint8s["images"]), floats["images"])
  on_device = jax.jit(normalize_on_device)({"images": uint8s["images"]})["images"]
  np.testing.assert_array_equal(np.asarray(on_device), floats["images"])  # bit for bit
  mesh = parallel.make_mesh(jax.devices()[:1])
  setup = build_training(c, mesh, total_steps=4, steps_per_epoch=2)
  losses = []
  for batch in (floats, uint8s):
    state, metrics = setup["train_step"](jax.tree.map(lambda x: x.copy(), setup["state"]),
                                         parallel.global_batch(batch, mesh), setup["step_key"])
    losses.append(float(metrics["loss"]))
  assert losses[0] == losses[1]
