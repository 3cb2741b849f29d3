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
from adpe_jax.errors import DataError, ExitCode

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags, defined only when it runs: absl flags are process-wide, and
  an import (a test's) must not meet another entry's flag of the same name (export's --out)."""
  flags.DEFINE_string("source", None, "a get_source name, e.g. folder:/data/in", required=True)
  flags.DEFINE_string("split", "train", "the source's split")
  flags.DEFINE_string("data_dir", None, "the directory a relative source name is taken under")
  flags.DEFINE_string("out", None, "the directory to write (local)", required=True)
  flags.DEFINE_integer("short_side", 256, "the stored images' shorter side at most")
  flags.DEFINE_integer("quality", 90, "JPEG quality of re-encoded images")
  flags.DEFINE_integer("num_shards", 0, "0 = about 1000 examples per shard")
  flags.DEFINE_integer("num_processes", os.cpu_count() or 1, "processes writing shards")
  flags.DEFINE_enum("bad_images", "stop", validate.BAD_IMAGE_POLICIES,
                    "a file that does not decode: stop naming it, or store its substitute "
                    "and list it")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    source = sources.get_source(FLAGS.source, FLAGS.split, FLAGS.data_dir)
    index = prepare_lib.prepare(source, FLAGS.out, FLAGS.short_side, FLAGS.quality,
                                FLAGS.num_shards, FLAGS.num_processes,
                                source_name=f"{FLAGS.source}/{FLAGS.split}",
                                bad_images_policy=FLAGS.bad_images)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return ExitCode.REFUSED
  for _, path, reason in index["bad_images"]:
    print(f"bad image {path} ({reason}): stored as its substitute", file=sys.stderr)
  print(f"prepared {index['num_examples']} examples in {len(index['shards'])} shards: "
        f"{FLAGS.out}; {len(index['bad_images'])} bad files substituted")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
