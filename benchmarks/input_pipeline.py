"""Input pipeline throughput (images/s; each image is num_crops crops), CPU only.

    python benchmarks/input_pipeline.py                 # the small cases, threads = 1 and all CPUs
    python benchmarks/input_pipeline.py --threads 1,4,16 --steps 20

The ImageNet-like cases (real photos re-encoded at ImageNet's sizes and qualities; see
`_imagenet_like`) need the photos of scikit-image's wheel, read from the wheel itself:

    pip download --no-deps scikit-image==0.26.0 -d /tmp/wheels
    python benchmarks/input_pipeline.py --photos /tmp/wheels/scikit_image-0.26.0-*.whl \
        --cases inet_folder,inet_folder_fast,inet_folder_draft,inet_prepared,inet_tfds \
        --threads 1 --workers 1,2 --profile

Cases:
  fmnist28       Fashion-MNIST train, 4 crops of 28 px, batch 256 (vectorised Pillow-exact resize)
  fmnist28_pil   the same through Pillow per crop (what the vectorised path replaces)
  synth112       4 crops of 112 px from 256x256 RGB images held in memory (Pillow per crop)
  synth112_lazy  the same with the images generated on access (like decoding on access)
  jpeg112        256x256 JPEG files (smooth random content, quality 90) in an ImageFolder tree,
                 read and decoded on access (FolderSource), 4 crops of 112 px
  inet_folder         ImageNet-like JPEG files through FolderSource, the faithful default
                      (Pillow decode, host-normalised float32)
  inet_folder_fast    the same files: simplejpeg decode (the same pixels) + uint8 output
                      (normalised in the train step)
  inet_folder_draft   + draft (reduced-DCT) decode where every crop allows it (changes pixels)
  inet_prepared       the same files after `prepare` (shorter side <= 256, quality 90, ArrayRecord),
                      simplejpeg + uint8 (changes pixels: FFCV / DailyMAE's approach)
  inet_prepared_draft + draft
  inet_tfds           the same files as a tfds ArrayRecord dataset (tfds decodes), faithful crops

--workers N,...: also iterate() with N worker processes (1 thread each); one worker is one core,
so its img/s is the per-core rate and N workers over 1 worker the scaling. Before each case's
worker runs, a control measures what pure Pillow work gets from max(N) processes over 1 on the
machine at that moment (row "control"): on a shared machine the scaling cannot exceed it. --profile: CPU ms per
image of each stage (read, decode, crop/resize, normalize, batch assembly, host-to-device).

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


# scikit-image's photographs (RGB, 300-1411 px): the real content of the ImageNet-like files.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png",
          "motorcycle_right.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")


def _load_photos(path: str) -> list:
  """The PHOTOS from scikit-image's wheel (a zip) or a directory holding them."""
  import io
  import zipfile
  from PIL import Image
  if os.path.isdir(path):
    return [Image.open(os.path.join(path, n)).convert("RGB") for n in PHOTOS]
  with zipfile.ZipFile(path) as wheel:
    return [Image.open(io.BytesIO(wheel.read("skimage/data/" + n))).convert("RGB")
            for n in PHOTOS]


def _imagenet_like(root: str, num_examples: int, photos: list, seed: int = 0) -> dict:
  """num_examples JPEGs in 10 class folders with ImageNet's size distribution.

  Longer side 500 px for 70% of the files (ImageNet's most common size), 200-500 for 22%,
  500-1000 for 8%; aspect 4:3, 3:2, 1:1, 5:4 or 16:9, a quarter portrait; content a random
  window of a photo (downsampled, not enlarged, where the photo allows), flipped half the time,
  with sensor-like noise (sigma 8, luma and chroma) so that the files code like camera JPEGs;
  quality 88-95. Returns the mean width, height and file size.
  """
  from PIL import Image
  rng = np.random.default_rng(seed)
  stats = []
  for i in range(num_examples):
    photo = photos[rng.integers(len(photos))]
    pw, ph = photo.size
    r = rng.random()
    long_side = 500 if r < 0.7 else int(rng.integers(200, 500) if r < 0.92
                                        else rng.integers(500, 1000))
    aspect = float(rng.choice([4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9]))
    if rng.random() < 0.25:
      aspect = 1 / aspect
    w, h = ((long_side, round(long_side / aspect)) if aspect >= 1
            else (round(long_side * aspect), long_side))
    cmax = min(pw, ph * w / h)
    cw = rng.uniform(min(w, cmax, 0.9 * cmax), cmax)
    ch = cw * h / w
    x0, y0 = rng.uniform(0, max(0.0, pw - cw)), rng.uniform(0, max(0.0, ph - ch))
    image = photo.resize((w, h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    noisy = (np.asarray(image, np.float32) + rng.normal(0, 8, (h, w, 1))
             + rng.normal(0, 4, (h, w, 3)))
    image = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    folder = os.path.join(root, f"class{i % 10}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{i:05d}.JPEG")
    image.save(path, quality=int(rng.integers(88, 96)))
    stats.append((w, h, os.path.getsize(path)))
  mean = np.mean(stats, axis=0)
  return dict(mean_width=round(mean[0]), mean_height=round(mean[1]),
              mean_kb=round(mean[2] / 1024, 1), files=num_examples)


def _tfds_array_record(folder_source, data_dir: str):
  """The folder's files as a tfds dataset in ArrayRecord format (the JPEG bytes as they are)."""
  import tensorflow_datasets as tfds

  class ImagenetLike(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=folder_source.num_classes)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, (path, label) in enumerate(zip(folder_source.paths, folder_source.labels)):
        yield i, {"image": path, "label": int(label)}

  ImagenetLike(data_dir=data_dir, file_format="array_record").download_and_prepare()
  from adpe_jax.data.tfds_source import TfdsSource
  return TfdsSource("imagenet_like", data_dir=data_dir)


INET_OPTIONS = {  # case -> (source kind, PretrainPipeline options)
    "inet_folder": ("folder", {}),
    "inet_folder_fast": ("folder", dict(decoder="simplejpeg", output="uint8")),
    "inet_folder_draft": ("folder", dict(decoder="simplejpeg", draft=True, output="uint8")),
    "inet_prepared": ("prepared", dict(decoder="simplejpeg", output="uint8")),
    "inet_prepared_draft": ("prepared", dict(decoder="simplejpeg", draft=True, output="uint8")),
    "inet_tfds": ("tfds", {}),
}


def _stage_profile(source, options: dict, size: int, num_images: int) -> dict:
  """CPU ms per image of each stage, one thread, 4 crops per image (the pipeline's own steps)."""
  from PIL import Image

  import jax
  from adpe_jax.data import jpeg
  decoder, draft = options.get("decoder", "pil"), options.get("draft", False)
  uint8 = options.get("output") == "uint8"
  n = min(num_images, len(source))
  clock = time.process_time
  t = clock()
  encoded = [source.encoded(i)[0] for i in range(n)]
  read = clock() - t
  shapes = [jpeg.header_size(b) for b in encoded]
  u = data.augmentation_uniforms(0, 0, np.arange(n), 4).transpose(1, 0, 2).reshape(-1, 23)
  example = np.tile(np.arange(n), 4)
  params = data.crop_params(u, np.array([s[0] for s in shapes])[example],
                            np.array([s[1] for s in shapes])[example])
  decode = crop = 0.0
  crops = np.empty((4 * n, size, size, 3), np.uint8)
  for i in range(n):
    rows = np.arange(4) * n + i
    t = clock()
    if decoder == "pil" and not draft:  # the faithful path, as FolderSource decodes
      with Image.open(__import__("io").BytesIO(encoded[i])) as image:
        array = np.asarray(image.convert("RGB"))
      reduction = 1
    else:
      reduction = jpeg.draft_reduction(params.height[rows], params.width[rows], size) if draft else 1
      array = jpeg.decode(encoded[i], decoder, reduction)
    decode += clock() - t
    t = clock()
    if decoder == "pil" and not draft:
      part = data.CropParams(*(getattr(params, f)[rows] for f in
                               ("top", "left", "height", "width", "flip")))
      crops[rows] = multicrop.resized_crops([array], np.zeros(4, np.int64), part, size)
    else:
      crops[rows] = jpeg.crop_decoded(array, shapes[i], params.top[rows], params.left[rows],
                                      params.height[rows], params.width[rows],
                                      params.flip[rows], size, reduction)
    crop += clock() - t
  normalize = 0.0
  if not uint8:
    t = clock()
    multicrop.normalize(crops)
    normalize = clock() - t
  # Host to device: one batch of this case's dtype, device_put + wait, wall time.
  batch = crops if uint8 else multicrop.normalize(crops)
  jax.device_put(batch[:4]).block_until_ready()
  t = time.perf_counter()
  jax.device_put(batch).block_until_ready()
  h2d = time.perf_counter() - t
  ms = lambda x: round(1e3 * x / n, 3)  # noqa: E731
  return dict(read=ms(read), decode=ms(decode), crop_resize=ms(crop), normalize=ms(normalize),
              host_to_device=ms(h2d), mb_per_img_to_device=round(batch.nbytes / n / 2**20, 3),
              backend=jax.default_backend())


def _time_workers(pipe, workers: int, steps: int) -> float:
  """images/s of iterate() with `workers` processes (1 thread each), after a warm-up batch."""
  pipe.num_workers = workers
  try:
    batches = pipe.iterate(0, steps + 1)
    next(batches)  # starts the workers; each has made its first batch soon after
    start = time.perf_counter()
    for _ in batches:
      pass
    return steps * pipe.local_batch_size / (time.perf_counter() - start)
  finally:
    if pipe._workers is not None:
      pipe._workers.close()
      pipe._workers = None
    pipe.num_workers = 0


def _control_work(n: int) -> int:
  from PIL import Image
  image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 500, 3), np.uint8))
  for _ in range(n):
    image.resize((112, 112), Image.BICUBIC)
  return n


def _control_ratio(procs: int, n: int = 150) -> tuple[float, float]:
  """(resizes/s of 1 process, of `procs` processes) of pure Pillow work, back to back: what the
  machine gives a second process right now (on a shared machine, much less than 2x)."""
  import multiprocessing
  rates = []
  for p in (1, procs):
    with multiprocessing.get_context("spawn").Pool(p) as pool:
      pool.map(_control_work, [2] * p)
      start = time.perf_counter()
      pool.map(_control_work, [n] * p)
      rates.append(p * n / (time.perf_counter() - start))
  return rates[0], rates[1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--threads", default=f"1,{data.pipeline.default_num_threads()}")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--cases", default="fmnist28,fmnist28_pil,synth112,synth112_lazy,jpeg112")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--batch112", type=int, default=128)
  parser.add_argument("--photos", default="", help="scikit-image wheel or folder (inet_ cases)")
  parser.add_argument("--inet-examples", type=int, default=512)
  parser.add_argument("--inet-dir", default="", help="reuse / keep the generated files here")
  parser.add_argument("--workers", default="", help="worker process counts, e.g. 1,2")
  parser.add_argument("--profile", action="store_true", help="CPU ms per image per stage")
  parser.add_argument("--rounds", type=int, default=1, help="inet cases: interleaved rounds")
  args = parser.parse_args()
  threads = sorted({int(t) for t in args.threads.split(",")})
  if any(c.startswith("inet_") for c in args.cases.split(",")):
    return _main_imagenet_like(args, threads)

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


def _main_imagenet_like(args, threads) -> None:
  """The inet_ cases, interleaved over --rounds: every case's thread and worker counts once per
  round, so contention from other jobs falls on all of them alike."""
  import tempfile

  from adpe_jax.data import prepare
  from adpe_jax.data.folder import FolderSource
  cases = args.cases.split(",")
  root = args.inet_dir or tempfile.mkdtemp(prefix="adpe_inet_")
  folder = os.path.join(root, "folder")
  if not os.path.isdir(folder):
    if not args.photos:
      raise SystemExit("error: the inet_ cases need --photos (scikit-image's wheel: see --help).")
    stats = _imagenet_like(folder, args.inet_examples, _load_photos(args.photos))
  else:
    stats = dict(files=len(FolderSource(folder)))
  files = FolderSource(folder)
  sizes = np.array([os.path.getsize(p) for p in files.paths])
  stats.update(mean_kb=round(sizes.mean() / 1024, 1), files=len(files))
  print("files", json.dumps(stats), flush=True)
  sources = {"folder": files}
  if any(INET_OPTIONS[c][0] == "prepared" for c in cases):
    t = time.perf_counter()
    prepare.prepare(files, os.path.join(root, "prepared"), short_side=256, quality=90,
                    num_processes=data.pipeline.default_num_threads(), source_name="inet")
    sources["prepared"] = data.get_source("prepared:" + os.path.join(root, "prepared"))
    print(f"prepare: {time.perf_counter() - t:.1f} s", flush=True)
  if any(INET_OPTIONS[c][0] == "tfds" for c in cases):
    sources["tfds"] = _tfds_array_record(files, os.path.join(root, "tfds"))
  worker_counts = sorted({int(w) for w in args.workers.split(",") if w})
  batch = args.batch112
  rows: dict = {}
  for round_ in range(args.rounds):
    for case in cases:
      kind, options = INET_OPTIONS[case]
      with data.PretrainPipeline(sources[kind], batch, 112, 4, seed=round_, num_threads=1,
                                 **options) as pipe:
        for n in threads:
          pipe.num_threads = n
          pipe._pool.shutdown()
          pipe._start_threads()
          img_s, cpu_ms = _time_get_batch(pipe, max(2, args.steps // 3))
          rows.setdefault((case, f"threads={n}"), []).append((img_s, cpu_ms))
          print(f"round {round_} {case:20s} threads={n}  {img_s:7.1f} img/s  "
                f"cpu {cpu_ms:.3f} ms/img", flush=True)
        if kind != "tfds":  # TfdsSource does not pickle into a worker
          if len(worker_counts) > 1:
            one, many = _control_ratio(max(worker_counts))
            rows.setdefault(("control", f"processes={max(worker_counts)}/1"), []).append(
                (many / one, float("nan")))
            print(f"round {round_} control: pure Pillow work, {max(worker_counts)} processes / 1 "
                  f"= {many / one:.2f}", flush=True)
          for w in worker_counts:
            img_s = _time_workers(pipe, w, max(2 * w, args.steps // 3 * w))
            rows.setdefault((case, f"workers={w}"), []).append((img_s, float("nan")))
            print(f"round {round_} {case:20s} workers={w}  {img_s:7.1f} img/s", flush=True)
  results = [dict(case=c, mode=m, img_s=[round(r[0], 1) for r in v],
                  median_img_s=round(float(np.median([r[0] for r in v])), 1),
                  cpu_ms_per_img=round(float(np.nanmedian([r[1] for r in v])), 3)
                  if not np.all(np.isnan([r[1] for r in v])) else None)
             for (c, m), v in rows.items()]
  profiles = {}
  if args.profile:
    for case in cases:
      kind, options = INET_OPTIONS[case]
      if kind != "tfds":
        profiles[case] = _stage_profile(sources[kind], options, 112, 128)
        print(f"profile {case:20s} {json.dumps(profiles[case])}", flush=True)
  print(json.dumps(dict(cpus=os.cpu_count(), usable_cpus=data.pipeline.default_num_threads(),
                        files=stats, results=results, profiles=profiles)))


if __name__ == "__main__":
  main()
