"""Entry point: python -m adpe_jax.main --config=configs/vitb_rpe_coord.py --workdir=DIR"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py), e.g. configs/vitb_ape.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from adpe_jax.data.errors import DataError  # noqa: PLC0415
  from adpe_jax.defaults import ConfigError  # noqa: PLC0415
  from adpe_jax.train.pretrain import train_and_evaluate  # noqa: PLC0415
  logging.set_verbosity(logging.INFO)
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
