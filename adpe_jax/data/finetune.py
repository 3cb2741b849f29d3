"""The fine-tune input pipeline (spec 6): timm's `create_transform` train recipe and Mixup.

Train transform of one example (timm 0.3.2 `create_transform(is_training=True)`, as the
original / MAE call it):
  RandomResizedCrop(size, scale (0.08, 1), ratio (3/4, 4/3), bicubic) -> hflip(0.5)
  (both from `PretrainPipeline` with one crop) -> RandAugment `rand-m9-mstd0.5-inc1`
  (`RandAugment` below, Pillow ops) -> ToTensor -> Normalize -> RandomErasing(0.25, pixel
  mode, one region) (`random_erasing` below).
Mixup / CutMix (timm `Mixup`, batch mode) is drawn here per micro-batch (`mixup_params`)
and applied inside the compiled step (`adpe_jax.train.mixup.mix_batch`).

No maintained JAX/TF implementation reproduces timm's RandAugment (TF Model Garden's and
big_vision's RandAugment use another op set, magnitudes and no per-op probability /
magnitude noise) nor its RandomErasing / Mixup arithmetic, so they are written here
from timm's definitions.  Randomness: every example draws from a numpy Generator keyed by
(seed, stream, epoch, source index), so a batch is a pure function of the step as in
pretraining (resume replays it exactly); Python's `random` (timm's) is never used.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from adpe_jax.config.finetune import parse_randaugment
from adpe_jax.data import multicrop
from adpe_jax.data.pipeline import PretrainPipeline

_RANDAUG_STREAM = 2
_ERASE_STREAM = 3
_MIXUP_STREAM = 4

MAX_LEVEL = 10.0
# timm create_transform: img_mean = round(255 * ImageNet mean) is the affine fill colour.
FILL = tuple(int(min(255, round(255 * float(x)))) for x in multicrop.IMAGENET_MEAN)

# timm auto_augment._RAND_INCREASING_TRANSFORMS (the "inc1" op set), in timm's order.
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel")


def _rng(seed: int, *key: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(int(k) for k in key)))


class RandAugment:
  """timm's RandAugment on a PIL RGB image with an explicit numpy Generator.

  Per image: `num_layers` ops chosen uniformly WITH replacement; each applied with
  probability `prob`; magnitude ~ N(m, std) clipped to [0, 10]; signed ops negated with
  probability 1/2; affine ops bicubic with the ImageNet-mean fill (timm create_transform).
  """

  def __init__(self, spec: str = "rand-m9-mstd0.5-inc1"):
    p = parse_randaugment(spec)
    self.magnitude, self.std = p["magnitude"], p["std"]
    self.num_layers, self.prob = p["num_layers"], p["prob"]

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    for i in rng.integers(0, len(RAND_INCREASING_OPS), self.num_layers):
      if self.prob < 1.0 and rng.random() > self.prob:
        continue
      m = self.magnitude
      if self.std > 0:
        m = rng.normal(m, self.std)
      m = min(MAX_LEVEL, max(0.0, m))
      img = apply_op(img, RAND_INCREASING_OPS[i], m, rng.random() > 0.5)
    return img


def apply_op(img: Image.Image, name: str, m: float, negate: bool) -> Image.Image:
  """One timm op at magnitude m in [0, 10] (`negate`: the signed ops' coin)."""
  sign = -1.0 if negate else 1.0
  affine = dict(resample=Image.BICUBIC, fillcolor=FILL)
  if name == "AutoContrast":
    return ImageOps.autocontrast(img)
  if name == "Equalize":
    return ImageOps.equalize(img)
  if name == "Invert":
    return ImageOps.invert(img)
  if name == "Rotate":
    return img.rotate(sign * m / MAX_LEVEL * 30.0, **affine)
  if name == "PosterizeIncreasing":
    bits = 4 - int(m / MAX_LEVEL * 4)   # 0 at m = 10: black (old Pillow; new one refuses)
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return img if bits >= 8 else img.point([i & mask for i in range(256)] * len(img.getbands()))
  if name == "SolarizeIncreasing":
    return ImageOps.solarize(img, 256 - int(m / MAX_LEVEL * 256))
  if name == "SolarizeAdd":
    add = int(m / MAX_LEVEL * 110)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))
  if name.endswith("Increasing"):  # Color / Contrast / Brightness / Sharpness
    factor = 1.0 + sign * m / MAX_LEVEL * 0.9
    enhancer = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
                "Brightness": ImageEnhance.Brightness,
                "Sharpness": ImageEnhance.Sharpness}[name[:-len("Increasing")]]
    return enhancer(img).enhance(factor)
  if name in ("ShearX", "ShearY"):
    f = sign * m / MAX_LEVEL * 0.3
    coeffs = (1, f, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, f, 1, 0)
    return img.transform(img.size, Image.AFFINE, coeffs, **affine)
  if name in ("TranslateXRel", "TranslateYRel"):
    pct = sign * m / MAX_LEVEL * 0.45
    if name == "TranslateXRel":
      coeffs = (1, 0, pct * img.size[0], 0, 1, 0)
    else:
      coeffs = (1, 0, 0, 0, 1, pct * img.size[1])
    return img.transform(img.size, Image.AFFINE, coeffs, **affine)
  raise ValueError(f"unknown RandAugment op {name!r}")


def random_erasing(image: np.ndarray, rng: np.random.Generator, prob: float = 0.25,
                   min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3) -> np.ndarray:
  """timm RandomErasing(prob, mode='pixel', max_count=1) on a normalised (H, W, C) float
  image, in place: one box of N(0, 1) pixels, found in at most 10 attempts."""
  if rng.random() > prob:
    return image
  h_img, w_img, c = image.shape
  area = h_img * w_img
  log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
  for _ in range(10):
    target = rng.uniform(min_area, max_area) * area
    aspect = math.exp(rng.uniform(*log_ratio))
    h = int(round(math.sqrt(target * aspect)))
    w = int(round(math.sqrt(target / aspect)))
    if w < w_img and h < h_img:
      top = int(rng.integers(0, h_img - h + 1))
      left = int(rng.integers(0, w_img - w + 1))
      image[top:top + h, left:left + w] = rng.standard_normal((h, w, c)).astype(image.dtype)
      break
  return image


def rand_bbox(h: int, w: int, lam: float, rng: np.random.Generator):
  """timm rand_bbox (margin 0): (yl, yh, xl, xh) of a box of area ~ (1 - lam) h w."""
  ratio = math.sqrt(1 - lam)
  cut_h, cut_w = int(h * ratio), int(w * ratio)
  cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
  yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
  xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
  return int(yl), int(yh), int(xl), int(xh)


def mixup_params(seed: int, step: int, micro_steps: int, image_size: int, mixup: float,
                 cutmix: float, prob: float = 1.0, switch_prob: float = 0.5) -> dict:
  """timm Mixup(mode='batch', correct_lam=True) parameters of each micro-batch of `step`.

  Returns {"lam": float32 (A,), "cutmix": bool (A,), "box": int32 (A, 4) (yl, yh, xl, xh)}
  for A = micro_steps; lam = 1 means no mixing.  CutMix's lam is corrected to the box's
  actual area, as timm does.
  """
  lam = np.ones(micro_steps, np.float32)
  use_cut = np.zeros(micro_steps, bool)
  box = np.zeros((micro_steps, 4), np.int32)
  for a in range(micro_steps):
    rng = _rng(seed, _MIXUP_STREAM, step, a)
    if not (mixup > 0 or cutmix > 0) or rng.random() >= prob:
      continue
    if mixup > 0 and cutmix > 0:
      use_cut[a] = rng.random() < switch_prob
      alpha = cutmix if use_cut[a] else mixup
    elif mixup > 0:
      alpha = mixup
    else:
      use_cut[a], alpha = True, cutmix
    value = float(rng.beta(alpha, alpha))
    if use_cut[a]:
      yl, yh, xl, xh = rand_bbox(image_size, image_size, value, rng)
      box[a] = (yl, yh, xl, xh)
      value = 1.0 - (yh - yl) * (xh - xl) / float(image_size * image_size)
    lam[a] = value
  return {"lam": lam, "cutmix": use_cut, "box": box}


class FinetunePipeline(PretrainPipeline):
  """One augmented view per example plus its label: {"images", "labels", "ids"} per step.

  `randaug` ('' = off) and `reprob` (0 = off) add RandAugment and RandomErasing to the
  RandomResizedCrop + flip of `PretrainPipeline` (num_crops = 1).
  """

  def __init__(self, source, global_batch_size: int, image_size: int, seed: int = 0,
               randaug: str = "rand-m9-mstd0.5-inc1", reprob: float = 0.25, **kw):
    super().__init__(source, global_batch_size, image_size, num_crops=1, seed=seed, **kw)
    self.randaug = RandAugment(randaug) if randaug else None
    self.reprob = float(reprob)

  def _after_crop(self, crops, indices, epoch):
    if self.randaug is None:
      return crops
    out = np.empty(crops.shape[:3] + (3,), np.uint8)
    for j in range(len(crops)):
      crop = crops[j] if crops.shape[-1] == 3 else np.repeat(crops[j], 3, axis=-1)
      img = self.randaug(Image.fromarray(crop), _rng(self.seed, _RANDAUG_STREAM, epoch,
                                                     indices[j]))
      out[j] = np.asarray(img)
    return out

  def _finish_batch(self, batch, labels, indices, step):
    if self.reprob > 0:
      epoch = self.epoch_of(step)
      for j, i in enumerate(indices):
        random_erasing(batch["images"][j], _rng(self.seed, _ERASE_STREAM, epoch, i),
                       self.reprob)
    return {"images": batch["images"], "labels": labels.astype(np.int32), "ids": batch["ids"]}
