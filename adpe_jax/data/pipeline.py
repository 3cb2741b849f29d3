"""The pre-training input pipeline: deterministic, restartable, multi-host ready, prefetching.

Which examples form the batch of global step s, and how each is augmented, is a pure function of
(seed, s, process_index, process_count), so a run restarted at step s sees exactly the batches an
uninterrupted run would, and the only data state a checkpoint needs is the step:

  steps_per_epoch = N // global_batch_size      (the last N % global_batch_size examples of each
                                                 epoch's permutation are dropped, as a DataLoader
                                                 with drop_last=True does; they are different
                                                 examples every epoch)
  epoch           = s // steps_per_epoch
  permutation     = a permutation of range(N) drawn from (seed, epoch)
  global batch    = permutation[(s % steps_per_epoch) * global_batch_size :][:global_batch_size]
  local batch     = the process_index-th of process_count contiguous equal parts of the global
                    batch
  augmentation    = the crops of example i in epoch e use counter-based uniforms keyed by
                    (seed, e, i) (Threefry, `counter_rng`), UNIFORMS_PER_CROP per crop

Because the augmentation randomness belongs to the example (not to a process or worker), the images
of a global batch do not depend on process_count or num_threads; only which process holds which part
does.

Batch layout: shard-major, then crop-major within the shard.  The global batch is split into
num_shards equal contiguous parts of its examples, one per device of the batch axes (the
mesh's data x fsdp; default: one per process); a process holds num_shards / process_count of
them, and its rows are [shard 0: crop 0 of its examples, crop 1 of them, ...; shard 1: ...]
(crop-major as the original concatenates its crops, spec 3.3).  Assembled into a global array
process-major (jax.make_array_from_process_local_data), device d of the batch axes then holds
exactly the rows of shard d, in the same order, whether one process feeds all devices or each
process one: every device computes on the same numbers, so losses and updates do not depend on
the number of processes (2 x 1 and 1 x 2 devices agree to the last bit; the cross-device sums
add the same partial sums, in an order that only matters past 2 devices).  Each row also
carries its id, crop * global_batch + global example position (its row in a one-shard batch);
the train step draws each crop's mask from (step, id), so masks follow the crops wherever
they are.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import threading
from collections.abc import Iterator

import numpy as np
from absl import logging
from PIL import Image

from adpe_jax.data import bad_images as bad_images_lib
from adpe_jax.data import counter_rng
from adpe_jax.data import images as images_lib
from adpe_jax.data import jpeg
from adpe_jax.data import multicrop
from adpe_jax.data import workers
from adpe_jax.errors import BadImageError

# Stream tags: keep the permutation and augmentation randomness apart.
_PERMUTATION_STREAM = 0
_AUGMENTATION_STREAM = 1


OUTPUTS = ("float32", "uint8")
# What Pillow and simplejpeg raise for bytes they cannot decode (not for a bug of ours).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _part(params: multicrop.CropParams, rows) -> multicrop.CropParams:
  """The crop parameters of `rows` (a slice or an index array)."""
  return multicrop.CropParams(params.top[rows], params.left[rows], params.height[rows],
                              params.width[rows], params.flip[rows])


def default_num_threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux.
    return os.cpu_count() or 1


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The example order of one epoch, int64 (num_examples,)."""
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PERMUTATION_STREAM, epoch)))
  return rng.permutation(num_examples)


def augmentation_uniforms(seed: int, epoch: int, indices, num_crops: int) -> np.ndarray:
  """float64 (len(indices), num_crops, UNIFORMS_PER_CROP): the augmentation randomness of examples
  `indices` (source indices) in `epoch`; row i depends only on (seed, epoch, indices[i])."""
  key = counter_rng.fold_in(counter_rng.seed_key(seed), _AUGMENTATION_STREAM, epoch)
  u = counter_rng.uniforms(key, indices, num_crops * multicrop.UNIFORMS_PER_CROP)
  return u.reshape(len(u), num_crops, multicrop.UNIFORMS_PER_CROP)


class PretrainPipeline:
  """MAE+ multi-crop batches for pre-training.

  Args:
    source: random-access source (`len`, `source[i] -> (uint8 (H, W, C), label)`), read from
      several threads at once.
    global_batch_size: images (not crops) per step over all processes.
    image_size: crop side (112 in the original).
    num_crops: crops per image (4 in the original).
    seed: int in [0, 2**64).
    process_index, process_count: this host's part of the global batch (jax.process_index(),
      jax.process_count()).
    num_threads: decoding/augmentation threads (default: the CPUs this process may use).
    prefetch: batches `iterate` prepares ahead of the consumer.
    scale, ratio: RandomResizedCrop ranges (spec 1.1: --scale_min 0.08, --scale_max 1.0).
    num_workers: 0 = `iterate` computes batches in this process (threads); N > 0 = N worker
      processes (`adpe_jax.data.workers`), each computing whole batches get_batch(step) for the
      steps assigned to it, handed back through shared memory: input scales past the GIL.
    decoder, draft: JPEG fast paths for sources with `encoded(i)` (`adpe_jax.data.jpeg`):
      decoder "pil" (faithful) or "simplejpeg" (the same pixels, faster); draft=True decodes
      at reduced DCT scale where every crop allows it (changes pixels; off by default).
    output: "float32" (ImageNet-normalised on the host, the original's ToTensor + Normalize) or
      "uint8" (the crops as they are, 4x fewer bytes to the device; `normalize_on_device` in
      the train step computes the same float32 values).
    bad_images: what a file that does not decode does (`adpe_jax.data.bad_images.Policy`:
      config data.bad_images, data.max_bad_fraction, data.skip_list); default: stop.

    num_shards: the devices the batch is split over (a multiple of process_count; default
      process_count): fixes the row order (module docstring), not which examples or crops.

  `get_batch(step)` (and each batch `iterate` yields) is
  {"images": float32 (or uint8) (num_crops * local_batch, image_size, image_size, 3),
   "ids": int32 (num_crops * local_batch,)}: with q = local_batch / shards examples per shard
  (shards = num_shards / process_count), row s * num_crops * q + k * q + i is crop k of this
  process's (s * q + i)-th example (with one shard per process: row k * local_batch + i), and
  its id is k * global_batch_size + process_index * local_batch + s * q + i; the train step
  draws that row's mask from (step, id). A batch in which a bad file was substituted
  (bad_images "skip") also has "bad_images": int64 () substituted examples, "bad_indices":
  int64 (m,) and "bad_reasons": str (m,) the bad files met; `iterate` takes these out, logs
  each file the first time, counts `bad_images_seen` (substituted examples of the batches it
  yielded) and stops past data.max_bad_fraction.
  """

  def __init__(self, source, global_batch_size: int, image_size: int, num_crops: int = 4,
               seed: int = 0, process_index: int = 0, process_count: int = 1,
               num_threads: int | None = None, prefetch: int = 2,
               scale=multicrop.DEFAULT_SCALE, ratio=multicrop.DEFAULT_RATIO,
               num_workers: int = 0, decoder: str = "pil", draft: bool = False,
               output: str = "float32", bad_images: bad_images_lib.Policy | None = None,
               num_shards: int | None = None):
    num_shards = num_shards or process_count
    if num_shards % process_count:
      raise ValueError(f"num_shards {num_shards} must be a multiple of process_count "
                       f"{process_count}.")
    if global_batch_size <= 0 or global_batch_size % num_shards:
      parts = (f"process_count {process_count}" if num_shards == process_count else
               f"num_shards {num_shards} (the devices it is split over)")
      raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                       f"{parts}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    if len(source) < global_batch_size:
      raise ValueError(f"The source holds {len(source)} examples, fewer than one global batch "
                       f"({global_batch_size}).")
    if decoder not in jpeg.DECODERS:
      raise ValueError(f"decoder {decoder!r} is not one of {jpeg.DECODERS}.")
    if output not in OUTPUTS:
      raise ValueError(f"output {output!r} is not one of {OUTPUTS}.")
    counter_rng.seed_key(seed)  # validates the seed.
    self.source = source
    self.num_examples = len(source)
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.image_size = image_size
    self.num_crops = num_crops
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.steps_per_epoch = self.num_examples // global_batch_size
    # Shard-major rows: crop-major row k * local_batch + s * per_shard + i (crop k of the
    # i-th example of this process's s-th shard) is stored at row position[.] =
    # s * num_crops * per_shard + k * per_shard + i; `_run` rows in a row keep together.
    self.num_shards = num_shards
    shards = num_shards // process_count
    per_shard = self.local_batch_size // shards
    k, s, i = np.meshgrid(np.arange(num_crops), np.arange(shards), np.arange(per_shard),
                          indexing="ij")
    self._position = (s * num_crops * per_shard + k * per_shard + i).reshape(-1)
    self._run = per_shard if shards > 1 else num_crops * self.local_batch_size
    self.prefetch = prefetch
    self.scale, self.ratio = tuple(scale), tuple(ratio)
    self.num_threads = num_threads or default_num_threads()
    self.num_workers = int(num_workers)
    self.decoder, self.draft, self.output = decoder, bool(draft), output
    # The JPEG fast paths need the encoded bytes; the faithful default never asks for them.
    self._from_encoded = (decoder != "pil" or self.draft) and hasattr(source, "encoded")
    self.bad_policy = bad_images or bad_images_lib.Policy()
    self.bad_images_seen = 0   # substituted examples in the batches `iterate` yielded
    self._bad_files: set[int] = set()  # distinct bad files met by `iterate`'s batches
    self._workers = None
    self._start_threads()

  def _start_threads(self) -> None:
    self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads,
                                                       thread_name_prefix="adpe_data")
    self._permutation_lock = threading.Lock()
    self._permutations: dict[int, np.ndarray] = {}

  # A worker process gets a copy of the pipeline (and its source) by pickling, without threads.
  def __getstate__(self) -> dict:
    state = self.__dict__.copy()
    for name in ("_pool", "_permutation_lock", "_permutations", "_workers"):
      state.pop(name, None)
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._workers = None
    self._start_threads()

  # -- which examples ---------------------------------------------------------------------------

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._permutation_lock:
      permutation = self._permutations.get(epoch)
      if permutation is None:
        permutation = epoch_permutation(self.seed, epoch, self.num_examples)
        if len(self._permutations) >= 2:  # a consumer and a prefetcher near an epoch boundary.
          self._permutations.pop(min(self._permutations))
        self._permutations[epoch] = permutation
      return permutation

  def epoch_of(self, step: int) -> int:
    return step // self.steps_per_epoch

  def example_indices(self, step: int) -> np.ndarray:
    """Source indices of this process's examples at `step`, int64 (local_batch,)."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    start = (step % self.steps_per_epoch) * self.global_batch_size
    start += self.process_index * self.local_batch_size
    return self._permutation(self.epoch_of(step))[start:start + self.local_batch_size]

  # -- the batch --------------------------------------------------------------------------------

  def get_batch(self, step: int) -> dict[str, np.ndarray]:
    """{"images": float32 (num_crops * local_batch, size, size, 3), "ids": int32 (rows,)}: crop
    k of example i with id k * global_batch + global position, rows shard-major (class
    docstring; one shard per process: crop k of example i at row k * local_batch + i)."""
    indices = self.example_indices(step)
    batch, size, num_crops = self.local_batch_size, self.image_size, self.num_crops

    images: list = [None] * batch
    labels = np.zeros(batch, np.int64)
    # With a JPEG fast path, encoded[i] holds example i's bytes and images[i] only its
    # (height, width) until its crops are cut; a non-JPEG example is decoded by the source.
    encoded: list = [None] * batch
    # Bad files (data.bad_images="skip"): read[i] is the source index example i was read
    # from (its substitute's, if indices[i] does not decode); failed[i] the indices that did
    # not decode in place i (per place: a draft decode may fail at one scale only).
    read = indices.copy()
    failed: dict[int, list] = {}
    bad: list = []  # BadImageError of every file that failed in this batch

    def read_one(k: int):
      if self._from_encoded:
        data, label = self.source.encoded(k)
        shape = jpeg.header_size(data)
        if shape is not None:
          return data, np.empty(shape + (0,), np.uint8), label
      return (None,) + tuple(self.source[k])

    def load_one(i: int, first: int) -> None:
      read[i], (encoded[i], images[i], labels[i]) = bad_images_lib.load_or_substitute(
          self.source, first, read_one, self.bad_policy,
          failed.get(i, ()), bad.append)

    def load(rows: range) -> None:
      for i in rows:
        load_one(i, int(indices[i]))
    self._map_chunks(load, batch, min_chunk=8)

    # Crop-major: crop row j = k * batch + i is crop k of example i.
    u = augmentation_uniforms(self.seed, self.epoch_of(step), indices, num_crops)
    u = u.transpose(1, 0, 2).reshape(num_crops * batch, multicrop.UNIFORMS_PER_CROP)
    example = np.tile(np.arange(batch), num_crops)
    heights = np.array([image.shape[0] for image in images])[example]
    widths = np.array([image.shape[1] for image in images])[example]
    params = multicrop.crop_params(u, heights, widths, self.scale, self.ratio)

    def reload(i: int, error: BadImageError) -> None:
      """Example i's JPEG did not decode: read its substitute, draw its crops again."""
      if not self.bad_policy.skips:
        raise error
      bad.append(error)
      failed.setdefault(i, []).append(int(read[i]))
      load_one(i, (int(read[i]) + 1) % self.num_examples)
      r = np.arange(num_crops) * batch + i
      heights[r], widths[r] = images[i].shape[0], images[i].shape[1]
      again = multicrop.crop_params(u[r], heights[r], widths[r], self.scale, self.ratio)
      for field in dataclasses.fields(again):
        getattr(params, field.name)[r] = getattr(again, field.name)

    # JPEG fast path: the crops of every JPEG example, cut straight from its bytes.
    decoded = (self._decode_crops(encoded, params, heights, widths, read, reload)
               if self._from_encoded else None)
    out = np.empty((num_crops * batch, size, size, 3),
                   np.uint8 if self.output == "uint8" else np.float32)

    def augment(rows: range) -> None:
      sl = slice(rows.start, rows.stop)
      if decoded is None:
        crops = multicrop.resized_crops(images, example[sl], _part(params, sl), size)
      else:
        crops = decoded[sl]
        other = np.array([j for j in rows if encoded[example[j]] is None], np.int64)
        if len(other):  # examples the source decoded (not JPEG): the faithful path.
          crops = crops.copy()
          crops[other - sl.start] = multicrop.resized_crops(
              [images[e] for e in example[other]], np.arange(len(other)),
              _part(params, other), size)
      crops = self._after_crop(crops, indices[example[sl]], self.epoch_of(step))
      # Row j goes to row position[j] (shard-major, see the class docstring): runs of rows
      # within one (crop, shard) block stay contiguous there.
      cuts = list(range(sl.start - sl.start % self._run + self._run, sl.stop, self._run))
      for lo, hi in zip([sl.start] + cuts, cuts + [sl.stop]):
        dst = out[self._position[lo]:self._position[lo] + hi - lo]
        if self.output == "uint8":
          dst[...] = crops[lo - sl.start:hi - sl.start]  # grey crops broadcast to 3 channels.
        else:
          multicrop.normalize(crops[lo - sl.start:hi - sl.start], dst)

    self._map_chunks(augment, num_crops * batch, min_chunk=32)
    position = self.process_index * batch + np.arange(batch)
    ids = np.empty(num_crops * batch, np.int32)
    ids[self._position] = (np.arange(num_crops)[:, None] * self.global_batch_size
                           + position[None]).reshape(-1)
    out = self._finish_batch({"images": out, "ids": ids}, labels, indices,
                             step)
    substituted = np.count_nonzero(read != indices)
    if substituted:  # only batches with a substitute carry these (`iterate` takes them out)
      out["bad_images"] = np.int64(substituted)
      out["bad_indices"] = np.array([e.index for e in bad], np.int64)
      out["bad_reasons"] = np.array([e.reason for e in bad])
    return out

  def _decode_crops(self, encoded: list, params: multicrop.CropParams, heights: np.ndarray,
                    widths: np.ndarray, read: np.ndarray, reload) -> np.ndarray:
    """uint8 (num_crops * batch, size, size, 3): the crops of each example with bytes in
    `encoded` (rows k * batch + i), decoded and cut by `jpeg.jpeg_crops`; other rows unset.
    A JPEG that does not decode goes to `reload(i, error)` (which raises under "stop", or
    loads example i's substitute and its crop parameters) and example i is cut again."""
    batch, size = len(encoded), self.image_size
    crops = np.empty((self.num_crops * batch, size, size, 3), np.uint8)

    def decode(rows: range) -> None:
      for i in rows:
        while encoded[i] is not None:
          r = np.arange(self.num_crops) * batch + i
          try:
            crops[r] = jpeg.jpeg_crops(encoded[i], (int(heights[i]), int(widths[i])),
                                       params.top[r], params.left[r], params.height[r],
                                       params.width[r], params.flip[r], size,
                                       decoder=self.decoder, draft=self.draft)
            break
          except _DECODE_ERRORS as e:
            k = int(read[i])
            reload(i, BadImageError(bad_images_lib.example_name(self.source, k), k,
                                    images_lib.reason_of(e),
                                    bad_images_lib.check_command(self.source)))

    self._map_chunks(decode, batch, min_chunk=4)
    return crops

  # Hooks for pipelines built on this one (the fine-tune pipeline, adpe_jax.data.finetune):
  def _after_crop(self, crops: np.ndarray, indices: np.ndarray, epoch: int) -> np.ndarray:
    """uint8 crops (n, size, size, C) of source examples `indices` -> uint8 crops."""
    del indices, epoch
    return crops

  def _finish_batch(self, batch: dict, labels: np.ndarray, indices: np.ndarray,
                    step: int) -> dict:
    """The batch dict, given this process's labels and source indices (int64 (local,))."""
    del labels, indices, step
    return batch

  def _map_chunks(self, fn, n: int, min_chunk: int) -> None:
    """fn(range) over up to 2 chunks per thread of range(n) in the pool; re-raises errors."""
    num_chunks = max(1, min(2 * self.num_threads, n // min_chunk))
    bounds = np.linspace(0, n, num_chunks + 1).astype(int)
    futures = [self._pool.submit(fn, range(lo, hi))
               for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    for future in futures:
      future.result()

  def iterate(self, start_step: int = 0,
              num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yields get_batch(start_step), get_batch(start_step + 1), ..., made by a background thread.

    Up to `prefetch` batches wait in a queue, so augmentation overlaps the training step. Closing
    the generator (or dropping it) stops the background thread. With num_workers > 0 the
    batches come from worker processes instead (`adpe_jax.data.workers`), the same batches.
    """
    if self.num_workers > 0:
      if self._workers is None:
        self._workers = workers.WorkerPool(self, self.num_workers, self.prefetch)
      for batch in self._workers.iterate(start_step, num_steps):
        yield self._account(batch)
      return
    stop = threading.Event()
    ready: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
    end = None if num_steps is None else start_step + num_steps

    def put(item) -> bool:
      while not stop.is_set():
        try:
          ready.put(item, timeout=0.05)
          return True
        except queue.Full:
          continue
      return False

    def produce() -> None:
      step = start_step
      try:
        while end is None or step < end:
          if stop.is_set() or not put(("batch", self.get_batch(step))):
            return
          step += 1
        put(("end", None))
      except BaseException as e:  # noqa: BLE001 (re-raised in the consumer)
        put(("error", e))

    producer = threading.Thread(target=produce, name="adpe_data_prefetch", daemon=True)
    producer.start()
    try:
      while True:
        kind, value = ready.get()
        if kind == "end":
          return
        if kind == "error":
          raise value
        yield self._account(value)
    finally:
      stop.set()
      producer.join(timeout=30)

  def _account(self, batch: dict) -> dict:
    """The batch without its bad-file keys, which are counted and logged here (the consumer's
    process: worker processes' batches pass through it too)."""
    if "bad_images" not in batch:
      return batch
    self.bad_images_seen += int(batch.pop("bad_images"))
    for index, reason in zip(batch.pop("bad_indices"), batch.pop("bad_reasons")):
      if int(index) not in self._bad_files:
        self._bad_files.add(int(index))
        logging.warning("bad image %s (example %d) skipped (%s); a substitute takes its place "
                        "(data.bad_images='skip')",
                        bad_images_lib.example_name(self.source, int(index)), index, reason)
    bad_images_lib.too_many(len(self._bad_files), self.num_examples, self.bad_policy,
                            self.source)
    return batch

  def close(self) -> None:
    """Stops the worker threads (pending work is cancelled) and worker processes."""
    if self._workers is not None:
      self._workers.close()
      self._workers = None
    self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self) -> "PretrainPipeline":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
