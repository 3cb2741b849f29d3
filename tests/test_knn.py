"""k-NN evaluation: against a brute-force numpy k-NN, sanity cases, real Fashion-MNIST.

Fashion-MNIST is a dependency (`make test` installs it); the product's loader is checked against
a raw gzip + numpy parse of the IDX files, then used for the raw-pixel k-NN check."""

import gzip
import pathlib

import jax
import numpy as np
import pytest

from adpe_jax import data, parallel
from adpe_jax.config.pretrain import apply_smoke, base_config
from adpe_jax.models.mae import MAEPlus
from adpe_jax.train import knn_metric as knn
from adpe_jax.train.state import build_model, init_params

FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def brute_force_knn(train, train_labels, test, test_labels, k, num_classes, temperature=None):
  """Independent reference: loops, argsort, plain or exp(sim/T)-weighted vote."""
  train = np.asarray(train, np.float64)
  test = np.asarray(test, np.float64)
  train = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
  test = test / np.maximum(np.linalg.norm(test, axis=1, keepdims=True), 1e-12)
  correct = 0
  for i in range(len(test)):
    sims = np.array([np.dot(test[i], train[j]) for j in range(len(train))])
    order = np.argsort(-sims, kind="stable")[:k]
    votes = np.zeros(num_classes)
    for j in order:
      votes[train_labels[j]] += 1.0 if temperature is None else np.exp(sims[j] / temperature)
    best = max(range(num_classes), key=lambda c: (votes[c], -c))  # ties -> smallest class
    correct += int(best == test_labels[i])
  return correct / len(test)


@pytest.mark.parametrize("k,temperature,chunk", [(1, None, 256), (4, None, 7), (5, None, 16),
                                                 (20, 0.07, 9), (6, 0.5, 256)])
def test_matches_brute_force(k, temperature, chunk):
  rng = np.random.default_rng(k)
  d, c = 8, 4
  # Class-dependent means so accuracies are neither 0 nor 1; even k gives vote ties.
  centers = rng.normal(size=(c, d))
  train_labels = rng.integers(0, c, 120)
  test_labels = rng.integers(0, c, 45)
  train = centers[train_labels] + 1.5 * rng.normal(size=(120, d))
  test = centers[test_labels] + 1.5 * rng.normal(size=(45, d))
  got = knn.knn_top1(train.astype(np.float32), train_labels, test.astype(np.float32),
                     test_labels, k=k, num_classes=c, temperature=temperature, chunk_size=chunk)
  want = brute_force_knn(train, train_labels, test, test_labels, k, c, temperature)
  assert got == pytest.approx(want, abs=1e-9)
  assert 0.0 < got < 1.0


def test_tie_goes_to_smallest_class():
  # Test point equidistant-ish: neighbours 2 of class 3 and 2 of class 1 -> class 1.
  train = np.array([[1, 0], [1, 0.01], [1, -0.01], [1, 0.02], [-1, 0]], np.float32)
  labels = np.array([3, 1, 3, 1, 0])
  test = np.array([[1, 0]], np.float32)
  assert knn.knn_top1(train, labels, test, np.array([1]), k=4) == 1.0
  assert knn.knn_top1(train, labels, test, np.array([3]), k=4) == 0.0
  assert knn.knn_top1(train, labels, test, np.array([3]), k=1) == 1.0


def test_identical_sets_k1_is_perfect():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(300, 16)).astype(np.float32)
  labels = rng.integers(0, 10, 300)
  assert knn.knn_top1(feats, labels, feats, labels, k=1, chunk_size=64) == 1.0


def test_cosine_ignores_scale_and_k_clipped():
  rng = np.random.default_rng(1)
  train = rng.normal(size=(10, 5)).astype(np.float32)
  labels = rng.integers(0, 3, 10)
  scaled = train * rng.uniform(0.1, 10, (10, 1)).astype(np.float32)
  assert knn.knn_top1(train, labels, scaled, labels, k=1) == 1.0
  # k larger than the train set: every point votes; == majority class of the set.
  acc = knn.knn_top1(train, labels, train, labels, k=50, num_classes=3)
  majority = np.argmax(np.bincount(labels, minlength=3))
  assert acc == pytest.approx(np.mean(labels == majority))


@pytest.fixture(scope="module")
def smoke_model():
  model = build_model(apply_smoke(base_config()))
  params = jax.jit(init_params, static_argnums=0)(model, jax.random.PRNGKey(0))  # eager is slow
  return model, params


def test_extract_features_pads_compiles_once_and_mesh(smoke_model):
  model, params = smoke_model
  images = np.random.default_rng(0).normal(size=(11, 28, 28, 3)).astype(np.float32)
  want = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, method=MAEPlus.features))(
      params, images))
  got = knn.extract_features(model, params, images, batch_size=4)
  assert got.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert knn._features_fn(model, None)._cache_size() == 1  # 4+4+3(padded) -> one shape
  mesh = parallel.make_mesh()
  got_mesh = knn.extract_features(model, params, images, batch_size=8, mesh=mesh)
  np.testing.assert_allclose(got_mesh, want, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError):
    knn.extract_features(model, params, images, batch_size=6, mesh=mesh)


def test_knn_eval_runs(smoke_model):
  model, params = smoke_model
  rng = np.random.default_rng(0)
  train = rng.normal(size=(20, 28, 28, 3)).astype(np.float32)
  test = train[:6] + 0.01 * rng.normal(size=(6, 28, 28, 3)).astype(np.float32)
  labels = rng.integers(0, 5, 20)
  out = knn.knn_eval(model, params, train, labels, test, labels[:6], k=1, batch_size=8)
  assert set(out) == {"knn_top1"}
  assert out["knn_top1"] == 1.0  # near-copies find themselves


def _read_idx(path, header):
  with gzip.open(path, "rb") as f:
    return np.frombuffer(f.read(), np.uint8, offset=header)


def fashion_mnist_from_idx(split, n):
  """Independent reference: the raw IDX files parsed with gzip + numpy, grey repeated to 3
  channels, /255, ImageNet mean/std."""
  prefix = "train" if split == "train" else "t10k"
  images = _read_idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)[:n]
  labels = _read_idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz", 8)[:n].astype(np.int32)
  images = np.repeat(images[..., None], 3, axis=-1).astype(np.float32) / np.float32(255)
  return (images - MEAN) / STD, labels


def fashion_mnist(split, n):
  """(images NHWC float32 ImageNet-normalised, labels) through the product's loader."""
  return data.labelled_arrays(data.get_source("fashion_mnist", split), 28, n)


@pytest.mark.parametrize("split,n", [("train", 2000), ("test", 500)])
def test_product_loader_equals_raw_idx_parse(split, n):
  images, labels = fashion_mnist(split, n)
  want_images, want_labels = fashion_mnist_from_idx(split, n)
  assert images.shape == (n, 28, 28, 3) and images.dtype == np.float32
  assert labels.shape == (n,)
  np.testing.assert_array_equal(labels, want_labels)
  np.testing.assert_allclose(images, want_images, rtol=1e-6, atol=1e-6)


def test_raw_pixel_knn_on_fashion_mnist():
  train_x, train_y = fashion_mnist("train", 2000)
  test_x, test_y = fashion_mnist("test", 500)
  assert train_x.shape == (2000, 28, 28, 3) and test_x.shape == (500, 28, 28, 3)
  acc = knn.knn_top1(train_x.reshape(2000, -1), train_y, test_x.reshape(500, -1), test_y,
                     k=20, num_classes=10)
  acc_weighted = knn.knn_top1(train_x.reshape(2000, -1), train_y, test_x.reshape(500, -1),
                              test_y, k=20, num_classes=10, temperature=0.07)
  print(f"raw-pixel kNN on Fashion-MNIST 2000/500: plain {acc:.3f}, weighted {acc_weighted:.3f}")
  assert acc > 0.7 and acc_weighted > 0.7
