"""PyTorch (official AdPE / MAE) pretraining state dicts -> Flax variables (one direction).

`from_torch` returns both collections: `params` (the model) and `adversary` (the
original's `*adv*` tensors, our "adversary" collection); a pretrained encoder for k-NN,
probing and export is `params` alone.

Layout rules (tests/data/README.md):
  * Conv patch embedding (D, 3, p, p) -> Dense kernel over (row, col, channel) patch
    vectors: W.transpose(2, 3, 1, 0).reshape(p*p*3, D).
  * Linear (out, in) -> Dense kernel (in, out); LayerNorm weight -> scale.
  * `blocks.3.attn.qkv` -> `blocks_3/attn/qkv` (the fused qkv layout is kept).
  * RPE `*.rpe_k.lookup_table_weight` (1, hd, 50) -> `*/rpe_k/lookup_table` (hd, 50);
    `*.rpe_k.adv_token` (1, hd, 1) -> (hd,); `*.rpe_k.adv_shift` (2,) unchanged.
  * The frozen `pos_embed`, `decoder_pos_embed` (fixed sin-cos, recomputed by the model)
    and `*.rpe_k.no_shift` are not parameters here; `pos_embed` is checked against the
    table of the model's grid so a checkpoint of another geometry is refused.
  * A scanned model (config model.scan_blocks, `adpe_jax.layout`): `from_torch`
    returns the layout of the shapes it is given (`blocks/...` with a leading depth axis);
    `to_torch` takes either.

The model is described by its parameter shapes (and grid), not by a config: this module
knows no config field and imports nothing of `adpe_jax.train`.  Reading a `.pth` file and
loading it into a classifier is `adpe_jax.weights`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from adpe_jax import layout
from adpe_jax.errors import ConversionError
from adpe_jax.layout import ADVERSARY
from adpe_jax.models import posembed

FROZEN_SUFFIXES = ("pos_embed", "no_shift")


def _flax_path(name: str) -> tuple[str, ...]:
  parts = name.split(".")
  out: list[str] = []
  i = 0
  while i < len(parts):
    part = parts[i]
    if part in ("blocks", "decoder_blocks") and i + 1 < len(parts) and parts[i + 1].isdigit():
      out.append(f"{part}_{parts[i + 1]}")
      i += 2
      continue
    out.append(part)
    i += 1
  if out[:2] == ["patch_embed", "proj"]:
    out = ["patch_embed"] + out[2:]
  last = out[-1]
  if last == "lookup_table_weight":
    out[-1] = "lookup_table"
  return tuple(out)


def convert_tensor(name: str, value: np.ndarray,
                   is_layernorm: bool) -> tuple[tuple[str, ...], np.ndarray]:
  """One torch tensor (or its gradient) -> (flax param path, array in Flax layout)."""
  value = np.asarray(value)
  path = list(_flax_path(name))
  last = path[-1]
  if path[0] == "patch_embed" and last == "weight":
    d = value.shape[0]
    return tuple(path[:-1] + ["kernel"]), value.transpose(2, 3, 1, 0).reshape(-1, d)
  if last == "weight":
    if is_layernorm:
      return tuple(path[:-1] + ["scale"]), value
    return tuple(path[:-1] + ["kernel"]), value.T
  if last == "lookup_table":
    return tuple(path), value.reshape(value.shape[-2], value.shape[-1])
  if last == "adv_token" and "rpe_k" in path:
    return tuple(path), value.reshape(-1)
  return tuple(path), value


def collection_of(name: str) -> str:
  """The Flax collection of an original tensor: "adversary" for its `*adv*` names."""
  return ADVERSARY if "adv" in name.split(".")[-1] else "params"


def is_layernorm(name: str) -> bool:
  """Whether the original's tensor `name` belongs to a LayerNorm (its `weight` -> `scale`)."""
  leaf = name.split(".")[-2] if "." in name else ""
  return leaf in ("norm", "norm1", "norm2", "decoder_norm", "fc_norm")


def from_torch(state_dict: Mapping[str, Any], shapes: Mapping[str, Any],
               grid: int | None = None, dtype=None) -> dict:
  """Official AdPE pretraining state dict -> Flax `{'params': ..., 'adversary': ...}`
  (`adversary` is {} for a model without one).

  Args:
    state_dict: name -> array (torch tensors or numpy), e.g. `checkpoint['model']`.
    shapes: the model's variables or their shapes, `{'params': ..., 'adversary': ...}`
      (e.g. `jax.eval_shape` of the init); their block layout (scanned or unrolled) is
      the layout returned.
    grid: patches per side; the state dict's `pos_embed` / `decoder_pos_embed` are checked
      against the fixed sin-cos table of this grid (None: not checked).
    dtype: optional numpy dtype to cast to (default: keep).
  Raises:
    ConversionError naming the keys or shapes that do not fit `shapes`.
  """
  scanned = layout.is_scanned(shapes.get("params", {}))
  # Names are matched block by block (unrolled); a scanned model's tree is stacked at the end.
  unrolled = {col: layout.to_unrolled(dict(shapes.get(col, {}) or {}))
              for col in ("params", ADVERSARY)}
  # One flat namespace (collection, *path): the original's names tell the collections
  # apart -- its adversary tensors are the ones named `*adv*`.
  expected = {(col,) + k: v for col in ("params", ADVERSARY)
              for k, v in traverse_util.flatten_dict(unrolled[col]).items()}

  flat = {}
  for name, value in state_dict.items():
    if hasattr(value, "detach"):
      value = value.detach().cpu().numpy()
    value = np.asarray(value)
    if name.endswith(FROZEN_SUFFIXES):
      if name in ("pos_embed", "decoder_pos_embed") and grid is not None:
        table = posembed.sincos_table(grid, value.shape[-1])
        if value.reshape(-1).shape != table.reshape(-1).shape or not np.allclose(
            value.reshape(table.shape), table, atol=1e-5):
          raise ConversionError(
              f"state dict entry {name!r} {value.shape} is not the fixed sin-cos table of a "
              f"{grid}x{grid} grid, the model's.")
      continue
    path, arr = convert_tensor(name, value, is_layernorm(name))
    if dtype is not None:
      arr = arr.astype(dtype)
    flat[(collection_of(name),) + path] = arr

  missing = sorted("/".join(k) for k in expected if k not in flat)
  unexpected = sorted("/".join(k) for k in flat if k not in expected)
  if missing or unexpected:
    raise ConversionError(
        f"state dict does not fit the model's parameters (its variant, pe or adversary "
        f"differ): missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
        f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}.")
  bad = [f"{'/'.join(k)} {flat[k].shape} != {tuple(expected[k].shape)}"
         for k in expected if flat[k].shape != tuple(expected[k].shape)]
  if bad:
    raise ConversionError(f"state dict shapes do not fit the model's parameters: {bad[:4]}.")
  out = {col: traverse_util.unflatten_dict({k[1:]: v for k, v in flat.items() if k[0] == col})
         for col in ("params", ADVERSARY)}
  return layout.to_scanned(out) if scanned else out


def _torch_name(path: tuple[str, ...]) -> str:
  """Inverse of `_flax_path` (and of the leaf renames in `convert_tensor`)."""
  out: list[str] = []
  for part in path:
    head, _, idx = part.rpartition("_")
    if head in ("blocks", "decoder_blocks") and idx.isdigit():
      out += [head, idx]
    else:
      out.append(part)
  if out[0] == "patch_embed":
    out.insert(1, "proj")
  last = out[-1]
  if last in ("kernel", "scale"):
    out[-1] = "weight"
  elif last == "lookup_table":
    out[-1] = "lookup_table_weight"
  return ".".join(out)


def tensor_to_torch(path: tuple[str, ...], value: np.ndarray) -> tuple[str, np.ndarray]:
  """One Flax leaf -> (the original's name, array in torch layout); inverse of convert_tensor."""
  value = np.asarray(value)
  name = _torch_name(path)
  last = path[-1]
  if path[0] == "patch_embed" and last == "kernel":
    d = value.shape[-1]
    p = int(round(np.sqrt(value.shape[0] // 3)))
    return name, np.ascontiguousarray(value.reshape(p, p, 3, d).transpose(3, 2, 0, 1))
  if last == "kernel":
    return name, np.ascontiguousarray(value.T)
  if last == "lookup_table":
    return name, value.reshape(1, *value.shape)
  if last == "adv_token" and "rpe_k" in path:
    return name, value.reshape(1, -1, 1)
  return name, value


def to_torch(variables: Mapping[str, Any], grid: int | None = None) -> dict:
  """Flax `{'params', 'adversary'}` of `MAEPlus` -> the original's state dict (numpy arrays).

  The inverse of `from_torch`: `from_torch(to_torch(v, grid), v, grid) == v` exactly.
  `variables` may have either block layout (a scanned one is unrolled first).  With the
  `grid` (patches per side), the fixed `pos_embed` / `decoder_pos_embed` sin-cos tables
  (1, 1+L, D) are added as the original's checkpoints hold them (D read from `cls_token`
  and `decoder_embed`).
  """
  out = {}
  for col in ("params", ADVERSARY):
    tree = layout.to_unrolled(dict(variables.get(col, {}) or {}))
    for path, value in traverse_util.flatten_dict(tree).items():
      name, arr = tensor_to_torch(path, np.asarray(value))
      out[name] = arr
  if grid is not None:
    out["pos_embed"] = posembed.sincos_table(grid, out["cls_token"].shape[-1])[None].astype(
        np.float32)
    if "decoder_embed.weight" in out:
      out["decoder_pos_embed"] = posembed.sincos_table(
          grid, out["decoder_embed.weight"].shape[0])[None].astype(np.float32)
  return out
