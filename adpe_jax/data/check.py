"""`check`: decode every image of a source up front, in parallel, and list the bad files.

    python -m adpe_jax.data.check --source=folder:/data/imagenet [--split=train] \\
        [--workers=16] [--out=bad.txt]

Each example is decoded as the faithful training input decodes it (the source's own
`source[i]`: Pillow, the whole file, 16-bit images scaled). Every file that does not decode
(truncated, not an image) or cannot be read is listed, one "path<TAB>reason" line each, in
source order, to --out (default: stdout only); one summary line follows. Exit status: 0 if
no file is bad, 1 if some are, 2 if the source itself cannot be opened. The --out file is
what config field data.skip_list takes: its files are then substituted without being read
(adpe_jax/data/bad_images.py).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import sys
import time

from adpe_jax import storage
from adpe_jax.data import bad_images
from adpe_jax.errors import BadImageError, DataError, ExitCode

_SOURCE = None  # the source, in a check worker process


def _init_worker(source_bytes: bytes) -> None:
  global _SOURCE
  _SOURCE = pickle.loads(source_bytes)


def check_range(start: int, stop: int, source=None) -> list[tuple[int, str, str]]:
  """(index, file, reason) of each bad example in [start, stop), in order."""
  source = source if source is not None else _SOURCE
  bad = []
  for i in range(start, stop):
    try:
      source[i]
    except BadImageError as e:
      bad.append((i, e.path, e.reason))
    except DataError as e:  # a read error (the source names the file)
      bad.append((i, bad_images.example_name(source, i), f"cannot be read: {e}"))
  return bad


def find_bad(source, workers: int = 1, chunk: int = 256) -> list[tuple[int, str, str]]:
  """Every bad example of `source`, (index, file, reason), in source order."""
  n = len(source)
  chunk = max(1, min(chunk, -(-n // (4 * max(1, workers)))))  # a few chunks per worker
  ranges = [(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]
  if workers <= 1 or len(ranges) <= 1:
    return [b for lo, hi in ranges for b in check_range(lo, hi, source)]
  context = multiprocessing.get_context("spawn")  # never fork a process with threads
  with concurrent.futures.ProcessPoolExecutor(
      min(workers, len(ranges)), mp_context=context, initializer=_init_worker,
      initargs=(pickle.dumps(source),)) as pool:
    futures = [pool.submit(check_range, lo, hi) for lo, hi in ranges]
    return [b for future in futures for b in future.result()]


def main(argv=None) -> int:
  import argparse  # noqa: PLC0415

  from adpe_jax.data import sources  # noqa: PLC0415

  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--source", required=True, help="a get_source name, e.g. folder:/data/in")
  parser.add_argument("--split", default="train")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--out", default="", help="the list of bad files (path<TAB>reason)")
  args = parser.parse_args(argv)
  t0 = time.time()
  try:
    if args.out and not storage.as_path(args.out).parent.is_dir():
      raise DataError(f"--out={args.out}: its directory does not exist; create it or choose "
                      f"another file.")
    source = sources.get_source(args.source, args.split, args.data_dir)
    bad = find_bad(source, args.workers)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return ExitCode.REFUSED
  lines = "".join(f"{path}\t{reason}\n" for _, path, reason in bad)
  if args.out:
    storage.write_text(storage.as_path(args.out), lines)
  else:
    sys.stdout.write(lines)
  where = f", listed in {args.out}" if args.out and bad else ""
  print(f"checked {len(source)} images of {args.source} (split {args.split}) in "
        f"{time.time() - t0:.1f} s: {len(bad)} bad{where}")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
