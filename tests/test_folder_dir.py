"""`data.dir` is the root of a class-folder source: data.source="folder" reads it.

A tiny ImageFolder tree of real Fashion-MNIST images (written as PNGs) is read back through
`get_source("folder", split, data_dir)`, through `folder:<relative>` under data.dir, and through
the training loop's own `make_source(config)`.
"""

import os

import numpy as np
import pytest
from PIL import Image

from adpe_jax import data

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = (0, 1, 7)   # T-shirt/top, Trouser, Sneaker
PER_CLASS = 3

needs_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz")),
    reason="apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  """root/train/<class name>/<k>.png with PER_CLASS Fashion-MNIST test images per class.

  Returns (root, expected): expected[label] = the grey images of that class in file order.
  """
  fm = data.FashionMnistSource("test", FMNIST_DIR)
  root = tmp_path_factory.mktemp("folder_root")
  expected = []
  for rank, cls in enumerate(CLASSES):
    # Class folder names sort in CLASSES order, so the folder label is the rank.
    name = f"{rank}_{data.fashion_mnist.CLASS_NAMES[cls].replace('/', '_')}"
    (root / "train" / name).mkdir(parents=True)
    idx = np.flatnonzero(fm.labels == cls)[:PER_CLASS]
    images = [fm.images[i] for i in idx]
    for k, image in enumerate(images):
      Image.fromarray(image, "L").save(root / "train" / name / f"{k}.png")
    expected.append(images)
  return root, expected


def _check(source, expected):
  assert isinstance(source, data.FolderSource)
  assert source.num_classes == len(CLASSES) and len(source) == len(CLASSES) * PER_CLASS
  for i in range(len(source)):
    image, label = source[i]
    grey = expected[label][i % PER_CLASS]
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8
    for c in range(3):  # grey PNG -> RGB, as torchvision's loader does
      np.testing.assert_array_equal(image[..., c], grey)


@needs_fmnist
def test_folder_source_reads_data_dir(tree):
  root, expected = tree
  source = data.get_source("folder", "train", str(root))
  assert source.root == os.path.join(str(root), "train")
  _check(source, expected)
  # folder:<relative path> is taken under data.dir; an absolute path ignores it.
  _check(data.get_source("folder:train", "validation", str(root.parent / root.name)), expected)
  _check(data.get_source(f"folder:{root}", "train", "/nonexistent"), expected)
  _check(data.get_source(f"folder:{root}", "train"), expected)
  with pytest.raises(data.DataError, match="data.dir"):
    data.get_source("folder", "train")
  with pytest.raises(data.DataError, match="does not exist"):
    data.get_source("folder", "train", str(root / "absent"))


@needs_fmnist
def test_config_data_dir_reaches_the_folder_source(tree):
  from adpe_jax.config import pretrain as pretrain_config
  from adpe_jax.data import from_config

  root, expected = tree
  c = pretrain_config.base_config()
  c.data.source = "folder"
  c.data.dir = str(root)
  source = from_config(c, c.data.split)
  _check(source, expected)
  batch = data.PretrainPipeline(source, 4, 28, 2, seed=0, num_threads=1).get_batch(0)["images"]
  assert batch.shape == (8, 28, 28, 3) and np.isfinite(batch).all()
