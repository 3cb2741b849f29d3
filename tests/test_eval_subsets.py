"""The eval sets' subsets (eval.max_examples, eval.knn_*_examples, eval.heldout_examples,
the k-NN task's data.*_examples) are spread over their split: on a split stored class by
class, as an ImageNet-like folder is, every class gets its share (the first N examples
would be the first classes only)."""

import types

import numpy as np

from adpe_jax import data, parallel
from adpe_jax.train import evaluate

CLASSES, PER_CLASS = 4, 6


def sorted_split():
  """24 distinct 8x8 images, class by class (labels 0,0,0,0,0,0,1,...)."""
  images = (np.arange(CLASSES * PER_CLASS)[:, None, None] * 10 + np.zeros((1, 8, 8))).astype(np.uint8)
  return data.ArraySource(images, np.repeat(np.arange(CLASSES), PER_CLASS))


def test_spread_takes_every_len_over_n_th_example():
  source = data.ArraySource(np.zeros((10, 4, 4), np.uint8))
  assert list(data.spread(source, 4).indices) == [0, 2, 5, 7]   # i * 10 // 4
  assert list(data.spread(source, 3).indices) == [0, 3, 6]
  for whole in (0, -1, 10, 11):
    assert data.spread(source, whole) is source


def test_every_evaluator_gives_every_class_its_share():
  source = sorted_split()
  share = [0, 0, 1, 1, 2, 2, 3, 3]
  # k-NN sets (pretraining's evaluator and the k-NN task)
  assert evaluate.LabelledImages(source, 8, max_examples=8).features(
      types.SimpleNamespace(features=lambda x, b, m: x), 8)[1].tolist() == share
  # the linear probe's eval features (streamed in chunks)
  flat = types.SimpleNamespace(features=lambda x, b, m: x.reshape(len(x), -1))
  feats, labels = evaluate.labelled_features(flat, source, 8, max_examples=8, batch_size=2,
                                             chunk=2)
  assert labels.tolist() == share
  picked = [0, 3, 6, 9, 12, 15, 18, 21]   # i * 24 // 8
  expected, _ = data.labelled_arrays(data.Subset(source, np.array(picked)), 8)
  np.testing.assert_array_equal(feats, expected.reshape(8, -1))
  # the fine-tune classifier's evaluation
  mesh = parallel.make_mesh()
  classifier = evaluate.ClassifierEvaluator(None, source, mesh, image_size=8,
                                            batch_size=mesh.size * 2, max_examples=8)
  assert classifier.n == 8
  assert [classifier.source[i][1] for i in range(8)] == share
  # the held-out reconstruction loss: its images are those of the picked examples
  heldout = evaluate.HeldoutLoss(types.SimpleNamespace(num_patches=4), source, 8, 8,
                                 every_steps=0, mesh=mesh, chunk=4)
  np.testing.assert_array_equal(np.asarray(heldout.images).reshape(expected.shape), expected)
