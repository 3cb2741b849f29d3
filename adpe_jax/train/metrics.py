"""Where metrics go: metrics.jsonl, a text log, TensorBoard event files, progress, MFU.

TensorBoard events are written without TensorFlow (`event_writer`); progress and ETA go to
the console log every 30 s.
"""

from __future__ import annotations

import json
import math
import time

import jax
import numpy as np
from absl import logging

from adpe_jax import storage
from adpe_jax.train.event_writer import EventWriter

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix (vendor data sheets).
PEAK_FLOPS = {
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12, "NVIDIA A10": 125e12, "NVIDIA V100": 125e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v4": 275e12, "TPU v3": 123e12,
}


def device_peak_flops(device=None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for prefix, peak in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return peak
  return None


# Log record fields that count from the run's step 0 but that a process can only count from
# its own start (the pipeline's `bad_images_seen`): a resumed run adds the value logged at
# its restored step (`loop.carried_counts`), so metrics.jsonl holds what an uninterrupted run
# logs.  (Read back from metrics.jsonl, as the first loss is, rather than kept in the
# checkpoint: the loop logs a record at every step it saves, and the count is a log field.)
CARRIED_COUNTS = ("bad_images",)


def bad_image_metrics(pipeline) -> dict:
  """{"bad_images": substituted examples of all processes' batches since this process
  started} under data.bad_images="skip" (a log record's field, of the run once the loop adds
  the count of its earlier processes: `CARRIED_COUNTS`), else {}. Every process calls it at
  the same log steps (one small all-gather when there are several)."""
  if not pipeline.bad_policy.skips:
    return {}
  count = pipeline.bad_images_seen
  if pipeline.process_count > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    count = int(np.sum(multihost_utils.process_allgather(np.int64(count))))
  return {"bad_images": int(count)}


def json_value(v):
  """A metric as strict JSON: a non-finite float (a diverged loss) becomes null -- bare
  `NaN` / `Infinity` are not JSON and break other readers (jq, pandas' strict mode, JS);
  log.txt and TensorBoard keep the value itself (nan / inf)."""
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def parse_records(data: bytes) -> list[dict]:
  """The JSON-object lines of a metrics.jsonl (bytes): a line that is not one (a record
  cut by a kill, a stray non-UTF-8 byte) is skipped, never an error."""
  out = []
  for line in data.decode("utf-8", errors="replace").splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict):
      out.append(record)
  return out


def trim_for_resume(path, start_step: int) -> int:
  """Drops, from a metrics.jsonl a resumed run continues, the records of steps after the
  restored one and a last line cut mid-write; returns how many lines were dropped.

  Those steps ran after the checkpoint the run resumes from: their state is gone and the
  resumed run logs them again (with the same values -- resume is exact), so keeping them
  would give two records a step.  A cut line would have the next record appended onto it
  (two records lost).  Complete lines that are not records are kept as they are.  The
  file is rewritten only when something is dropped (a temporary file, then a rename).
  """
  data = storage.read_bytes(path) if path.exists() else b""
  if not data:
    return 0
  lines = data.split(b"\n")
  complete, partial = lines[:-1], lines[-1]   # after the last "\n": a cut record or b""
  kept = []
  for line in complete:
    try:
      record = json.loads(line.decode("utf-8", errors="replace"))
      step = int(record["step"]) if isinstance(record, dict) and "step" in record else None
    except (ValueError, TypeError):
      step = None
    if step is None or step <= start_step:
      kept.append(line)
  dropped = len(complete) - len(kept) + (1 if partial else 0)
  if dropped:
    tmp = path.parent / (path.name + ".tmp")
    storage.write_bytes(tmp, b"".join(line + b"\n" for line in kept))
    tmp.replace(path)
  return dropped


class MetricsLog:
  """metrics.jsonl (one JSON object per logged step), log.txt, and TensorBoard events.

  Files are appended, so a resumed run continues them (`start_step`: the restored step;
  records of later steps, and a record cut by a kill, are dropped first: see
  `trim_for_resume`).  Only process 0 writes files.  Non-finite values are written to
  metrics.jsonl as null (`json_value`).
  """

  def __init__(self, workdir: str, total_steps: int, tensorboard: bool = True,
               start_step: int | None = None, config=None):
    self.workdir = storage.resolve(workdir)  # local or gs://... (etils.epath)
    self.main = jax.process_index() == 0
    self.jsonl = self.workdir / "metrics.jsonl"
    self.text = self.workdir / "log.txt"
    if self.main and start_step is not None:
      dropped = trim_for_resume(self.jsonl, int(start_step))
      if dropped:
        logging.warning("%s: dropped %d record(s) of steps after the restored step %d (or "
                        "cut by a kill); the resumed run logs those steps again", self.jsonl,
                        dropped, start_step)
      text = storage.read_bytes(self.text) if self.text.exists() else b""
      if text and not text.endswith(b"\n"):  # a line cut by a kill: start a new one
        storage.append_text(self.text, "\n")
    self.writer = EventWriter(self.workdir) if tensorboard and self.main else None
    self.progress = Progress(total_steps, self.writer)
    self.wandb = None
    log = config.get("log") if config is not None else None
    if self.main and log is not None and log.get("wandb"):
      from adpe_jax.train.wandb_log import WandbLog  # noqa: PLC0415 (imports wandb)
      self.wandb = WandbLog(config, self.workdir)

  def tick(self, step: int) -> None:
    """Cheap per-step host call: steps/s and ETA (no device sync)."""
    self.progress(step)

  def write(self, record: dict) -> None:
    step = int(record["step"])
    if self.main:
      strict = {k: json_value(v) for k, v in record.items()}
      storage.append_text(self.jsonl, json.dumps(strict, allow_nan=False) + "\n")
      fields = " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in record.items() if k != "step")
      storage.append_text(self.text,
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')} step={step} {fields}\n")
    if self.writer is not None:
      self.writer.scalars(step, {k: v for k, v in record.items()
                                 if k != "step" and isinstance(v, (int, float))})
    if self.wandb is not None:
      self.wandb.scalars(step, {k: v for k, v in record.items() if k != "step"})

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    if self.writer is not None:
      self.writer.image(step, name, image)
    if self.wandb is not None:
      self.wandb.image(step, name, image)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
    if self.wandb is not None:
      self.wandb.close()


class Progress:
  """Steps/s and ETA in the console log every `every_seconds` (and `steps_per_sec` in
  TensorBoard): `progress(step)` once a step is dispatched; a host clock only, no sync."""

  def __init__(self, total_steps: int, writer=None, every_seconds: float = 30.0,
               clock=time.monotonic):
    self.total, self.writer, self.every, self.clock = int(total_steps), writer, every_seconds, clock
    self._t, self._step = None, None

  def __call__(self, step: int) -> str | None:
    now = self.clock()
    if self._t is None:
      self._t, self._step = now, step
      return None
    if now - self._t < self.every:
      return None
    rate = (step - self._step) / max(now - self._t, 1e-9)
    left = (self.total - step) / rate if rate > 0 else float("inf")
    eta = time.strftime("%H:%M:%S", time.gmtime(left)) if math.isfinite(left) else "?"
    days = int(left // 86400) if math.isfinite(left) else 0
    line = (f"progress: step {step}/{self.total} ({100.0 * step / max(self.total, 1):.1f} %), "
            f"{rate:.3g} steps/s, ETA {f'{days}d ' if days else ''}{eta}")
    logging.info("%s", line)
    if self.writer is not None:
      self.writer.scalars(step, {"steps_per_sec": rate})
    self._t, self._step = now, step
    return line
