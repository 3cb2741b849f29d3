"""Export an encoder or classifier as a timm `VisionTransformer` state dict.

  python -m adpe_jax.export --workdir=DIR --out=FILE.safetensors   (or FILE.pth)

DIR is anything `adpe_jax.weights.load` reads: a pretraining or fine-tuning workdir of
ours (its newest checkpoint's `params`), one `checkpoints/<step>` directory, or the
original's / MAE's `.pth`.  Keys and layouts are timm's (and mmsegmentation's MAE
backbone / detectron2's ViTDet after their own MAE-checkpoint conversion): cls_token,
pos_embed (1, 1+L, D), patch_embed.proj.{weight,bias}, blocks.i.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight,bias}, and
  * pretraining: norm.{weight,bias} (the encoder's final LayerNorm); pos_embed = the fixed
    sin-cos table of the pretraining grid; decoder, mask token and adversary dropped.
    Load strictly into timm.models.VisionTransformer(img_size, patch_size, embed_dim,
    depth, num_heads, num_classes=0) with
      global_pool='token'              -> norm(x)[:, 0], the cls token (MAE's linear probe);
      global_pool='avg', fc_norm=False -> the mean of norm(x)'s patch tokens (what k-NN
                                          uses here, `MAEPlus.features`).
    Not with global_pool='avg' alone: timm then defaults to fc_norm=True, which expects
    fc_norm.* in place of norm.*, and a strict load refuses this state dict;
  * fine-tuning: the learned pos_embed, fc_norm.* and head.* (global pooling, timm
    VisionTransformer(global_pool='avg', fc_norm=True, num_classes=K)), or norm.* with
    cls pooling (global_pool='token').
iRPE models: timm's ViT has no relative-position term; the tables are written under the
original's names (`blocks.i.attn.rpe_k.lookup_table_weight`, (1, head_dim, 50)), which a
timm model loaded with strict=False ignores -- and then computes a different function.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np
from absl import app, flags
from flax import traverse_util

from adpe_jax import convert, layout, weights
from adpe_jax.errors import AdpeError, CheckpointError, ConfigError, ExitCode
from adpe_jax.models import posembed



def _define_flags() -> None:
  """The command line's flags, defined only when this module runs as the program:
  adpe_jax.main defines its own --workdir, and both modules import into one process (the
  test suite; a notebook)."""
  flags.DEFINE_string("workdir", None, "A pretraining or fine-tuning workdir of ours "
                      "(or a step directory, or the original's / MAE's .pth).")
  flags.DEFINE_string("out", None, "Output file: *.safetensors or *.pth.")

_ENCODER_TOP = ("patch_embed", "cls_token", "pos_embed", "norm", "fc_norm", "head")


def timm_state_dict(params: dict, run: dict, pos_embed: np.ndarray | None = None
                    ) -> dict[str, np.ndarray]:
  """Our params (MAEPlus, scanned or not, or ViTClassifier) + the run metadata -> timm ViT
  state dict.  Params without a pos_embed (pretraining) get `pos_embed` ((1+L, D), e.g.
  `Weights.pos_embed`) or else the sin-cos table of the grid in `run`."""
  flat = traverse_util.flatten_dict(layout.to_unrolled(dict(params)))
  out = {}
  for path, value in flat.items():
    if not (path[0] in _ENCODER_TOP or path[0].startswith("blocks_")):
      continue  # decoder, mask token
    name, arr = convert.tensor_to_torch(path, np.asarray(value))
    out[name] = np.ascontiguousarray(arr, np.float32)
  if "pos_embed" not in out and pos_embed is not None:
    out["pos_embed"] = np.asarray(pos_embed, np.float32).reshape(1, -1, pos_embed.shape[-1])
  elif "pos_embed" not in out:  # pretraining: the fixed table of the pretraining grid
    grid = int(run["image_size"]) // int(run["model"]["patch_size"])
    out["pos_embed"] = posembed.sincos_table(grid, out["cls_token"].shape[-1])[None].astype(
        np.float32)
  return out


def _check_out(out: str) -> None:
  """Refuse, before anything is read or written, an --out whose directory is missing or
  not writable, or that is a directory."""
  if not out.endswith((".safetensors", ".pth", ".pt")):
    raise ConfigError(f"--out={out!r} must end in .safetensors or .pth.")
  folder = os.path.dirname(os.path.abspath(out))
  if os.path.isdir(out):
    raise ConfigError(f"--out={out} is a directory; name a file in it.")
  if not os.path.isdir(folder):
    raise ConfigError(f"--out={out}: its directory {folder} does not exist; create it "
                      f"or write elsewhere.")
  try:  # a file created and removed: os.access says yes to root on a read-only mount
    fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=folder)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--out={out}: its directory {folder} is not writable "
                      f"({e.strerror or e}); write elsewhere.") from e


def _user_mode() -> int:
  """0666 less the umask: the mode `open()` gives a new file (mkstemp's is 0600)."""
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


def save(state_dict: dict[str, np.ndarray], out: str) -> None:
  """Writes `out` whole or not at all (a temporary file in its directory, renamed), with
  the user's normal file mode; a failure names --out and the errno text."""
  _check_out(out)
  if out.endswith(".safetensors"):
    try:
      from safetensors.numpy import save_file  # noqa: PLC0415
    except ImportError as e:
      raise SystemExit("error: writing .safetensors needs the safetensors package "
                       "(pip install safetensors), which is not installed.") from e
    write = lambda path: save_file(state_dict, path)  # noqa: E731
  else:
    try:
      torch = weights.import_torch(f"writing {out}")
    except CheckpointError as e:
      raise SystemExit(f"error: {str(e).rstrip('.')}; write .safetensors instead.") from e
    write = lambda path: torch.save(  # noqa: E731
        {"model": {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}}, path)
  folder = os.path.dirname(os.path.abspath(out))
  tmp = None
  try:
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    write(tmp)
    os.chmod(tmp, _user_mode())
    os.replace(tmp, out)
    tmp = None
  except OSError as e:
    raise ConfigError(f"--out={out} could not be written ({e.strerror or e}); nothing "
                      f"was written there; free space or write elsewhere.") from e
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


def export(workdir: str, out: str) -> dict[str, np.ndarray]:
  w = weights.load(workdir)
  state_dict = timm_state_dict(w.params, w.run, w.pos_embed)
  save(state_dict, out)
  return state_dict


def main(argv):
  del argv
  workdir, out = flags.FLAGS.workdir, flags.FLAGS.out
  if not workdir or not out:
    print("error: both --workdir and --out are required.", file=sys.stderr)
    sys.exit(ExitCode.REFUSED)
  try:
    _check_out(out)  # before the checkpoint is read
    sd = export(workdir, out)
  except AdpeError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.stdout.flush()
    os._exit(ExitCode.REFUSED)
  rpe = any("rpe_k" in k for k in sd)
  print(json.dumps({"out": out, "tensors": len(sd),
                    "parameters": int(sum(np.size(v) for v in sd.values())),
                    "irpe_tables": rpe}))
  if rpe:
    print("note: this encoder has iRPE tables, which timm's VisionTransformer does not "
          "compute; load with strict=False only where that difference is intended.",
          file=sys.stderr)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
