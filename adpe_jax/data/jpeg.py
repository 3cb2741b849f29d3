"""JPEG fast paths of the pre-training crops: decode with another decoder, or at reduced DCT scale.

The faithful path (`PretrainPipeline` with decoder="pil", draft=False) decodes every image in
full with Pillow, as torchvision's loader does, and cuts its crops from that. Two options take
the encoded bytes of a source (`source.encoded(i) -> (bytes, label)`) instead:

  decoder="simplejpeg"  libjpeg-turbo through simplejpeg (no PIL image object, no RGB convert
                        copy): measured 1.3 vs 2.0 ms per ImageNet-sized JPEG, and bit-identical
                        to Pillow's decode on the benchmark's files (both are libjpeg-turbo with
                        the same IDCT and upsampling); `tests/test_input_fast.py` checks this
                        on the files it writes.
  draft=True            decode at 1/2, 1/4 or 1/8 of the size (libjpeg's DCT scaling, Pillow's
                        `Image.draft`) when every crop of the image still has at least `size`
                        source pixels on each side at that scale. Crop parameters depend only on
                        the image's height and width (torchvision's get_params), so they are
                        drawn from the JPEG header first and the scale is chosen from them; the
                        crops are then resampled from the reduced image, with the same boxes
                        scaled. This changes pixels (benchmarks/README.md gives the deviation
                        from the faithful crops); the default stays faithful.

Anything that is not a baseline/progressive JPEG (PNG, CMYK, a file Pillow cannot open) goes
back to `source[i]`, so the source's own decode and bad-file handling apply to it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

DECODERS = ("pil", "simplejpeg")
_JPEG_SOI = b"\xff\xd8"
REDUCTIONS = (8, 4, 2, 1)  # libjpeg's power-of-two DCT scales (Pillow's draft offers these).


def header_size(data: bytes) -> tuple[int, int] | None:
  """(height, width) of an RGB or grey JPEG from its header (no decode), else None."""
  if not data.startswith(_JPEG_SOI):
    return None
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None  # CMYK / YCCK JPEGs: the source's convert("RGB") path handles them.
      return image.size[1], image.size[0]
  except Exception:  # noqa: BLE001 (any unreadable header: the source's decode decides)
    return None


def draft_reduction(crop_heights, crop_widths, size: int) -> int:
  """The largest r in (8, 4, 2, 1) with min(crop side) / r >= size for all crops of an image."""
  smallest = int(min(np.min(crop_heights), np.min(crop_widths)))
  for r in REDUCTIONS:
    if smallest >= r * size:
      return r
  return 1


def decode(data: bytes, decoder: str = "pil", reduction: int = 1) -> np.ndarray:
  """uint8 (H', W', 3) RGB of a JPEG; H' = ceil(H / reduction), W' likewise (libjpeg's rule)."""
  if decoder == "simplejpeg":
    import simplejpeg  # noqa: PLC0415 (optional dependency: only this decoder needs it)

    if reduction == 1:
      return simplejpeg.decode_jpeg(data, colorspace="RGB")
    height, width = simplejpeg.decode_jpeg_header(data)[:2]
    # simplejpeg picks the smallest libjpeg-turbo scale whose output is at least this big: with
    # ceil(side / r) that is exactly 1 / r.
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // reduction),
                                  min_width=-(-width // reduction))
  with Image.open(io.BytesIO(data)) as image:
    if reduction > 1:
      # Pillow's draft picks the largest scale 1/s with s <= side // requested side.
      width, height = image.size
      image.draft("RGB", (max(1, width // reduction), max(1, height // reduction)))
    return np.asarray(image.convert("RGB"))


def jpeg_crops(data: bytes, full_size: tuple[int, int], top, left, height, width, flip,
               size: int, decoder: str = "pil", draft: bool = False,
               out: np.ndarray | None = None) -> np.ndarray:
  """The crops (k, size, size, 3) uint8 of one JPEG: crop box j (in full-size pixels) resized
  bicubically to size x size, flipped where flip[j].

  Without draft (or where the crops allow no reduction) this is the faithful crop: Pillow's crop,
  then bicubic resize of the box alone, as torchvision does. With a reduction r, the box scaled by
  the decoded/full size ratio is resampled from the reduced image (Pillow's resize(box=...)).
  """
  reduction = draft_reduction(height, width, size) if draft else 1
  image = decode(data, decoder, reduction)
  return crop_decoded(image, full_size, top, left, height, width, flip, size, reduction, out)


def crop_decoded(image: np.ndarray, full_size: tuple[int, int], top, left, height, width,
                 flip, size: int, reduction: int = 1,
                 out: np.ndarray | None = None) -> np.ndarray:
  """`jpeg_crops` after the decode: `image` decoded at 1 / `reduction` of `full_size`."""
  k = len(top)
  if out is None:
    out = np.empty((k, size, size, 3), np.uint8)
  pil = Image.fromarray(image)
  full_h, full_w = full_size
  sy, sx = image.shape[0] / full_h, image.shape[1] / full_w
  for j in range(k):
    t, l, h, w = int(top[j]), int(left[j]), int(height[j]), int(width[j])
    if reduction == 1:
      crop = pil.crop((l, t, l + w, t + h)).resize((size, size), Image.BICUBIC)
    else:
      crop = pil.resize((size, size), Image.BICUBIC,
                        box=(l * sx, t * sy, (l + w) * sx, (t + h) * sy))
    array = np.asarray(crop)
    out[j] = array[:, ::-1] if flip[j] else array
  return out
