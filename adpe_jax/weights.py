"""One loader for the weights a run starts from, probes or exports: `load(path) -> Weights`.

  w = weights.load(path)      # w.params, w.run, w.source, w.kind, w.pos_embed
  run = weights.metadata(path)  # only the run metadata of a checkpoint of ours

`path` is one of (`Weights.kind`):

  "ours"               a run workdir of ours (its newest complete checkpoint), its
                       `checkpoints/` directory, or one `checkpoints/<step>` directory
                       (`checkpoint.rundir.step_dir`; beside a live trainer that
                       deletes it during the read, the newest complete one,
                       `checkpoint.read_checkpoint`).  Only `params` is read
                       (`checkpoint.read_params`: orbax partial restore, no optimizer
                       state, no adversary),
                       onto the default device, in the block layout it was saved in, and
                       checked against the checksums written at save time; `run` is the
                       run metadata written with it.
  "original_pretrain"  the original AdPE's pretraining `.pth` (`{"model": state_dict, ...}`,
                       any tensor named `*adv*` or `rpe_k`, or `args.pe_type`, and no
                       `head`): encoder, decoder and mask token in `params`, its `*adv*`
                       tensors in `adversary`.
  "original_finetune"  the original's fine-tune `.pth` (`main_finetune.py`: a `head`, and
                       iRPE tables or `args.pe_type`): the classifier with its learned
                       `pos_embed`, `fc_norm` (global pool) or `norm` (cls token), `head`.
  "mae"                facebookresearch/mae's `.pth` (timm's ViT names): a pretraining
                       encoder (with or without its decoder) or a fine-tuned classifier
                       (`fc_norm`, `head`).  The original's APE fine-tune model IS MAE's
                       `models_vit.py`, so its `.pth` without `args` reads as "mae": the
                       same tensors either way.

A `.pth` (also `.pt`, `.bin`) is read with torch (`import_torch`: the package's one
import of it, lazy; CPU is enough) and each tensor renamed and re-laid-out by
`adpe_jax.convert.convert_tensor`.
The fixed sin-cos `pos_embed` / `decoder_pos_embed` of a pretraining checkpoint and the
iRPE `no_shift` buffers are not parameters; `Weights.pos_embed` is the position table the
encoder was trained with, whatever the source.

`init_classifier(config, model, fresh)` loads such weights into the fine-tune classifier
(`config.init` of fine-tuning, the linear probe and the k-NN entry).

Every error is a `CheckpointError` (`init_classifier`: an `InitError`) whose one sentence
names the path.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from adpe_jax import convert, layout, storage
from adpe_jax.checkpoint import rundir
from adpe_jax.checkpoint.checkpointer import read_checkpoint, short_error
from adpe_jax.errors import CheckpointError, InitError
from adpe_jax.models import posembed

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
KINDS = ("ours", "original_pretrain", "original_finetune", "mae")


@dataclasses.dataclass(frozen=True)
class Weights:
  """What `load` read.

  params: our parameter names (nested dicts).  "ours": as saved (scanned or unrolled,
    `adpe_jax.layout` converts); a `.pth`: unrolled (`blocks_i`), numpy.
  run: the run metadata of a checkpoint of ours ({} for a `.pth`).
  source: the step directory read (ours) or the `.pth` file.
  kind: one of KINDS.
  pos_embed: the (1 + grid**2, D) position table the encoder was trained with: a
    classifier's learned `pos_embed`, a pretraining `.pth`'s fixed table, or the sin-cos
    table of the grid in our run metadata; None where none is known.
  adversary: the original's `*adv*` tensors of a pretraining `.pth` ({} otherwise: ours
    are not read).
  """
  params: dict
  run: dict
  source: str
  kind: str
  pos_embed: np.ndarray | None = None
  adversary: dict = dataclasses.field(default_factory=dict)


def is_torch_file(path) -> bool:
  return str(path).endswith(TORCH_SUFFIXES)


def load(path) -> Weights:
  """The weights at `path` (see the module docstring).  Raises CheckpointError."""
  p = _existing(path)
  return _load_torch(path, p) if is_torch_file(path) else _load_ours(path)


def metadata(path) -> dict | None:
  """The run metadata of our checkpoint at `path` (the same walk as `load`, reading only
  its meta item); None for a PyTorch file, which has none.  Raises CheckpointError."""
  _existing(path)
  if is_torch_file(path):
    return None
  return _read_ours(path, params=False)[1].get("run", {})


# -- ours ------------------------------------------------------------------------------------

def _existing(path):
  p = storage.resolve(path)
  if not p.exists():
    raise CheckpointError(f"checkpoint path {path} does not exist.")
  return p


def _read_ours(path, params: bool = True):
  """(step directory, meta, params) of a workdir (its newest complete checkpoint, again
  from the newest when a live trainer deletes it during the read), of its `checkpoints/`,
  or of a step directory itself (`checkpoint.read_checkpoint`)."""
  read = read_checkpoint(path, params=params)
  if read is None:
    raise CheckpointError(
        f"{path} holds no checkpoint of ours (no checkpoints/<step>/{rundir.STATE_ITEM} "
        f"directory) and is not a PyTorch file ({', '.join(TORCH_SUFFIXES)}).")
  return read


def _load_ours(path) -> Weights:
  step_dir, meta, params = _read_ours(path)
  run = meta.get("run", {})
  return Weights(params=params, run=run, source=str(step_dir), kind="ours",
                 pos_embed=_our_table(params, run))


def _our_table(params, run: dict) -> np.ndarray | None:
  if "pos_embed" in params:  # a classifier of ours: its learned table
    return np.asarray(params["pos_embed"]).reshape(-1, np.shape(params["pos_embed"])[-1])
  patch = (run.get("model") or {}).get("patch_size") or 0
  grid = int(run.get("image_size") or 0) // max(int(patch), 1)
  cls = params.get("cls_token")
  if grid < 1 or cls is None or patch < 1 or np.shape(cls)[-1] % 4:
    return None  # no grid, or no sin-cos table of that width
  return posembed.sincos_table(grid, np.shape(cls)[-1])


# -- PyTorch files ---------------------------------------------------------------------------

def import_torch(purpose: str):
  """The torch module, imported here only (optional: only PyTorch files need it).
  `purpose` begins the error's sentence ("reading the PyTorch checkpoint X")."""
  try:
    import torch  # noqa: PLC0415
  except ImportError as e:
    raise CheckpointError(f"{purpose} needs torch (CPU is enough: pip install torch), which "
                          f"is not installed.") from e
  return torch


def _torch_checkpoint(path, p) -> tuple[dict, Any]:
  """(state dict as numpy, the checkpoint's `args` or None) of a torch.save file."""
  torch = import_torch(f"reading the PyTorch checkpoint {path}")
  try:  # the original's and MAE's files hold an argparse.Namespace: a full unpickle
    ckpt = torch.load(io.BytesIO(p.read_bytes()), map_location="cpu", weights_only=False)
  except Exception as e:
    raise CheckpointError(f"PyTorch checkpoint {path} could not be read by torch.load "
                          f"({short_error(e)}).") from e
  sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
  if isinstance(sd, dict):
    sd = {k: v.detach().cpu().numpy() for k, v in sd.items() if hasattr(v, "detach")}
  if not sd:
    raise CheckpointError(f"PyTorch checkpoint {path} holds no state dict (a 'model' entry "
                          f"of tensors).")
  return sd, ckpt.get("args") if isinstance(ckpt, dict) else None


def _kind_of(sd: dict, args) -> str:
  pe_type = args.get("pe_type") if isinstance(args, dict) else getattr(args, "pe_type", None)
  rpe = any(".rpe_k." in k for k in sd)
  if "head.weight" in sd:
    return "original_finetune" if rpe or pe_type is not None else "mae"
  adv = any("adv" in k.split(".")[-1] for k in sd)
  return "original_pretrain" if adv or rpe or pe_type is not None else "mae"


def _load_torch(path, p) -> Weights:
  sd, args = _torch_checkpoint(path, p)
  kind = _kind_of(sd, args)
  classifier = kind in ("original_finetune", "mae") and "head.weight" in sd
  flat = {"params": {}, "adversary": {}}
  for name, value in sd.items():
    if name.endswith("no_shift") or name == "decoder_pos_embed" or (
        name == "pos_embed" and not classifier):
      continue  # fixed tables and buffers, not parameters
    path_, arr = convert.convert_tensor(name, value, convert.is_layernorm(name))
    flat["params" if convert.collection_of(name) == "params" else "adversary"][path_] = arr
  pos = sd.get("pos_embed")
  return Weights(params=traverse_util.unflatten_dict(flat["params"]), run={},
                 source=str(path), kind=kind,
                 pos_embed=None if pos is None else np.asarray(pos).reshape(-1, pos.shape[-1]),
                 adversary=traverse_util.unflatten_dict(flat["adversary"]))


# -- the fine-tune classifier's initial weights (config.init) --------------------------------

# Not the encoder's: a decoder, the mask token, and what a classifier adds on top.
_NOT_ENCODER = ("mask_token", "pos_embed", "head", "fc_norm")


def _shape(x) -> tuple:
  return tuple(np.shape(x))


def init_classifier(config, model, fresh: dict) -> tuple[dict, dict]:
  """`fresh` (the `ViTClassifier`'s initialised params) with the weights of `config.init`
  loaded into it; returns (params, info for summary.json).

  The encoder (patch_embed, cls_token, blocks_i; `norm` for a cls-token model) is loaded
  from any source.  pos_embed = the source's position table (`Weights.pos_embed`: a
  pretraining's fixed sin-cos, a classifier's learned one) resized with torch's bicubic
  to the fine-tune grid.  From a classifier checkpoint (the original's or MAE's
  fine-tune `.pth`, a fine-tune workdir of ours) `fc_norm` is loaded into a global-pool
  model (as the original's `strict=False` load), and `head` too when it fits -- the same
  number of classes and the same pooling (global pool with `fc_norm`, or the cls token
  with `norm`) -- so a fine-tuned classifier evaluates as it was trained.  From a
  pretraining source both stay fresh (head trunc-normal 2e-5).  The original's
  `--finetune` also loads a fitting head but then redraws head.weight; here a fitting
  head is kept, as its `--resume` / `--eval` do.
  """
  path = config.init
  d = model.embed_dim
  try:
    w = load(path)
  except CheckpointError as e:
    raise InitError(f"config field init={path!r} cannot be used: {e}") from e
  info: dict[str, Any] = {"init": path, "init_kind": w.kind}
  # A scanned pretraining model's blocks/... (leading depth axis) -> blocks_i: the
  # classifier stays unrolled (per-layer drop path, layer-wise lr decay by name).
  params = layout.to_unrolled(dict(w.params))
  if w.kind == "ours":
    run = w.run
    info["init_checkpoint"] = w.source
    if run.get("model", {}).get("patch_size") not in (None, config.model.patch_size):
      raise InitError(
          f"config field init={path!r} was pretrained with patch size "
          f"{run['model']['patch_size']}, but model.patch_size={config.model.patch_size}.")
    info["init_adversary"] = run.get("adversary", {}).get("kind")
  encoder = {k: v for k, v in params.items()
             if not (k.startswith("decoder") or k in _NOT_ENCODER)}
  if model.global_pool:
    encoder.pop("norm", None)  # the original deletes the encoder's final norm
  head_loaded = _take_head(params, model, fresh, encoder)
  info["init_head"] = "loaded" if head_loaded else "fresh"

  source_pe = "rpe" if any("rpe_k" in k for k in traverse_util.flatten_dict(encoder)) else "ape"
  if source_pe == "ape" and model.pe == "rpe":
    raise InitError(f"config field init={path!r} is an APE encoder (no iRPE tables), so it "
                    f"cannot initialise model.pe={config.model.pe!r}; use model.pe='ape'.")
  if source_pe == "rpe" and model.pe == "ape":
    logging.warning("init %s has iRPE tables; model.pe=ape drops them (as the original's "
                    "strict=False load)", path)
    encoder = traverse_util.unflatten_dict(
        {k: v for k, v in traverse_util.flatten_dict(encoder).items() if "rpe_k" not in k})
  want = traverse_util.flatten_dict(fresh)
  got = traverse_util.flatten_dict(encoder)
  missing = sorted("/".join(k) for k in want if k not in got
                   and k[0] not in ("head", "fc_norm", "pos_embed", "norm"))
  bad = [f"{'/'.join(k)} {_shape(v)} vs {_shape(want[k])}"
         for k, v in got.items() if k in want and _shape(v) != _shape(want[k])]
  extra = sorted("/".join(k) for k in got if k not in want)
  if missing or bad or extra:
    what = (f"lacks {missing[0]}" if missing else f"has {bad[0]}" if bad
            else f"has {extra[0]}, which the model does not")
    raise InitError(f"config field init={path!r} does not fit model.variant="
                    f"{config.model.variant!r} / model.pe={config.model.pe!r}: it {what}.")
  pos = w.pos_embed
  if pos is None:
    raise InitError(f"config field init={path!r} has no position table (no pos_embed entry, "
                    f"or run metadata without image_size and model.patch_size).")
  if pos.shape[-1] != d or int(round(np.sqrt(pos.shape[0] - 1))) ** 2 + 1 != pos.shape[0]:
    raise InitError(f"config field init={path!r} has a position table of shape {pos.shape}, "
                    f"not (1 + grid**2, {d}).")
  info["init_pos_grid"] = int(round(np.sqrt(pos.shape[0] - 1)))
  merged = dict(want)
  merged.update({k: jnp.asarray(v, want[k].dtype) for k, v in got.items()})
  merged[("pos_embed",)] = jnp.asarray(posembed.resize_table(pos, model.grid)[None],
                                       want[("pos_embed",)].dtype)
  return traverse_util.unflatten_dict(merged), info


def _take_head(params: dict, model, fresh: dict, encoder: dict) -> bool:
  """Puts the source's fc_norm (global pool) and, when it fits the model, its head into
  `encoder`; returns whether the head was taken."""
  if model.global_pool and "fc_norm" in params:
    encoder["fc_norm"] = params["fc_norm"]
  if "head" not in params:
    return False
  same_pool = ("fc_norm" in params) == bool(model.global_pool)
  fits = same_pool and all(_shape(params["head"].get(k)) == _shape(fresh["head"][k])
                           for k in fresh["head"])
  if not fits:
    logging.warning("init head %s (%s) does not fit the model (num_classes %d, %s): the "
                    "head starts fresh", _shape(params["head"].get("kernel")),
                    "global pool" if "fc_norm" in params else "cls token", model.num_classes,
                    "global pool" if model.global_pool else "cls token")
    return False
  encoder["head"] = params["head"]
  return True
