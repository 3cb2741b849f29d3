"""`prepare`: a source written once as ArrayRecord shards of re-encoded, bounded-side JPEGs.

    python -m adpe_jax.tools.prepare --source=folder:/data/imagenet --split=train \\
        --out=/data/imagenet_s256 [--short_side=256 --quality=90 --num_shards=256 \\
        --num_processes=16 --bad_images=stop]

(`python -m adpe_jax.data.prepare` runs the same tool, adpe_jax/tools/prepare.py), and then
train with `data.source = "prepared:/data/imagenet_s256"`.

Why: decoding a full-size ImageNet JPEG and resampling crops from it is most of the input's
CPU time (benchmarks/README.md). Stored with its shorter side at most `short_side` px (the
approach of FFCV and DailyMAE), an image decodes and resizes in about half the time. This
changes the pixels the crops see (the crop boxes are drawn on the smaller image, at the same
relative scale); the faithful path reads the original files.

Layout of OUT:
  shard-KKKKK-of-NNNNN.array_record   examples [start, start + count) of the source, in the
                                       source's order (so permutations pick the same examples);
                                       record = int64 little-endian label + JPEG bytes
  prepared.json                        written last: count, classes, shards, settings,
                                       "shard_bytes" (each shard's size; kept apart from
                                       "shards", whose entries define the data)
A file that does not decode stops `prepare` naming it (--bad_images=stop, the default), or
(--bad_images=skip) is stored as its substitute, the next example in source order that decodes
(the training pipelines' rule, adpe_jax/data/bad_images.py, so the prepared source keeps the
source's count and order), and is listed in prepared.json ("bad_images": [[index, file,
reason], ...]) and in the summary line.
Resumable: each shard is written to a temporary name and renamed when complete; a re-run
skips the shards that exist (with the right record count, and the size the index records)
and writes the rest: a missing or damaged shard (a truncated copy) is written again. Reading
checks the same (`PreparedSource`): a shard missing or of another size at start, or found
damaged while read, stops the run with one sentence naming it and the `prepare` command that
repairs it (`repair_command`). Parallel: the
shards are spread over `num_processes` processes. The output directory is local (ArrayRecord's
writer takes a local path).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import multiprocessing
import os
import pickle
import shlex
import struct
import threading

import numpy as np
from PIL import Image

from adpe_jax import storage
from adpe_jax.data import bad_images, images
from adpe_jax.data.identity import json_digest
from adpe_jax.errors import BadImageError, DataError

FORMAT = "adpe_jax.prepared/1"
INDEX = "prepared.json"
_LABEL = struct.Struct("<q")


def shard_name(k: int, num_shards: int) -> str:
  return f"shard-{k:05d}-of-{num_shards:05d}.array_record"


def shard_bounds(num_examples: int, num_shards: int) -> list[tuple[int, int]]:
  """(start, count) of each shard: contiguous, sizes differing by at most one."""
  edges = np.linspace(0, num_examples, num_shards + 1).astype(np.int64)
  return [(int(a), int(b - a)) for a, b in zip(edges[:-1], edges[1:])]


def reencode(data: bytes | None, image: np.ndarray | None, short_side: int,
             quality: int) -> bytes:
  """The stored JPEG of one example: its own bytes if it is already a JPEG with shorter side
  <= short_side (no generation loss), else decoded, resized (bicubic, aspect kept) so that its
  shorter side is short_side, and encoded at `quality`."""
  if data is not None:
    with Image.open(io.BytesIO(data)) as pil:
      pil.load()  # the whole file: a truncated JPEG is not copied as it is
      if pil.format == "JPEG" and pil.mode in ("RGB", "L") and min(pil.size) <= short_side:
        return data
      pil = images.to_8bit(pil).convert("RGB")  # 16-bit grey scaled, not clipped
  else:
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
  width, height = pil.size
  if min(width, height) > short_side:
    if width <= height:
      size = (short_side, max(1, round(height * short_side / width)))
    else:
      size = (max(1, round(width * short_side / height)), short_side)
    pil = pil.resize(size, Image.BICUBIC)
  out = io.BytesIO()
  pil.save(out, format="JPEG", quality=quality)
  return out.getvalue()


def _record(source, index: int, short_side: int, quality: int) -> bytes:
  if hasattr(source, "encoded"):
    data, label = source.encoded(index)
    try:
      payload = reencode(data, None, short_side, quality)
    except Exception as e:  # whatever Pillow says about these bytes
      raise BadImageError(bad_images.example_name(source, index), index, images.reason_of(e),
                          bad_images.check_command(source)) from e
  else:
    image, label = source[index]
    payload = reencode(None, image, short_side, quality)
  return _LABEL.pack(int(label)) + payload


_SOURCE = None  # the source, in a prepare worker process


def _init_worker(source_bytes: bytes) -> None:
  global _SOURCE
  _SOURCE = pickle.loads(source_bytes)


def _write_shard(out: str, k: int, num_shards: int, start: int, count: int, short_side: int,
                 quality: int, source=None, policy: bad_images.Policy | None = None) -> list:
  """Writes shard k (examples [start, start + count)) atomically; returns its bad files,
  [(index, file, reason)] (under policy "skip": each stored as its substitute)."""
  from array_record.python import array_record_module  # noqa: PLC0415 (heavy; workers only)

  source = source if source is not None else _SOURCE
  policy = policy or bad_images.Policy()
  final = storage.as_path(out) / shard_name(k, num_shards)
  partial = storage.as_path(out) / (shard_name(k, num_shards) + f".tmp{os.getpid()}")
  writer = array_record_module.ArrayRecordWriter(os.fspath(partial), "group_size:1")
  bad: list = []
  try:
    for i in range(start, start + count):
      _, record = bad_images.load_or_substitute(
          source, i, lambda j: _record(source, j, short_side, quality), policy,
          on_bad=lambda e: bad.append((e.index, e.path, e.reason)))
      writer.write(record)
  except BaseException:
    writer.close()
    partial.unlink(missing_ok=True)  # a stopped prepare leaves no partial shard behind
    raise
  writer.close()
  partial.replace(final)  # over a damaged shard of an earlier run (rename refuses to)
  return bad


def _shard_done(path, count: int, size: int | None = None) -> bool:
  """Whether the shard at `path` is finished: it opens with `count` records and (where an
  earlier index recorded it) has `size` bytes."""
  from array_record.python import array_record_module  # noqa: PLC0415

  if not path.exists() or (size is not None and path.stat().length != size):
    return False
  try:
    return array_record_module.ArrayRecordReader(os.fspath(path)).num_records() == count
  except Exception:  # noqa: BLE001 (a truncated shard: write it again)
    return False


def prepare(source, out: str, short_side: int = 256, quality: int = 90, num_shards: int = 0,
            num_processes: int = 1, source_name: str = "",
            bad_images_policy: str = "stop") -> dict:
  """Writes `source` into OUT (see the module docstring); returns the index it wrote.

  num_shards 0 = about 1000 examples per shard (at least num_processes shards).
  """
  if storage.is_remote(out):
    raise DataError(f"prepare writes a local directory; {out} is remote: prepare locally, "
                    f"then copy it.")
  n = len(source)
  if n == 0:
    raise DataError(f"The source {source_name or source!r} has no examples to prepare.")
  num_shards = num_shards or max(num_processes, -(-n // 1000))
  num_shards = min(num_shards, n)
  root = storage.makedirs(out)
  index_path = root / INDEX
  settings = {"short_side": short_side, "quality": quality, "num_shards": num_shards,
              "num_examples": n, "source": source_name}
  if index_path.exists():
    index = json.loads(index_path.read_text())
    if {k: index.get(k) for k in settings} != settings:
      raise DataError(f"{index_path} was prepared with {dict((k, index.get(k)) for k in settings)}"
                      f", not {settings}: choose another --out or delete it.")
  policy = bad_images.Policy(bad_images_policy, max_bad_fraction=1.0)
  previous = index.get("bad_images", []) if index_path.exists() else []
  sizes = (dict(zip([s["file"] for s in index.get("shards", [])], index["shard_bytes"]))
           if index_path.exists() and "shard_bytes" in index else {})
  bounds = shard_bounds(n, num_shards)
  todo = [(k, start, count) for k, (start, count) in enumerate(bounds)
          if not _shard_done(root / shard_name(k, num_shards), count,
                             sizes.get(shard_name(k, num_shards)))]
  if todo and num_processes > 1:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        min(num_processes, len(todo)), mp_context=context, initializer=_init_worker,
        initargs=(pickle.dumps(source),)) as pool:
      futures = [pool.submit(_write_shard, os.fspath(root), k, num_shards, start, count,
                             short_side, quality, None, policy) for k, start, count in todo]
      bad = [b for future in futures for b in future.result()]
  else:
    bad = [b for k, start, count in todo
           for b in _write_shard(os.fspath(root), k, num_shards, start, count, short_side,
                                 quality, source, policy)]
  # Bad files of shards an earlier (interrupted) run wrote are kept from its index.
  bad = sorted({tuple(b) for b in previous} | {tuple(b) for b in bad})
  index = dict(settings, format=FORMAT, num_classes=getattr(source, "num_classes", None),
               bad_images=[list(b) for b in bad],
               class_names=list(getattr(source, "class_names", ()) or ()),
               shards=[{"file": shard_name(k, num_shards), "start": start, "count": count}
                       for k, (start, count) in enumerate(bounds)],
               shard_bytes=[(root / shard_name(k, num_shards)).stat().length
                            for k in range(num_shards)])
  storage.write_text(index_path, json.dumps(index, indent=1))
  return index


def repair_command(root: str, index: dict) -> str:
  """The `prepare` command that wrote `root`, from its index: re-run, it skips the finished
  shards and writes a missing or damaged one again (the settings must be the same, or it
  refuses).  The source and split are those of the command line (index "source" is
  "<source>/<split>"); a directory prepared from Python names its source as it was given."""
  source, _, split = str(index.get("source") or "<source>").rpartition("/")
  args = [f"--source={source}", f"--split={split}"] if source else [f"--source={split}"]
  args += [f"--out={root}", f"--short_side={index.get('short_side')}",
           f"--quality={index.get('quality')}", f"--num_shards={index.get('num_shards')}"]
  if index.get("bad_images"):
    args.append("--bad_images=skip")
  return "python -m adpe_jax.tools.prepare " + " ".join(shlex.quote(a) for a in args)


class PreparedSource:
  """`source[i] -> (uint8 (H, W, 3), label)` and `encoded(i) -> (JPEG bytes, label)` of a
  directory written by `prepare` (config: data.source = "prepared:<dir>")."""

  def __init__(self, root: str):
    self.root = os.fspath(storage.as_path(root))
    index_path = storage.as_path(root) / INDEX
    text = storage.read_text(index_path)
    if text is None:
      raise DataError(f"{index_path} does not exist: {root} is not a finished prepared source; "
                      f"run `python -m adpe_jax.data.prepare --out={root} ...` (it resumes).")
    index = json.loads(text)
    if index.get("format") != FORMAT:
      raise DataError(f"{index_path} has format {index.get('format')!r}, not {FORMAT!r}.")
    self.index = index
    self.num_classes = index.get("num_classes")
    self.class_names = tuple(index.get("class_names") or ())
    self._files = [os.fspath(storage.as_path(root) / s["file"]) for s in index["shards"]]
    self._starts = np.array([s["start"] for s in index["shards"]], np.int64)
    self._counts = [int(s["count"]) for s in index["shards"]]
    self._count = int(index["num_examples"])
    self._local = threading.local()
    sizes = index.get("shard_bytes") or [None] * len(self._files)  # none: an older index
    for k, size in enumerate(sizes):  # a stat each: found here, not steps later
      path = storage.as_path(self._files[k])
      if not path.exists():
        raise self._damaged(k, "does not exist")
      if size is not None and path.stat().length != size:
        raise self._damaged(k, f"is damaged ({path.stat().length} bytes, not the {size} it "
                               f"was written with)")

  def _damaged(self, shard: int, what: str) -> DataError:
    """The one sentence for a missing or damaged shard: which, and the command repairing it."""
    return DataError(
        f"Prepared shard {self._files[shard]} {what}: re-run "
        f"`{repair_command(self.root, self.index)}` (the command that prepared "
        f"{self.root}; it skips the finished shards and writes this one again), then "
        f"re-run this command (a training run resumes from its last checkpoint).")

  def __getstate__(self) -> dict:
    state = self.__dict__.copy()
    state.pop("_local")
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._local = threading.local()

  def __len__(self) -> int:
    return self._count

  def identity(self) -> dict:
    """Count, class names and a digest of prepared.json (`adpe_jax.data.identity`): its
    shards, settings and substituted examples, not the path of the source it came from."""
    index = self.index
    kept = {k: index.get(k) for k in ("format", "short_side", "quality", "num_examples",
                                      "num_classes", "class_names", "shards")}
    kept["bad_images"] = [b[0] for b in index.get("bad_images") or ()]
    return {"kind": "prepared", "examples": self._count,
            "classes": list(self.class_names) if self.class_names else self.num_classes,
            "shards": len(self._files), "index": json_digest(kept)}

  def _reader(self, shard: int):
    readers = getattr(self._local, "readers", None)
    if readers is None:  # one reader per thread and shard, opened on first use.
      readers = self._local.readers = {}
    reader = readers.get(shard)
    if reader is None:
      from array_record.python import array_record_module  # noqa: PLC0415

      if not storage.as_path(self._files[shard]).exists():
        raise self._damaged(shard, "does not exist")
      try:
        reader = array_record_module.ArrayRecordReader(self._files[shard],
                                                       "readahead_buffer_size:0")
        count = reader.num_records()
      except Exception as e:  # noqa: BLE001 (ArrayRecord's RuntimeError of a damaged file)
        raise self._damaged(shard, f"is damaged ({e})") from None
      if count != self._counts[shard]:
        raise self._damaged(shard, f"is damaged ({count} records, not "
                                   f"{self._counts[shard]})")
      readers[shard] = reader
    return reader

  def encoded(self, index: int) -> tuple[bytes, int]:
    if not 0 <= index < self._count:
      raise IndexError(index)
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    try:
      record = self._reader(shard).read([int(index - self._starts[shard])])[0]
    except DataError:
      raise
    except Exception as e:  # noqa: BLE001 (ArrayRecord's RuntimeError of a damaged file)
      raise self._damaged(shard, f"is damaged ({e})") from None
    if len(record) < _LABEL.size:  # what a reader opened before a truncation returns
      raise self._damaged(shard, f"is damaged (example {index} reads as {len(record)} bytes)")
    return record[_LABEL.size:], _LABEL.unpack_from(record)[0]

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    data, label = self.encoded(index)
    try:
      return images.read_image(data), label
    except images.UndecodableImageError as e:
      raise BadImageError(bad_images.example_name(self, index), index, str(e)) from None


if __name__ == "__main__":  # the earlier command line: runs adpe_jax/tools/prepare.py
  import runpy

  runpy.run_module("adpe_jax.tools.prepare", run_name="__main__")
