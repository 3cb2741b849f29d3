"""TensorBoard event files without TensorFlow: scalars and images, local or gs://.

An event file is a sequence of TFRecord records (length, masked CRC-32C, data, masked
CRC-32C) of `Event` protocol buffers.  We write them with tensorboard's own pieces --
`RecordWriter` (the framing, its CRC from tensorboard's no-TF stub) and the generated
`event_pb2` / `summary_pb2` -- and not with `tensorboard.summary.writer.EventFileWriter` or
clu's writers, which go through `tf.io.gfile` and so import TensorFlow (2.6-5 s and several
hundred MB per process) wherever it is installed.  Importing this module costs about 0.2 s.

Local workdirs: one file `events.out.tfevents.<time>.<host>.<pid>` opened for appending,
flushed every `flush_seconds` and at `close()`.  Object stores (gs://...): an object
cannot be appended to, so each flush writes the records since the previous flush as a new
object `events.out.tfevents.<time>.<host>.<pid>.<NNNNNN>` (a "rolled" file, each starting
with the file-version record); TensorBoard reads every event file of a directory, in name
order, so the rolled files read as one run.  A flush every 2 minutes at most keeps the
number of objects small (a 3-day run: about 2,000 small objects).
"""

from __future__ import annotations

import io
import os
import socket
import time

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from adpe_jax import storage


def _png(image: np.ndarray) -> tuple[bytes, int, int, int]:
  """(PNG bytes, height, width, channels) of an (H, W[, C]) image, float in [0, 1] or uint8."""
  from PIL import Image  # noqa: PLC0415 (pillow is a dependency; only images need it)
  x = np.asarray(image)
  if x.dtype != np.uint8:
    x = (np.clip(np.nan_to_num(x.astype(np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  buf = io.BytesIO()
  Image.fromarray(x).save(buf, format="PNG")
  channels = 1 if x.ndim == 2 else x.shape[-1]
  return buf.getvalue(), x.shape[0], x.shape[1], channels


class EventWriter:
  """`scalars(step, {tag: value})`, `image(step, tag, (H, W, C) array)`, `flush()`, `close()`.

  Only the process that owns the run's files should make one (process 0).
  """

  def __init__(self, logdir, flush_seconds: float | None = None):
    self.logdir = storage.resolve(logdir)
    self.remote = "://" in str(logdir)
    self.flush_seconds = (120.0 if self.remote else 10.0) if flush_seconds is None \
        else float(flush_seconds)
    self._name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                  f"{os.getpid()}")
    self._rolled = 0
    self._pending: list[bytes] = []   # serialized events since the last flush
    self._last_flush = time.monotonic()
    self._file = None
    if not self.remote:
      storage.makedirs(self.logdir)
      self._file = (self.logdir / self._name).open("ab")  # an epath (local) file
    self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    self.flush()

  def _add(self, event) -> None:
    self._pending.append(event.SerializeToString())
    if time.monotonic() - self._last_flush >= self.flush_seconds:
      self.flush()

  def scalars(self, step: int, values: dict) -> None:
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=str(k), simple_value=float(v))
        for k, v in values.items() if isinstance(v, (int, float, np.number))])
    if summary.value:
      self._add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    data, height, width, channels = _png(image)
    value = summary_pb2.Summary.Value(tag=str(tag), image=summary_pb2.Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=data))
    self._add(event_pb2.Event(wall_time=time.time(), step=int(step),
                              summary=summary_pb2.Summary(value=[value])))

  def flush(self) -> None:
    self._last_flush = time.monotonic()
    if not self._pending:
      return
    if self._file is not None:
      writer = RecordWriter(self._file)
      for record in self._pending:
        writer.write(record)
      self._file.flush()
    else:  # an object store: the records since the last flush as one new object
      buf = io.BytesIO()
      writer = RecordWriter(buf)
      if self._rolled:  # every rolled object starts with the file-version record
        writer.write(event_pb2.Event(wall_time=time.time(),
                                     file_version="brain.Event:2").SerializeToString())
      for record in self._pending:
        writer.write(record)
      storage.write_bytes(self.logdir / f"{self._name}.{self._rolled:06d}", buf.getvalue())
      self._rolled += 1
    self._pending = []

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None
