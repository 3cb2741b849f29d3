"""`check`: decode every image of a source up front, in parallel, and list the bad files.

    python -m adpe_jax.tools.check --source=folder:/data/imagenet [--split=train] \\
        [--workers=16] [--out=bad.txt]

(`python -m adpe_jax.data.check` is the same command.)  Each example is decoded as the
faithful training input decodes it (the source's own `source[i]`: Pillow, the whole file,
16-bit images scaled; `adpe_jax.data.check.find_bad`). Every file that does not decode
(truncated, not an image) or cannot be read is listed, one "path<TAB>reason" line each, in
source order, to --out (default: stdout only); one summary line follows. Exit status: 0 if
no file is bad, 1 if some are, 2 if the source itself cannot be opened. The --out file is
what config field data.skip_list takes: its files are then substituted without being read
(adpe_jax/data/bad_images.py).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

from adpe_jax import storage
from adpe_jax.data import check as check_lib
from adpe_jax.data import sources
from adpe_jax.errors import DataError, ExitCode

FLAGS = flags.FLAGS


def check(source_name: str, split: str = "train", data_dir: str | None = None,
          workers: int = 1, out: str = "") -> int:
  """Lists the bad files of source `source_name` (to `out`, else stdout), prints the
  summary line and returns the exit status (0 none bad, 1 some, 2 no source)."""
  t0 = time.time()
  try:
    if out and not storage.as_path(out).parent.is_dir():
      raise DataError(f"--out={out}: its directory does not exist; create it or choose "
                      f"another file.")
    source = sources.get_source(source_name, split, data_dir)
    bad = check_lib.find_bad(source, workers)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return ExitCode.REFUSED
  lines = "".join(f"{path}\t{reason}\n" for _, path, reason in bad)
  if out:
    storage.write_text(storage.as_path(out), lines)
  else:
    sys.stdout.write(lines)
  where = f", listed in {out}" if out and bad else ""
  print(f"checked {len(source)} images of {source_name} (split {split}) in "
        f"{time.time() - t0:.1f} s: {len(bad)} bad{where}")
  return 1 if bad else 0


def define_flags() -> None:
  """The command line's flags, defined only when it runs: absl flags are process-wide, and
  an import (a test's) must not meet another entry's flag of the same name (export's --out)."""
  flags.DEFINE_string("source", None, "a get_source name, e.g. folder:/data/in", required=True)
  flags.DEFINE_string("split", "train", "the source's split")
  flags.DEFINE_string("data_dir", None, "the directory a relative source name is taken under")
  flags.DEFINE_integer("workers", os.cpu_count() or 1, "decoding processes")
  flags.DEFINE_string("out", "", "the list of bad files (path<TAB>reason); default: stdout")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  return check(FLAGS.source, FLAGS.split, FLAGS.data_dir, FLAGS.workers, FLAGS.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
