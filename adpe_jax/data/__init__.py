"""Input pipelines: random-access sources, MAE+ multi-crop, deterministic restartable batches.

Importing this package does not import TensorFlow or tensorflow_datasets; only
`get_source("tfds:...")` (and `TfdsSource`, imported on demand from `adpe_jax.data.tfds_source`)
does.
"""

from adpe_jax.errors import DataError
from adpe_jax.data.eval_arrays import center_resize, labelled_arrays
from adpe_jax.data.fashion_mnist import FashionMnistSource, read_idx
from adpe_jax.data.folder import FolderSource
from adpe_jax.data.multicrop import (IMAGENET_MEAN, IMAGENET_STD, UNIFORMS_PER_CROP, CropParams,
                                     crop_params, normalize, pil_resized_crop, resized_crops)
from adpe_jax.data.pipeline import PretrainPipeline, augmentation_uniforms, epoch_permutation
from adpe_jax.data.sources import (ArraySource, Source, Subset, eval_source, from_config,
                                   get_source, spread)
from adpe_jax.data.synthetic import SyntheticSource
from adpe_jax.data.workers import resolve_num_workers


def __getattr__(name):
  # `adpe_jax.data.TfdsSource` without importing tensorflow_datasets at package import.
  if name == "TfdsSource":
    from adpe_jax.data.tfds_source import TfdsSource  # noqa: PLC0415 (tensorflow_datasets)
    return TfdsSource
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ArraySource", "CropParams", "DataError", "FashionMnistSource", "FolderSource", "IMAGENET_MEAN",
    "IMAGENET_STD", "PretrainPipeline", "Source", "Subset", "SyntheticSource", "TfdsSource",
    "UNIFORMS_PER_CROP", "augmentation_uniforms", "center_resize", "crop_params",
    "epoch_permutation", "eval_source", "from_config", "get_source", "labelled_arrays", "normalize",
    "pil_resized_crop",
    "read_idx", "resized_crops", "resolve_num_workers", "spread",
]
