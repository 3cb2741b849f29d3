"""An image file's bytes -> uint8 (H, W, 3) RGB, as torchvision's loader does, 16-bit included.

torchvision's default loader is `Image.open(f).convert("RGB")`: grey, palette and CMYK images
become RGB. For 16-bit grey images (PNG / TIFF: Pillow modes I;16, I;16B, I;16L, and I for a
16-bit PNG) that convert clips every value above 255, so a 16-bit image arrives almost all
white; here they are scaled to 8 bits instead (x >> 8, the high byte: 65535 -> 255, as Pillow
itself reduces 48-bit RGB and 16-bit grey+alpha PNGs), and the first such image is logged.
Other 32-bit integer images (mode I, e.g. a TIFF) keep their values if they fit in 8 bits,
else are scaled by the smallest shift that fits their maximum; float images (mode F) are
clipped to [0, 255] as Pillow's convert does.

A file that does not decode raises `UndecodableImageError(reason)`, the decoder's words without
Pillow's "<_io.BytesIO object at 0x...>"; the sources turn it into a `BadImageError` naming
the file (adpe_jax.data.bad_images).
"""

from __future__ import annotations

import io
import re
import threading

import numpy as np
from absl import logging
from PIL import Image

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_logged_16bit = threading.Event()


class UndecodableImageError(Exception):
  """The bytes of one file are not an image the decoder can read; args[0]: the reason."""


def reason_of(error: BaseException) -> str:
  """A decoder's exception in a few words (no object addresses)."""
  if isinstance(error, UndecodableImageError):
    return str(error)
  if isinstance(error, Image.UnidentifiedImageError):
    return "not an image file Pillow can identify"
  text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error)).strip()
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def to_8bit(image: Image.Image, name: str = "") -> Image.Image:
  """An 8-bit-per-channel Pillow image of `image` (16-bit / 32-bit grey scaled, see above)."""
  mode = image.mode
  if mode not in _SIXTEEN_BIT and mode != "I":
    return image
  values = np.asarray(image)
  if mode in _SIXTEEN_BIT or image.format == "PNG":  # a PNG's mode I is a 16-bit grey PNG
    shift = 8
  else:
    top = int(values.max(initial=0))
    shift = max(0, top.bit_length() - 8)
  if shift and not _logged_16bit.is_set():
    _logged_16bit.set()
    logging.warning("image %s is %s (more than 8 bits per pixel): scaled to 8 bits (x >> %d); "
                    "further such images are scaled without a message", name or "(bytes)",
                    mode, shift)
  values = np.clip(values.astype(np.int64) >> shift, 0, 255).astype(np.uint8)
  return Image.fromarray(values, "L")


def read_image(data: bytes, name: str = "") -> np.ndarray:
  """uint8 (H, W, 3) RGB of an encoded image file; raises UndecodableImageError(reason)."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # the whole file: a truncated one fails here, not later
      return np.asarray(to_8bit(image, name).convert("RGB"))
  except Exception as e:  # whatever the decoder says about these bytes
    raise UndecodableImageError(reason_of(e)) from e
