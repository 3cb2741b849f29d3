"""Builds tests/data/tfds/tiny_images (tfds, ArrayRecord): 12 random 28x28 RGB images, labels
i % 3 of the classes a, b, c -- image i from numpy's default_rng(0), in order.  Building needs
tensorflow-datasets AND TensorFlow (the `[tfds]` extra); reading it needs no TensorFlow
(tests/test_tf_free.py).  Run from the repository root:

    .venv/bin/python tests/data/tfds/make_tiny_images.py tests/data/tfds
"""

import sys

import numpy as np
import tensorflow_datasets as tfds

NUM, SIZE, CLASSES = 12, 28, ["a", "b", "c"]


def examples():
  rng = np.random.default_rng(0)
  for i in range(NUM):
    yield i, {"image": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
              "label": i % len(CLASSES)}


class TinyImages(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
        "label": tfds.features.ClassLabel(names=CLASSES)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    yield from examples()


if __name__ == "__main__":
  TinyImages(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
