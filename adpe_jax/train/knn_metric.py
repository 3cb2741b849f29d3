"""k-NN evaluation of the frozen encoder (mean-pooled features, cosine similarity).

  feats = extract_features(model, params, images)            # (N, D) float32
  acc = knn_top1(train_feats, train_labels, test_feats, test_labels, k=20)
  knn_eval(model, params, train_images, train_labels, test_images, test_labels, k=20)
      -> {"knn_top1": acc}

Accuracies are fractions in [0, 1].

Vote: by default a plain majority vote over the k nearest training examples (each
neighbour counts 1; a tie between classes goes to the smallest class index). With
`temperature=T` the vote is DINO's weighted vote, each neighbour adding exp(sim / T)
to its class (DINO uses T = 0.07); remaining ties again go to the smallest class.
Neighbours are the k largest cosine similarities (features L2-normalised first, as
torch's F.normalize with eps 1e-12); k is clipped to the number of training examples.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from adpe_jax import parallel
from adpe_jax.models.mae import MAEPlus


# -- features ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _features_fn(model, mesh):
  """One jitted feature function per (model, mesh); it compiles once per batch shape.

  model: an MAEPlus (its `features`) or any hashable callable (params, images) -> (N, D),
  e.g. the frozen encoders of `adpe_jax.train.evaluate`.
  """
  def f(params, images):
    if isinstance(model, MAEPlus):
      feats = model.apply({"params": params}, images, method=MAEPlus.features)
    else:
      feats = model(params, images)
    return feats.astype(jnp.float32)
  if mesh is None:
    return jax.jit(f)
  return jax.jit(parallel.under_mesh(f, mesh),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))


def extract_features(model, params, images: np.ndarray, batch_size: int = 256,
                     mesh=None) -> np.ndarray:
  """(N, H, W, 3) ImageNet-normalised images -> (N, D) float32 encoder features.

  Runs `MAEPlus.features` (no masking; or `model(params, images)` for another hashable
  feature function, see `_features_fn`) in batches of `batch_size`; the last batch is
  zero-padded to `batch_size`, so the function compiles once. With `mesh` the batch is
  split over the mesh's `data` axis (batch_size must be divisible by the mesh size) and
  the parameters are replicated; `images` must then be the same on every process.
  """
  images = np.asarray(images)
  n = images.shape[0]
  if mesh is not None and batch_size % mesh.size:
    raise ValueError(f"batch_size {batch_size} is not divisible by the mesh size {mesh.size}")
  fn = _features_fn(model, mesh)
  if mesh is not None:
    params = jax.device_put(params, parallel.replicated(mesh))
  if n == 0:
    dim = jax.eval_shape(fn, params, jax.ShapeDtypeStruct(
        (batch_size,) + images.shape[1:], jnp.float32)).shape[-1]
    return np.zeros((0, dim), np.float32)
  outs = []
  for start in range(0, n, batch_size):
    batch = images[start:start + batch_size].astype(np.float32, copy=False)
    rows = batch.shape[0]
    if rows < batch_size:
      batch = np.concatenate(
          [batch, np.zeros((batch_size - rows,) + batch.shape[1:], np.float32)])
    if mesh is not None:
      batch = jax.device_put(batch, parallel.batch_sharding(mesh))
    outs.append((fn(params, batch), rows))  # dispatched asynchronously; fetched below
  return np.concatenate([np.asarray(jax.device_get(o))[:rows] for o, rows in outs]
                        ).astype(np.float32, copy=False)


# -- k-NN --------------------------------------------------------------------------------
def _l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(norm, 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "temperature"))
def _knn_predict(train_feats, train_labels, test_feats, *, k: int, num_classes: int,
                 temperature: Optional[float]):
  """Predicted class for each row of test_feats (all features already L2-normalised)."""
  sim = jnp.matmul(test_feats, train_feats.T, precision=jax.lax.Precision.HIGHEST)
  top_sim, top_idx = jax.lax.top_k(sim, k)              # (C, k)
  top_labels = train_labels[top_idx]                    # (C, k)
  weights = (jnp.ones_like(top_sim) if temperature is None
             else jnp.exp(top_sim / temperature))
  votes = (jax.nn.one_hot(top_labels, num_classes, dtype=jnp.float32)
           * weights[..., None]).sum(axis=1)            # (C, num_classes)
  return jnp.argmax(votes, axis=-1)                     # first max = smallest class on ties


def knn_top1(train_feats, train_labels, test_feats, test_labels, k: int = 20,
             num_classes: Optional[int] = None, temperature: Optional[float] = None,
             chunk_size: int = 256) -> float:
  """Top-1 accuracy (fraction in [0, 1]) of a k-NN classifier with cosine similarity.

  train_feats (M, D), train_labels (M,) ints in [0, num_classes); test_feats (T, D),
  test_labels (T,). num_classes defaults to 1 + the largest label seen. temperature None:
  plain majority vote (ties -> smallest class); a float: DINO's weighted vote
  exp(sim / temperature). Test rows are processed `chunk_size` at a time (the last chunk
  zero-padded, so one compile) to bound the (chunk_size, M) similarity matrix.
  """
  train_labels = np.asarray(train_labels).astype(np.int32).reshape(-1)
  test_labels = np.asarray(test_labels).astype(np.int32).reshape(-1)
  train = _l2_normalize(train_feats)
  test = _l2_normalize(test_feats)
  if train.shape[0] != train_labels.shape[0] or test.shape[0] != test_labels.shape[0]:
    raise ValueError("features and labels differ in length")
  if train.shape[0] == 0:
    raise ValueError("no training examples")
  if test.shape[0] == 0:
    return float("nan")
  if num_classes is None:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  if train_labels.min() < 0 or train_labels.max() >= num_classes:
    raise ValueError(f"train labels outside [0, {num_classes})")
  k = int(min(k, train.shape[0]))
  if k < 1:
    raise ValueError("k must be >= 1")
  temperature = None if temperature is None else float(temperature)
  train_d = jnp.asarray(train)
  labels_d = jnp.asarray(train_labels)
  n_test = test.shape[0]
  chunk = int(min(chunk_size, n_test))
  preds = []
  for start in range(0, n_test, chunk):
    part = test[start:start + chunk]
    rows = part.shape[0]
    if rows < chunk:
      part = np.concatenate([part, np.zeros((chunk - rows, part.shape[1]), np.float32)])
    preds.append((_knn_predict(train_d, labels_d, jnp.asarray(part), k=k,
                               num_classes=int(num_classes), temperature=temperature), rows))
  pred = np.concatenate([np.asarray(p)[:rows] for p, rows in preds])
  return float(np.mean(pred == test_labels))


def knn_eval(model: MAEPlus, params, train_images, train_labels, test_images, test_labels,
             k: int = 20, batch_size: int = 256, mesh=None, num_classes: Optional[int] = None,
             temperature: Optional[float] = None) -> dict:
  """Features of both sets with `extract_features`, then `knn_top1`: {"knn_top1": acc}."""
  train_feats = extract_features(model, params, train_images, batch_size, mesh)
  test_feats = extract_features(model, params, test_images, batch_size, mesh)
  return {"knn_top1": knn_top1(train_feats, train_labels, test_feats, test_labels, k=k,
                               num_classes=num_classes, temperature=temperature)}
