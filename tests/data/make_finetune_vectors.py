"""Writes tests/data/finetune_pe{0,1,2}[_cls].{npz,json}: the original AdPE's fine-tune
classifier (`model/{ape,rpe,rpe_interpolate}_models_vit.py`, `--pe_type 0/1/2`) on fixed
weights and images, for `tests/test_weights.py` (our logits from the same weights, read
from a `.pth` through `adpe_jax.weights`).

  git clone https://github.com/maple-research-lab/AdPE /tmp/AdPE
  python -m pip install --no-deps --target /tmp/timm032 timm==0.3.2
  python tests/data/make_finetune_vectors.py --reference-src /tmp/AdPE --timm-dir /tmp/timm032

The original runs from its own checkout (nothing of it is copied here) on this
environment's torch, with timm 0.3.2 put first on sys.path and the import shims of
`benchmarks/peer_shims/peer_compat.py` (torch._six, numpy.float, a torchvision stand-in,
easydict), as `benchmarks/peer_pytorch.py` runs its pretraining code.  It runs in a
child process so the timm the tests import stays untouched.

Each file: every entry of the classifier's state_dict under its original name (PyTorch
layout), `images` (N, 3, H, W) and `logits` (N, num_classes) of `model.eval()(images)`,
all float64 (float32 for pe_type 2, see CASES); the JSON beside it gives the model's
arguments, the versions and whether the original's `rpe_ops` extension was built (it is
not here: the original's pure-torch iRPE path runs, as on any CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIMS = HERE.parent.parent / "benchmarks" / "peer_shims"
MODULES = {0: "model.ape_models_vit", 1: "model.rpe_models_vit",
           2: "model.rpe_interpolate_models_vit"}
# Our "test" variant: 28 px, patch 4 (a 7x7 grid, 50 RPE buckets, as the pretraining
# vectors), embed 32, depth 2, 4 heads (head dim 8); 10 classes; batch 4.
MODEL = dict(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4,
             num_classes=10)
CASES = {  # file stem: (pe_type, global_pool, dtype)
    "finetune_pe0": (0, True, "float64"), "finetune_pe1": (1, True, "float64"),
    # The original's interpolated lookup casts its operands to float32 (irpe_interpolate.py
    # `.float()`), so a float64 model fails there: this case runs in float32.
    "finetune_pe2": (2, True, "float32"),
    "finetune_pe0_cls": (0, False, "float64"), "finetune_pe1_cls": (1, False, "float64"),
}
BATCH, SEED = 4, 0


def child(reference_src: str, timm_dir: str, out_dir: str) -> None:
  sys.path[:0] = [str(SHIMS), timm_dir, reference_src]
  import peer_compat
  shims = peer_compat.install()
  import importlib
  import warnings
  from functools import partial

  import numpy as np
  import timm
  import torch
  from torch import nn

  warnings.filterwarnings("ignore")
  assert timm.__version__ == "0.3.2", timm.__version__
  for stem, (pe_type, global_pool, dtype) in CASES.items():
    models_vit = importlib.import_module(MODULES[pe_type])
    torch.manual_seed(SEED + pe_type)
    # The factories vit_base_patch16 & co. with the tiny widths (the same keyword set).
    model = models_vit.VisionTransformer(
        global_pool=global_pool, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        drop_path_rate=0.0, **MODEL)
    model = (model.double() if dtype == "float64" else model.float()).eval()
    rng = np.random.default_rng(SEED + 10 * pe_type + global_pool)
    with torch.no_grad():  # realistic-scale random values everywhere (the RPE tables too,
      for name, p in model.named_parameters():  # which the original initialises to zero)
        scale = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0
        p.copy_(torch.from_numpy(scale + 0.2 * rng.standard_normal(tuple(p.shape))))
    images = rng.standard_normal((BATCH, 3, MODEL["img_size"], MODEL["img_size"])).astype(dtype)
    with torch.no_grad():
      logits = model(torch.from_numpy(images)).numpy()
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    np.savez(os.path.join(out_dir, f"{stem}.npz"), images=images, logits=logits, **sd)
    meta = {"original": "maple-research-lab/AdPE " + MODULES[pe_type].replace(".", "/") + ".py",
            "pe_type": pe_type, "global_pool": global_pool, "model": MODEL, "batch": BATCH,
            "dtype": str(logits.dtype), "torch": torch.__version__, "timm": timm.__version__,
            "shims": shims, "keys": sorted(sd),
            "rpe_ops": getattr(importlib.import_module("position_embed.irpe"),
                               "RPEIndexFunction", None) is not None}
    (Path(out_dir) / f"{stem}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(stem, logits.shape, float(np.abs(logits).max()), file=sys.stderr)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--reference-src", required=True, help="a checkout of maple-research-lab/AdPE")
  ap.add_argument("--timm-dir", required=True, help="a directory holding timm 0.3.2")
  ap.add_argument("--out", default=str(HERE), help="output directory (default: tests/data)")
  ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args._child:
    child(args.reference_src, args.timm_dir, args.out)
    return
  r = subprocess.run([sys.executable, __file__, "--_child", "--reference-src",
                      os.path.abspath(args.reference_src), "--timm-dir",
                      os.path.abspath(args.timm_dir), "--out", os.path.abspath(args.out)],
                     cwd=os.path.abspath(args.reference_src), check=False)
  sys.exit(r.returncode)


if __name__ == "__main__":
  main()
