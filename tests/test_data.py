"""adpe_jax.data on real Fashion-MNIST: IDX parsing, MAE+ multi-crop, RRC sampling, determinism.

References are independent of the code under test: raw bytes read with struct/zlib, torchvision's
RandomResizedCrop.get_params transcribed line by line, Pillow itself for resizing, the Random123
known-answer vectors and jax for Threefry, and torch's float32 ToTensor/Normalize arithmetic.
The crop-parameter distribution equals torchvision's because
test_crop_params_follow_torchvision_get_params_exactly checks every (top, left, h, w) against
that transcription fed the same uniforms; neither torch nor torchvision is needed.
Fashion-MNIST is a dependency (`make test` installs it): tests using it fail, not skip, without it.
"""

import math
import os
import struct
import subprocess
import sys
import threading
import zlib

import jax.extend.random as jax_random
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from adpe_jax import data
from adpe_jax.data import counter_rng, multicrop, pil_bicubic

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

def torch_normalize(u8: np.ndarray) -> np.ndarray:
  """ToTensor then Normalize, as torch computes them in float32; grey repeated to 3 channels."""
  x = u8.astype(np.float32) / np.float32(255)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return (x - MEAN) / STD


@pytest.fixture(scope="module")
def train():
  return data.get_source("fashion_mnist", "train")


@pytest.fixture(scope="module")
def test_split():
  return data.get_source("fashion_mnist", "test")


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def _raw_idx(path):
  """The IDX payload and header read by another route: zlib (not gzip) and struct (not numpy)."""
  with open(path, "rb") as f:
    raw = zlib.decompress(f.read(), 16 + zlib.MAX_WBITS)
  magic, = struct.unpack(">I", raw[:4])
  ndim = magic & 0xFF
  dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
  return magic, dims, raw[4 + 4 * ndim:]


def test_idx_parsing_shapes_dtypes_and_labels(train, test_split):
  assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
  assert test_split.images.shape == (10000, 28, 28) and test_split.images.dtype == np.uint8
  assert train.labels.shape == (60000,) and test_split.labels.shape == (10000,)
  assert train.labels.min() == 0 and train.labels.max() == 9
  # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
  assert (np.bincount(train.labels) == 6000).all()
  assert (np.bincount(test_split.labels) == 1000).all()
  image, label = train[123]
  assert image.shape == (28, 28, 1) and image.dtype == np.uint8 and isinstance(label, int)


def test_idx_pixels_and_mean_match_an_independent_read(train, test_split):
  magic, dims, payload = _raw_idx(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz"))
  assert magic == 0x00000803 and dims == (10000, 28, 28)
  # Pixel sum by pure Python over the raw bytes vs numpy over the parsed array.
  assert sum(payload) == int(test_split.images.sum(dtype=np.int64))
  rng = np.random.default_rng(0)
  for i, r, c in zip(rng.integers(0, 10000, 50), rng.integers(0, 28, 50), rng.integers(0, 28, 50)):
    assert payload[i * 784 + r * 28 + c] == test_split.images[i, r, c]
  magic, dims, labels = _raw_idx(os.path.join(FMNIST_DIR, "train-labels-idx1-ubyte.gz"))
  assert magic == 0x00000801 and dims == (60000,)
  assert list(labels[:100]) == train.labels[:100].tolist()
  # The published statistic: mean training pixel 72.94 (0.2860 after /255).
  assert abs(train.images.mean() - 72.94) < 0.01


def test_missing_fashion_mnist_raises_one_sentence(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(data.DataError) as info:
    data.get_source("fashion_mnist", "train", str(missing))
  message = str(info.value)
  assert str(missing) in message and "apt-get install dataset-fashion-mnist" in message
  assert message.endswith(".") and message.count(". ") == 0 and "\n" not in message


def test_missing_folder_and_unknown_names_raise_data_error(tmp_path):
  with pytest.raises(data.DataError, match=str(tmp_path / "absent")):
    data.get_source(f"folder:{tmp_path / 'absent'}", "train")
  with pytest.raises(data.DataError, match="Unknown dataset name"):
    data.get_source("imagenet", "train")
  with pytest.raises(data.DataError, match="splits"):
    data.get_source("fashion_mnist", "validation")


def test_corrupt_idx_file_raises_data_error(tmp_path):
  for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
    (tmp_path / name).write_bytes(b"not gzip at all")
  with pytest.raises(data.DataError, match="could not be read"):
    data.FashionMnistSource("train", str(tmp_path))


def test_importing_the_package_does_not_import_tensorflow():
  code = ("import sys, adpe_jax.data; "
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_folder_source_layout_labels_and_rgb(tmp_path):
  rng = np.random.default_rng(0)
  for cls, mode in (("b_cat", "L"), ("a_dog", "RGB")):
    (tmp_path / "train" / cls / "sub").mkdir(parents=True)
    for k in range(3):
      shape = (20 + k, 30) if mode == "L" else (20 + k, 30, 3)
      Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
          tmp_path / "train" / cls / ("sub" if k == 2 else "") / f"img{k}.png")
    (tmp_path / "train" / cls / "notes.txt").write_text("not an image")
  source = data.get_source(f"folder:{tmp_path}", "train")
  assert source.class_names == ("a_dog", "b_cat") and len(source) == 6
  assert source.labels.tolist() == [0, 0, 0, 1, 1, 1]
  image, label = source[4]
  assert image.shape == (21, 30, 3) and image.dtype == np.uint8 and label == 1
  assert (image[..., 0] == image[..., 2]).all()  # grey PNG converted to RGB, like torchvision.
  batch = data.PretrainPipeline(source, 4, 16, 2, seed=0, num_threads=2).get_batch(0)["images"]
  assert batch.shape == (8, 16, 16, 3)


def test_synthetic_source_is_deterministic_and_sized():
  a = data.get_source("synthetic:32x48", "train", num_examples=10, seed=1)
  b = data.get_source("synthetic:32x48", "train", num_examples=10, seed=1)
  assert len(a) == 10 and a[3][0].shape == (32, 48, 3)
  assert (a[3][0] == b[3][0]).all() and a[3][1] == b[3][1]
  assert not (a[3][0] == a[4][0]).all()
  other_split = data.get_source("synthetic:32x48", "test", num_examples=10, seed=1)
  assert not (a[3][0] == other_split[3][0]).all()
  image = a[0][0].astype(float)
  assert np.abs(np.diff(image, axis=1)).mean() < 20  # smooth, not white noise (~85 there).


def test_tfds_source_random_access():
  with tfds.testing.mock_data(num_examples=12):
    source = data.get_source("tfds:fashion_mnist", "train")
    assert len(source) == 12 and source.num_classes == 10
    image, label = source[5]
    assert image.shape == (28, 28, 1) and image.dtype == np.uint8 and 0 <= label < 10
    batch = data.PretrainPipeline(source, 4, 28, 2, seed=0, num_threads=2).get_batch(1)["images"]
    assert batch.shape == (8, 28, 28, 3)


def test_tfds_source_not_prepared_raises_data_error(tmp_path):
  with pytest.raises(data.DataError, match="not prepared") as info:
    data.get_source("tfds:mnist", "train", str(tmp_path))
  assert str(tmp_path) in str(info.value) and "--file_format=array_record" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Random numbers and RandomResizedCrop parameters
# ---------------------------------------------------------------------------------------------


def test_threefry_matches_random123_and_jax():
  kat = [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
         ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
         ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]
  for key, (x0, x1), expected in kat:
    assert tuple(int(v) for v in counter_rng.threefry2x32(key, x0, x1)) == expected
  rng = np.random.default_rng(0)
  key = rng.integers(0, 2**32, 2, dtype=np.uint32)
  counts = rng.integers(0, 2**32, (2, 300), dtype=np.uint32)
  ref = np.asarray(jax_random.threefry_2x32((key[0], key[1]), counts.reshape(-1))).reshape(2, 300)
  ours = np.stack(counter_rng.threefry2x32((int(key[0]), int(key[1])), counts[0], counts[1]))
  np.testing.assert_array_equal(ours, ref)


def torchvision_params_from_crop_uniforms(u, height, width, scale=(0.08, 1.0),
                                          ratio=(3.0 / 4.0, 4.0 / 3.0)):
  """torchvision.transforms.RandomResizedCrop.get_params (0.9-0.21), line by line, with its
  torch.empty(1).uniform_(lo, hi) / torch.randint(0, n) draws replaced by our per-crop uniforms
  (u[0:10] areas, u[10:20] log-ratios, u[20] top, u[21] left; u[22] the flip coin):
  lo + (hi - lo) * u and floor(u * n)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for attempt in range(10):
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[attempt])
    aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[10 + attempt])
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      i = math.floor(u[20] * (height - h + 1))
      j = math.floor(u[21] * (width - w + 1))
      return i, j, h, w, u[22] < 0.5
  # Fallback to central crop
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:  # whole image
    w = width
    h = height
  i = (height - h) // 2
  j = (width - w) // 2
  return i, j, h, w, u[22] < 0.5


def test_crop_params_follow_torchvision_get_params_exactly():
  rng = np.random.default_rng(0)
  sizes = [(28, 28), (256, 256), (375, 500), (500, 333), (10, 200), (200, 10), (3, 3), (1, 7)]
  for height, width in sizes:
    u = rng.random((500, multicrop.UNIFORMS_PER_CROP))
    p = multicrop.crop_params(u, np.full(500, height), np.full(500, width))
    ours = list(zip(p.top.tolist(), p.left.tolist(), p.height.tolist(), p.width.tolist(),
                    p.flip.tolist()))
    ref = [torchvision_params_from_crop_uniforms(row, height, width) for row in u]
    assert ours == ref, (height, width)
    assert ((p.top >= 0) & (p.left >= 0)).all()
    assert ((p.top + p.height <= height) & (p.left + p.width <= width)).all()
  # A 10x200 strip admits no crop of area >= 8% within the ratio range: always the fallback.
  u = rng.random((50, multicrop.UNIFORMS_PER_CROP))
  p = multicrop.crop_params(u, np.full(50, 10), np.full(50, 200))
  assert set(zip(p.top, p.left, p.height, p.width)) == {(0, (200 - 13) // 2, 10, 13)}


def test_crop_params_ranges():
  n, side = 20000, 1000  # large image: rounding to pixels hardly moves area or aspect.
  u = np.random.default_rng(1).random((n, multicrop.UNIFORMS_PER_CROP))
  p = multicrop.crop_params(u, np.full(n, side), np.full(n, side))
  area = p.height * p.width / side**2
  aspect = p.width / p.height
  assert area.min() >= 0.08 * 0.99 and area.max() <= 1.0
  assert aspect.min() >= 0.75 * 0.99 and aspect.max() <= 4 / 3 * 1.01
  # Square images: the first attempt fits unless area * max(ratio) > 1, so the accepted area
  # fraction is ~uniform on [0.08, 1] conditioned on fitting; log aspect ~uniform.
  assert abs(np.median(np.log(aspect))) < 0.01
  assert 0.45 < area.mean() < 0.55
  assert abs(p.flip.mean() - 0.5) < 0.02


# ---------------------------------------------------------------------------------------------
# Resize and normalisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side,size,channels", [(28, 28, 1), (28, 12, 3), (64, 20, 3), (40, 56, 1)])
def test_vectorised_bicubic_equals_pillow(side, size, channels):
  rng = np.random.default_rng(side + size)
  n = 120
  heights, widths = rng.integers(1, side + 1, n), rng.integers(1, side + 1, n)
  crops = rng.integers(0, 256, (n, side, side, channels), dtype=np.uint8)
  crops[::2] = np.where(crops[::2] > 127, 255, 0)  # hard edges: overshoot and clipping.
  flip = rng.random(n) < 0.5
  out = pil_bicubic.resize_bicubic(crops, heights, widths, size, flip=flip)
  for i in range(n):
    crop = crops[i, :heights[i], :widths[i]]
    pil = Image.fromarray(crop[..., 0] if channels == 1 else crop)
    pil = pil.resize((size, size), Image.BICUBIC)
    ref = np.asarray(pil).reshape(size, size, channels)
    np.testing.assert_array_equal(out[i], ref[:, ::-1] if flip[i] else ref)


def test_normalize_equals_torch_arithmetic():
  x = np.random.default_rng(0).integers(0, 256, (70000, 3), dtype=np.uint8).reshape(700, 10, 10, 3)
  np.testing.assert_array_equal(data.normalize(x), torch_normalize(x))
  np.testing.assert_array_equal(data.normalize(x[..., :1]), torch_normalize(x[..., :1]))


# ---------------------------------------------------------------------------------------------
# The multi-crop batch
# ---------------------------------------------------------------------------------------------


def test_multicrop_batch_layout_matches_a_pillow_reference(train):
  batch_size, crops = 16, 4
  pipe = data.PretrainPipeline(train, batch_size, 28, crops, seed=3, num_threads=2)
  step = 5
  images = pipe.get_batch(step)["images"]
  assert images.shape == (crops * batch_size, 28, 28, 3) and images.dtype == np.float32
  # Grey input: the three channels hold the same pixel value (normalised per channel).
  pixels = images * STD + MEAN
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-6)
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-6)
  # Rebuild every crop on its own: torchvision's PIL path (crop, resize bicubic, flip, normalise)
  # with the example's uniforms; crop k of example i must sit at row k * batch_size + i.
  indices = pipe.example_indices(step)
  u = data.augmentation_uniforms(3, pipe.epoch_of(step), indices, crops)
  for i, index in enumerate(indices):
    pil = Image.fromarray(train.images[index])
    for k in range(crops):
      top, left, h, w, flip = torchvision_params_from_crop_uniforms(u[i, k], 28, 28)
      crop = np.asarray(pil.crop((left, top, left + w, top + h)).resize((28, 28), Image.BICUBIC))
      if flip:
        crop = crop[:, ::-1]
      np.testing.assert_array_equal(images[k * batch_size + i], torch_normalize(crop[..., None]))


def test_vectorised_and_pillow_paths_give_the_same_batch(train, monkeypatch):
  pipe = data.PretrainPipeline(train, 64, 28, 4, seed=2, num_threads=2)
  fast = pipe.get_batch(3)["images"]
  monkeypatch.setattr(multicrop, "VECTORIZE_MAX_SIDE", 0)
  np.testing.assert_array_equal(pipe.get_batch(3)["images"], fast)


def test_multicrop_of_a_constant_image_is_the_normalised_constant():
  value = 77
  source = data.ArraySource(np.full((64, 28, 28), value, np.uint8))
  images = data.PretrainPipeline(source, 64, 28, 4, seed=0, num_threads=2).get_batch(0)["images"]
  expected = (np.float32(value) / np.float32(255) - MEAN) / STD
  mean = images.mean(axis=(0, 1, 2), dtype=np.float64)
  np.testing.assert_allclose(mean, expected, rtol=0, atol=1e-6)
  assert np.abs(images - expected).max() < 1e-6


def test_flips_happen_half_the_time_and_match_the_image():
  # A horizontal ramp: a crop reads dark-to-bright left to right unless it was flipped.
  ramp = np.tile(np.linspace(0, 255, 28).astype(np.uint8), (28, 1))
  source = data.ArraySource(np.repeat(ramp[None], 512, axis=0))
  pipe = data.PretrainPipeline(source, 512, 28, 4, seed=0, num_threads=2)
  images = pipe.get_batch(0)["images"][..., 0]
  flipped = images[:, :, 0].mean(1) > images[:, :, -1].mean(1)
  u = data.augmentation_uniforms(0, 0, pipe.example_indices(0), 4)
  u = u.transpose(1, 0, 2).reshape(-1, 23)  # crop-major, like the batch.
  np.testing.assert_array_equal(flipped, u[:, 22] < 0.5)
  assert abs(flipped.mean() - 0.5) < 0.05  # 2048 coins: 3 sigma = 0.033.


def test_multicrop_statistics_are_sane(train):
  images = data.PretrainPipeline(train, 256, 28, 4, seed=0, num_threads=2).get_batch(0)["images"]
  lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
  assert np.isfinite(images).all() and (images >= lo - 1e-6).all() and (images <= hi + 1e-6).all()
  # Mean pixel of the crops, back in [0, 1]: near the dataset's 0.286 (crops zoom into the
  # object, so somewhat brighter).
  mean01 = images[..., 0].mean() * STD[0] + MEAN[0]
  assert 0.25 < mean01 < 0.45


# ---------------------------------------------------------------------------------------------
# Determinism, restart, sharding
# ---------------------------------------------------------------------------------------------


def test_batches_are_a_pure_function_of_seed_and_step(train):
  a = data.PretrainPipeline(train, 32, 28, 2, seed=7, num_threads=1)
  b = data.PretrainPipeline(train, 32, 28, 2, seed=7, num_threads=2)
  for step in (0, 9, 1874, 1875, 10**6):  # 1875 steps per epoch: both sides of a boundary.
    np.testing.assert_array_equal(a.get_batch(step)["images"], b.get_batch(step)["images"])
  assert not np.array_equal(a.get_batch(0)["images"], a.get_batch(1)["images"])
  c = data.PretrainPipeline(train, 32, 28, 2, seed=8, num_threads=1)
  assert not np.array_equal(a.get_batch(0)["images"], c.get_batch(0)["images"])


def test_iterate_restarts_exactly(train):
  pipe = data.PretrainPipeline(train, 16, 28, 2, seed=1, num_threads=2)
  full = [b["images"] for b in pipe.iterate(0, num_steps=6)]
  resumed = [b["images"] for b in pipe.iterate(start_step=3, num_steps=3)]
  for x, y in zip(full[3:], resumed):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(full[4], pipe.get_batch(4)["images"])


def test_epochs_visit_every_example_once_and_drop_the_remainder():
  source = data.ArraySource(np.zeros((100, 8, 8), np.uint8))
  pipe = data.PretrainPipeline(source, 16, 8, 1, seed=0, num_threads=1)
  assert pipe.steps_per_epoch == 6
  for epoch in (0, 1):
    seen = np.concatenate([pipe.example_indices(s) for s in range(6 * epoch, 6 * epoch + 6)])
    assert len(set(seen.tolist())) == 96
  assert not np.array_equal(pipe.example_indices(0), pipe.example_indices(6))


def test_process_shards_are_disjoint_and_rebuild_the_global_batch(train):
  global_batch, crops, step = 24, 2, 11
  whole = data.PretrainPipeline(train, global_batch, 28, crops, seed=5, num_threads=2)
  global_images = whole.get_batch(step)["images"].reshape(crops, global_batch, 28, 28, 3)
  shards = [data.PretrainPipeline(train, global_batch, 28, crops, seed=5, process_index=p,
                                  process_count=3, num_threads=1) for p in range(3)]
  indices = [s.example_indices(step) for s in shards]
  assert len(set(np.concatenate(indices).tolist())) == global_batch
  np.testing.assert_array_equal(np.concatenate(indices), whole.example_indices(step))
  for p, shard in enumerate(shards):
    local = shard.get_batch(step)["images"].reshape(crops, 8, 28, 28, 3)
    np.testing.assert_array_equal(local, global_images[:, 8 * p:8 * (p + 1)])


# The ids contract (PretrainPipeline's docstring): process p of P holds the examples at global
# positions p*L .. p*L+L-1 (L = G/P); its row k*L + i is crop k of its i-th example, and that
# row's id is the row it has in the one-process batch, k*G + p*L + i. Written out by hand for
# G = 8 images, 2 crops (one-process rows 0-7 are crop 0, rows 8-15 crop 1):
EXPECTED_IDS = {
    1: [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]],
    2: [[0, 1, 2, 3, 8, 9, 10, 11],
        [4, 5, 6, 7, 12, 13, 14, 15]],
    4: [[0, 1, 8, 9],
        [2, 3, 10, 11],
        [4, 5, 12, 13],
        [6, 7, 14, 15]],
}


def test_row_ids_are_the_one_process_rows_for_any_process_count():
  """The masks are drawn per (step, id), so the ids alone make masks independent of the
  process count: each process's ids are the hand-written rows above at every step (epochs
  0-2), and scattering every process's images to their ids rebuilds the one-process batch,
  whose ids are 0..rows-1."""
  images = np.random.default_rng(0).integers(0, 256, (20, 12, 12, 3)).astype(np.uint8)
  source = data.ArraySource(images)   # 20 distinct examples: 2 steps of 8 per epoch
  global_batch, crops, size = 8, 2, 8
  whole = data.PretrainPipeline(source, global_batch, size, crops, seed=3, num_threads=1)
  for step in (0, 3, 5):
    one = whole.get_batch(step)
    np.testing.assert_array_equal(one["ids"], EXPECTED_IDS[1][0])
    for count, expected in EXPECTED_IDS.items():
      rebuilt = np.full_like(one["images"], np.nan)
      for index in range(count):
        part = data.PretrainPipeline(source, global_batch, size, crops, seed=3,
                                     process_index=index, process_count=count,
                                     num_threads=1).get_batch(step)
        assert part["ids"].dtype == np.int32 and part["ids"].shape == (crops * global_batch
                                                                       // count,)
        np.testing.assert_array_equal(part["ids"], expected[index], err_msg=f"{count=} {index=}")
        rebuilt[part["ids"]] = part["images"]
      np.testing.assert_array_equal(rebuilt, one["images"], err_msg=f"{count=} {step=}")


def test_iterate_stops_its_thread_and_reraises_source_errors():
  class Broken(data.ArraySource):
    def __getitem__(self, index):
      raise OSError("disk on fire")

  source = Broken(np.zeros((8, 8, 8), np.uint8))
  pipe = data.PretrainPipeline(source, 4, 8, 1, seed=0, num_threads=1)
  with pytest.raises(OSError, match="disk on fire"):
    next(pipe.iterate(0))
  ok = data.PretrainPipeline(data.ArraySource(np.zeros((8, 8, 8), np.uint8)), 4, 8, 1,
                             num_threads=1)
  it = ok.iterate(0)
  next(it)
  it.close()
  assert not [t for t in threading.enumerate() if t.name == "adpe_data_prefetch" and t.is_alive()]


def test_bad_pipeline_arguments():
  source = data.ArraySource(np.zeros((10, 8, 8), np.uint8))
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.PretrainPipeline(source, 5, 8, process_count=2)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    data.PretrainPipeline(source, 16, 8)


# ---------------------------------------------------------------------------------------------
# Evaluation arrays
# ---------------------------------------------------------------------------------------------


def test_labelled_arrays_at_native_and_resized_sizes(test_split):
  images, labels = data.labelled_arrays(test_split, 28, max_examples=300)
  assert images.shape == (300, 28, 28, 3) and images.dtype == np.float32
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels, test_split.labels[:300])
  np.testing.assert_array_equal(images, torch_normalize(test_split.images[:300, :, :, None]))
  small, _ = data.labelled_arrays(test_split, 14, max_examples=40, num_threads=2)
  for i in range(40):
    ref = np.asarray(Image.fromarray(test_split.images[i]).resize((14, 14), Image.BICUBIC))
    np.testing.assert_array_equal(small[i], torch_normalize(ref[..., None]))


def test_center_resize_is_torchvision_resize_then_center_crop():
  image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
  out = data.center_resize(image, 224, crop_fraction=0.875)
  # Resize(256): shorter side 300 -> 256, longer 400 -> int(256 * 400 / 300) = 341; CenterCrop(224):
  # top = round(16.0) = 16, left = round(58.5) = 58 (half to even).
  ref = np.asarray(Image.fromarray(image).resize((341, 256), Image.BICUBIC))[16:240, 58:282]
  np.testing.assert_array_equal(out, ref)
