"""k-NN top-1 of a frozen encoder: any pretraining workdir / checkpoint of ours or the
original's .pth.

Command:
  python -m adpe_jax.main --config=configs/knn.py --workdir=runs/knn --config.init=runs/demo
Arguments (comma-separated): smoke (500 / 200 examples at the test size), dino (DINO's
  exp(sim / 0.07) weighted vote instead of the plain majority).
What: k = 20, cosine similarity, train split -> test split of data.source (Fashion-MNIST),
  features = the mean of the encoder's normalised patch tokens (model.pool "mean", as the
  pretraining k-NN; "cls" / "avg" also allowed).  Encoder fields left 0 / "" come from
  the checkpoint's run metadata; a .pth needs model.variant, model.patch_size, model.pe
  (and model.rpe_lookup for rpe) and image_size set.
Output: WORKDIR/summary.json with knn_top1 (a fraction).
"""

from adpe_jax.config import probe
from adpe_jax.config.common import parse_arg
from adpe_jax.errors import ConfigError


def get_config(arg=None):
  args = parse_arg(arg)
  unknown = args - {"smoke", "dino"}
  if unknown:
    raise ConfigError(f"config argument(s) {sorted(unknown)} unknown; allowed: "
                      f"smoke, dino.")
  c = probe.knn_config()
  if "dino" in args:
    c.temperature = 0.07
  if "smoke" in args:
    probe.apply_smoke(c)
  return c
