"""Input pipeline throughput (images/s; each image is num_crops crops), CPU only.

    python benchmarks/input_pipeline.py                 # all cases, threads = 1 and all CPUs
    python benchmarks/input_pipeline.py --threads 1,4,16 --steps 20

Cases:
  fmnist28       Fashion-MNIST train, 4 crops of 28 px, batch 256 (vectorised Pillow-exact resize)
  fmnist28_pil   the same through Pillow per crop (what the vectorised path replaces)
  synth112       4 crops of 112 px from 256x256 RGB images held in memory (Pillow per crop)
  synth112_lazy  the same with the images generated on access (like decoding on access)
  jpeg112        the ImageNet case: 256x256 JPEG files (quality 90) in an ImageFolder tree,
                 read and decoded on access (FolderSource), 4 crops of 112 px

`get_batch` is timed in a loop after one warm-up batch; `iterate` adds the prefetch thread. The CPU
time per image (all threads) does not depend on other load on the machine: a host with C free cores
can at best deliver C / cpu_ms_per_img * 1000 images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adpe_jax import data
from adpe_jax.data import multicrop


def _time_get_batch(pipe, steps: int) -> tuple[float, float]:
  """(images/s wall, CPU ms per image over all threads)."""
  pipe.get_batch(0)
  start, cpu = time.perf_counter(), time.process_time()
  for step in range(1, steps + 1):
    pipe.get_batch(step)
  images = steps * pipe.local_batch_size
  return images / (time.perf_counter() - start), 1e3 * (time.process_time() - cpu) / images


def _time_iterate(pipe, steps: int) -> float:
  batches = pipe.iterate(0, steps + 1)
  next(batches)
  start = time.perf_counter()
  for _ in batches:
    pass
  return steps * pipe.local_batch_size / (time.perf_counter() - start)


def _synthetic(num_examples: int, lazy: bool):
  source = data.get_source("synthetic:256", "train", num_examples=num_examples)
  if lazy:
    return source
  return data.ArraySource(np.stack([source[i][0] for i in range(num_examples)]))


def _jpeg_folder(num_examples: int) -> str:
  """num_examples 256x256 RGB JPEGs (smooth random content, quality 90) in 2 class folders."""
  import tempfile
  from PIL import Image
  root = tempfile.mkdtemp(prefix="adpe_jpeg256_")
  rng = np.random.default_rng(0)
  for i in range(num_examples):
    folder = os.path.join(root, f"class{i % 2}")
    os.makedirs(folder, exist_ok=True)
    low = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((256, 256), Image.BICUBIC)
    noise = rng.integers(-20, 21, size=(256, 256, 3))
    image = Image.fromarray(np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8))
    image.save(os.path.join(folder, f"{i:05d}.JPEG"), quality=90)
  return root


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--threads", default=f"1,{data.pipeline.default_num_threads()}")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--cases", default="fmnist28,fmnist28_pil,synth112,synth112_lazy,jpeg112")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--batch112", type=int, default=128)
  args = parser.parse_args()
  threads = sorted({int(t) for t in args.threads.split(",")})

  results = []
  for case in args.cases.split(","):
    if case.startswith("fmnist28"):
      source, size, batch = data.get_source("fashion_mnist", "train"), 28, args.batch
    elif case == "jpeg112":
      from adpe_jax.data.folder import FolderSource
      source = FolderSource(_jpeg_folder(max(2 * args.batch112, 512)))
      size, batch = 112, args.batch112
    else:
      source = _synthetic(max(2 * args.batch112, 512), lazy=case.endswith("lazy"))
      size, batch = 112, args.batch112
    saved = multicrop.VECTORIZE_MAX_SIDE
    if case.endswith("_pil"):
      multicrop.VECTORIZE_MAX_SIDE = 0
    try:
      for n in threads:
        with data.PretrainPipeline(source, batch, size, 4, seed=0, num_threads=n) as pipe:
          steps = args.steps if size <= 64 else max(2, args.steps // 3)
          img_s, cpu_ms = _time_get_batch(pipe, steps)
          row = dict(case=case, threads=n, batch=batch, crop=size, get_batch_img_s=round(img_s),
                     cpu_ms_per_img=round(cpu_ms, 3),
                     iterate_img_s=round(_time_iterate(pipe, steps)))
        row["crops_s"] = 4 * row["get_batch_img_s"]
        results.append(row)
        print(f"{case:14s} threads={n:3d} batch={batch:4d} {size:3d}px"
              f"  get_batch {row['get_batch_img_s']:7d} img/s"
              f"  iterate {row['iterate_img_s']:7d} img/s"
              f"  cpu {row['cpu_ms_per_img']:.3f} ms/img", flush=True)
    finally:
      multicrop.VECTORIZE_MAX_SIDE = saved
  print(json.dumps(dict(cpus=os.cpu_count(), usable_cpus=data.pipeline.default_num_threads(),
                        results=results)))


if __name__ == "__main__":
  main()
