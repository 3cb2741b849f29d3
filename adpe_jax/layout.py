"""The layout of a model's variables: its collections (`params` and `ADVERSARY`) and its
block layouts, unrolled (`blocks_0`, `blocks_1`, ...) and scanned (`blocks` with a leading
depth axis), with the exact conversions between them.

A leaf: it imports nothing of adpe_jax, so the models (which declare the collection and
name the blocks), the adversary (which projects per block), the checkpoint and the
parallel rules (which read stacked leaves) all read the same names without importing one
another.

`MAEPlus(scan_blocks=True)` runs its encoder and its decoder as one `nn.scan` each, so
its variables hold

  params/blocks/attn/qkv/kernel            (depth, D, 3D)
  adversary/blocks/attn/rpe_k/adv_shift    (depth, 2)
  params/decoder_blocks/...                (decoder_depth, ...)

where the unrolled model (and the original, and timm, and the fine-tune classifier) has
`blocks_i/attn/qkv/kernel` (D, 3D) per block.  `to_scanned` / `to_unrolled` map one to the
other on plain nested dicts (params, the adversary, optax states holding such trees, e.g.
Adam's mu / nu): stacking and slicing only, so `to_unrolled(to_scanned(t)) == t` bit for
bit.  Everything that reads block names by index (conversion to the original's names,
export, fine-tune init) unrolls first; everything that acts per tensor on a stacked tree
(adversary projection, weight-decay mask, FSDP rule) acts per leading-index slice
(`is_stacked`, `per_block`).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The Flax variable collection of the adversary, next to "params" (adpe_jax/adversary.py:
# the model's positional input, not a parameter).
ADVERSARY = "adversary"
# The stacked block entries of a scanned model (`MAEPlus(scan_blocks=True)`).
PREFIXES = ("blocks", "decoder_blocks")


def _is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _stack(leaves: list):
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), leaves[0].dtype)
  if all(_is_array(x) for x in leaves):
    if any(isinstance(x, jax.Array) for x in leaves):
      return jnp.stack(leaves)
    return np.stack([np.asarray(x) for x in leaves])
  # Non-array leaves (optax MaskedNode, None, ...) are the same in every block: keep one.
  return leaves[0]


def _stack_trees(trees: list):
  first = trees[0]
  if isinstance(first, dict):
    keys = list(first)
    for t in trees[1:]:
      if not isinstance(t, dict) or list(t) != keys:
        raise ValueError(f"blocks differ in structure: {sorted(keys)} vs "
                         f"{sorted(t) if isinstance(t, dict) else type(t).__name__}.")
    return {k: _stack_trees([t[k] for t in trees]) for k in keys}
  return _stack(trees)


def _slice(x, i: int):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)
  if _is_array(x):
    return x[i]
  return x


def _depth_of(tree) -> int:
  if isinstance(tree, dict):
    for v in tree.values():
      d = _depth_of(v)
      if d >= 0:
        return d
    return -1
  if _is_array(tree) or isinstance(tree, jax.ShapeDtypeStruct):
    return int(tree.shape[0])
  return -1


def _slice_tree(tree, i: int):
  if isinstance(tree, dict):
    return {k: _slice_tree(v, i) for k, v in tree.items()}
  return _slice(tree, i)


def _is_dict(x) -> bool:
  return isinstance(x, dict) or type(x).__name__ == "FrozenDict"


def _map_containers(tree, fn: Callable[[dict], dict]):
  """Applies fn to every dict of the tree (innermost first), through any other pytree
  node (optax states, a TrainState); leaves are returned as they are."""
  if _is_dict(tree):
    return fn({k: _map_containers(v, fn) for k, v in dict(tree).items()})
  return jax.tree_util.tree_map(lambda x: _map_containers(x, fn) if _is_dict(x) else x,
                                tree, is_leaf=_is_dict)


def to_scanned(tree, prefixes: Sequence[str] = PREFIXES):
  """`{"blocks_0": A0, ..., "blocks_{n-1}": A_{n-1}}` -> `{"blocks": stack(A)}` wherever
  such keys occur (params, adversary, optimizer moments).  Indices must run 0..n-1."""
  patterns = {p: re.compile(rf"^{re.escape(p)}_(\d+)$") for p in prefixes}

  def convert(d: dict) -> dict:
    out, groups = {}, {}
    for k, v in d.items():
      for p, pat in patterns.items():
        m = pat.match(str(k))
        if m:
          groups.setdefault(p, {})[int(m.group(1))] = v
          break
      else:
        out[k] = v
    for p, blocks in groups.items():
      if p in out:
        raise ValueError(f"tree holds both {p!r} and {p}_<i> entries.")
      if sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"{p}_<i> indices {sorted(blocks)} are not 0..{len(blocks) - 1}.")
      out[p] = _stack_trees([blocks[i] for i in range(len(blocks))])
    return out

  return _map_containers(tree, convert)


def to_unrolled(tree, prefixes: Sequence[str] = PREFIXES):
  """Inverse of `to_scanned`: `{"blocks": S}` -> `{"blocks_i": S[i]}` (a tree already
  unrolled is returned unchanged)."""
  def convert(d: dict) -> dict:
    out = {}
    for k, v in d.items():
      if k in prefixes and isinstance(v, dict):
        depth = _depth_of(v)
        if depth < 0:
          raise ValueError(f"{k!r} holds no stacked array to unroll.")
        for i in range(depth):
          out[f"{k}_{i}"] = _slice_tree(v, i)
      else:
        out[k] = v
    return out

  return _map_containers(tree, convert)


def is_scanned(tree, prefixes: Sequence[str] = PREFIXES) -> bool:
  """True if the (params / adversary) tree has the scanned layout at its top level."""
  return isinstance(tree, dict) and any(p in tree for p in prefixes)


def is_stacked(path, prefixes: Sequence[str] = PREFIXES) -> bool:
  """True if a `jax.tree_util` key path runs through a scanned `blocks` / `decoder_blocks`
  entry, i.e. its leaf has a leading depth axis."""
  return any(getattr(k, "key", None) in prefixes for k in path)


def per_block(fn: Callable, tree, prefixes: Sequence[str] = PREFIXES):
  """tree_map of fn over the leaves, vmapped over the depth axis of stacked leaves, so a
  per-tensor operation acts on each block's tensor as it does unrolled."""
  def one(path, x):
    return jax.vmap(fn)(x) if is_stacked(path, prefixes) else fn(x)
  return jax.tree_util.tree_map_with_path(one, tree)


def per_block_ndim(path, x, prefixes: Sequence[str] = PREFIXES) -> int:
  """A leaf's number of dimensions as one block's tensor (without the depth axis)."""
  return len(getattr(x, "shape", ())) - (1 if is_stacked(path, prefixes) else 0)
