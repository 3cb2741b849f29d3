"""Any TensorFlow Datasets dataset by name, with random access.

Random access uses `tfds.data_source` (`builder.as_data_source`), which reads the ArrayRecord
files of a dataset prepared with `file_format="array_record"` (e.g. `tfds build imagenet2012
--file_format=array_record --manual_dir=DIR`); reading it needs neither TensorFlow nor tf.data.
A dataset prepared in the default TFRecord format has no random access: if it is small (under
`max_in_memory_bytes` on disk) it is read once into memory through tf.data, otherwise a DataError
says how to re-prepare it.

tensorflow_datasets (and TensorFlow, for the fallback) is imported inside this module's functions
only, so that `import adpe_jax.data` stays light.
"""

from __future__ import annotations

import numpy as np

from adpe_jax.errors import DataError


class TfdsSource:
  """`source[i] -> (uint8 (H, W, C), int label)` for a tfds dataset split.

  Args:
    name: tfds name, optionally with config/version ("imagenet2012", "cifar10:3.0.2").
    split: tfds split string ("train", "validation", "train[:10%]", ...).
    data_dir: tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    manual_dir: where manually downloaded archives live (imagenet2012's ILSVRC2012_img_*.tar).
    download: prepare the dataset (as ArrayRecord) if it is not prepared yet. Off by default, since
      for ImageNet that is hours of work and ~150 GB of disk.
    image_key, label_key: feature names.
    max_in_memory_bytes: largest TFRecord-only dataset read into memory instead of failing.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
               manual_dir: str | None = None, download: bool = False, image_key: str = "image",
               label_key: str = "label", max_in_memory_bytes: int = 2 << 30):
    import tensorflow_datasets as tfds  # noqa: PLC0415 (lazy: see module docstring)

    self.name, self.split = name, split
    self.image_key, self.label_key = image_key, label_key
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 (tfds raises DatasetNotFoundError, ValueError, ...)
      raise DataError(f"tfds has no dataset {name!r} ({type(e).__name__}: {e}).") from None
    prepared = _is_prepared(builder)
    if not prepared and download:
      config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
      try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare(download_config=config)
      except Exception as e:  # noqa: BLE001
        raise DataError(f"tfds could not prepare {name!r} in {builder.data_dir} "
                        f"({type(e).__name__}: {e}).") from None
      prepared = True
    info = builder.info
    self.num_classes = _num_classes(info, label_key)
    self.version = str(getattr(info, "version", "") or "")
    self.class_names = _class_names(info, label_key)
    self._in_memory = None
    try:
      self._examples = builder.as_data_source(split=split)  # ArrayRecord: random access from disk.
    except Exception as e:  # noqa: BLE001
      if not prepared:
        manual = f" --manual_dir={manual_dir}" if manual_dir else " [--manual_dir=DIR]"
        shown_dir = data_dir or "~/tensorflow_datasets"
        raise DataError(
            f"tfds dataset {name!r} is not prepared under {builder.data_dir}: build it with "
            f"`tfds build {name} --file_format=array_record --data_dir={shown_dir}{manual}` "
            f"or pass download=True.") from None
      # Prepared, but in a format without random access (TFRecord).
      file_format = str(getattr(info, "file_format", "") or "tfrecord")
      size = int(getattr(info, "dataset_size", 0) or 0)
      if size > max_in_memory_bytes:
        raise DataError(
            f"tfds dataset {name!r} in {builder.data_dir} is stored as {file_format}, which has "
            f"no random access ({type(e).__name__}), and is too large ({size / 2**30:.1f} GiB) "
            f"to read into memory: re-prepare it with "
            f"`tfds build {name} --file_format=array_record`.") from None
      self._examples = None
      self._in_memory = _read_into_memory(builder, split, image_key, label_key)

  def __len__(self) -> int:
    if self._in_memory is not None:
      return len(self._in_memory[1])
    return len(self._examples)

  def identity(self) -> dict:
    """`adpe_jax.data.identity`: name, version, split, count and classes (tfds' own
    metadata; no record is read)."""
    return {"kind": "tfds", "name": self.name, "version": self.version, "split": self.split,
            "examples": len(self),
            "classes": list(self.class_names) if self.class_names else self.num_classes}

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    if self._in_memory is not None:
      images, labels = self._in_memory
      return _as_hwc(images[index]), int(labels[index])
    example = self._examples[int(index)]
    return _as_hwc(example[self.image_key]), int(example[self.label_key])


def _is_prepared(builder) -> bool:
  try:
    return bool(builder.is_prepared())
  except Exception:  # noqa: BLE001
    return False


def _num_classes(info, label_key: str) -> int | None:
  try:
    return int(info.features[label_key].num_classes)
  except Exception:  # noqa: BLE001
    return None


def _class_names(info, label_key: str) -> tuple:
  try:
    return tuple(str(n) for n in info.features[label_key].names)
  except Exception:  # noqa: BLE001 (no ClassLabel feature, or no names)
    return ()


def _as_hwc(image) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.dtype != np.uint8:
    raise DataError(f"tfds image feature has dtype {image.dtype}; the pipeline expects uint8.")
  return image


def _read_into_memory(builder, split, image_key, label_key):
  """TFRecord fallback: decodes the split once through tf.data into lists of numpy images."""
  import tensorflow_datasets as tfds  # noqa: PLC0415 (lazy: see module docstring)

  images, labels = [], []
  for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    images.append(np.asarray(example[image_key]))
    labels.append(int(example[label_key]))
  return images, np.asarray(labels, np.int64)
