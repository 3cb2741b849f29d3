"""Where metrics go: metrics.jsonl, a text log, TensorBoard (clu writers), MFU.

clu (and through it TensorFlow's summary writer) is imported lazily, here only, so the
model, step and kernels stay importable on machines without TensorFlow.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import logging

from adpe_jax import storage

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


class MetricsLog:
  """metrics.jsonl (one JSON object per logged step), log.txt, and TensorBoard events.

  Files are appended, so a resumed run continues them.  Only process 0 writes files.
  """

  def __init__(self, workdir: str, total_steps: int, tensorboard: bool = True):
    self.workdir = storage.resolve(workdir)  # local or gs://... (etils.epath)
    self.main = jax.process_index() == 0
    self.jsonl = self.workdir / "metrics.jsonl"
    self.text = self.workdir / "log.txt"
    self.writer = None
    self.progress = None
    if tensorboard:
      try:
        from clu import metric_writers, periodic_actions  # noqa: PLC0415
        # A string: TF's gfile (under clu's writer) takes local and gs:// paths itself.
        self.writer = metric_writers.create_default_writer(
            str(self.workdir), just_logging=not self.main, asynchronous=True)
        self.progress = periodic_actions.ReportProgress(
            num_train_steps=total_steps, writer=self.writer, every_secs=30.0)
      except ImportError as e:  # pragma: no cover - TF-free machines
        logging.warning("TensorBoard writing disabled (%s); metrics.jsonl is still written.", e)

  def tick(self, step: int) -> None:
    """Cheap per-step host call: steps/s and ETA (no device sync)."""
    if self.progress is not None:
      self.progress(step)

  def write(self, record: dict) -> None:
    step = int(record["step"])
    if self.main:
      storage.append_text(self.jsonl, json.dumps(record) + "\n")
      fields = " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in record.items() if k != "step")
      storage.append_text(self.text,
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')} step={step} {fields}\n")
    if self.writer is not None:
      self.writer.write_scalars(step, {k: v for k, v in record.items()
                                       if k != "step" and isinstance(v, (int, float))})

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    if self.writer is not None:
      self.writer.write_images(step, {name: image[None]})

  def close(self) -> None:
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()
