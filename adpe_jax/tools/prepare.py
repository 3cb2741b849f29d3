"""`prepare`: a source written once as ArrayRecord shards of re-encoded, bounded-side JPEGs.

    python -m adpe_jax.tools.prepare --source=folder:/data/imagenet --split=train \\
        --out=/data/imagenet_s256 [--short_side=256 --quality=90 --num_shards=256 \\
        --num_processes=16 --bad_images=stop]

and then train with `data.source = "prepared:/data/imagenet_s256"`.  (`python -m
adpe_jax.data.prepare` is the same command.)  What it writes, why, and how a bad file, a
re-run and several processes are handled: `adpe_jax.data.prepare`.  Prints each bad file
stored as its substitute (stderr) and one summary line; exit status 2 if the source cannot
be opened or prepared.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from adpe_jax.config import validate
from adpe_jax.data import prepare as prepare_lib
from adpe_jax.data import sources
from adpe_jax.errors import DataError
from adpe_jax.tools import source_flags
from adpe_jax.tools.source_flags import DATA_DIR, OUT, SOURCE, SPLIT

flags.adopt_module_key_flags(source_flags)  # --help lists them with this tool's own

_SHORT_SIDE = flags.DEFINE_integer("short_side", 256, "the stored images' shorter side at most")
_QUALITY = flags.DEFINE_integer("quality", 90, "JPEG quality of re-encoded images")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 0, "0 = about 1000 examples per shard")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", os.cpu_count() or 1,
                                      "processes writing shards")
_BAD_IMAGES = flags.DEFINE_enum("bad_images", "stop", validate.BAD_IMAGE_POLICIES,
                                "a file that does not decode: stop naming it, or store its "
                                "substitute and list it")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not OUT.value:
    raise app.UsageError("flag --out is required: the directory to write.")
  try:
    source = sources.get_source(SOURCE.value, SPLIT.value, DATA_DIR.value)
    index = prepare_lib.prepare(source, OUT.value, _SHORT_SIDE.value, _QUALITY.value,
                                _NUM_SHARDS.value, _NUM_PROCESSES.value,
                                source_name=f"{SOURCE.value}/{SPLIT.value}",
                                bad_images_policy=_BAD_IMAGES.value)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for _, path, reason in index["bad_images"]:
    print(f"bad image {path} ({reason}): stored as its substitute", file=sys.stderr)
  print(f"prepared {index['num_examples']} examples in {len(index['shards'])} shards: "
        f"{OUT.value}; {len(index['bad_images'])} bad files substituted")
  return 0


if __name__ == "__main__":
  app.run(main)
