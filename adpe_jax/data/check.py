"""Decode every image of a source up front, in parallel, and list the bad files: the work
of `python -m adpe_jax.tools.check` (the command, its output and exit status are described
there; `python -m adpe_jax.data.check` runs the same tool).

Each example is decoded as the faithful training input decodes it (the source's own
`source[i]`: Pillow, the whole file, 16-bit images scaled); a file that does not decode
(truncated, not an image) or cannot be read is bad. The list is what config field
data.skip_list takes (adpe_jax/data/bad_images.py).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import pickle

from adpe_jax.data import bad_images
from adpe_jax.errors import BadImageError, DataError

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


if __name__ == "__main__":  # the earlier command line: runs adpe_jax/tools/check.py
  import runpy

  runpy.run_module("adpe_jax.tools.check", run_name="__main__")
