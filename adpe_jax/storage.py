"""Where run files live: every path the run reads or writes goes through `etils.epath`.

epath is orbax's own path layer: a local path uses the OS, `gs://` (and `s3://`, `az://`,
`hf://`) use TensorFlow's gfile or fsspec, so a `gs://BUCKET/run` workdir on a TPU VM
writes to the bucket and not to a local directory named `gs:`. Local paths behave as
before. Modules that touch run files use only the helpers here (tests/test_storage.py
checks that no `open`, `os.path`, `os.makedirs`, `shutil` or `glob` is left on them).
"""

from __future__ import annotations

import os
from typing import Iterator

from etils import epath

from adpe_jax.errors import ConfigError

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """Whether `path` names a `scheme://` location (gs://, s3://...) rather than a local one."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """The run path as an `epath.Path`: a local one made absolute (orbax needs absolute local
  paths; a relative --workdir is taken from the current directory), a `scheme://` one kept
  as it is. A scheme epath does not know is refused rather than becoming a local path."""
  text = os.fspath(path)
  if not is_remote(text):
    return epath.Path(os.path.abspath(text))
  scheme = text.split("://", 1)[0]
  try:
    out = epath.Path(text)
  except KeyError:
    out = None
  if out is None or not os.fspath(out).startswith(f"{scheme}://"):
    raise ConfigError(f"path {text!r}: etils.epath cannot read or write {scheme}:// paths "
                      f"(it supports gs://, s3://, az://, hf:// and local paths).")
  return out


def require_checkpoint_support(path: PathLike) -> None:
  """orbax-checkpoint asks a gs:// bucket whether it has a hierarchical namespace (before
  listing or deleting steps) through google-cloud-storage; without that package a run
  would die at its first checkpoint listing with an ImportError deep inside orbax."""
  if not os.fspath(path).startswith("gs://"):
    return
  try:
    from google.cloud import storage as _  # noqa: F401,PLC0415
  except ImportError as e:
    raise ImportError(f"checkpoints under {os.fspath(path)} need the google-cloud-storage "
                      f"package (pip install google-cloud-storage): orbax-checkpoint uses "
                      f"it on gs:// buckets.") from e


def as_path(path: PathLike) -> epath.Path:
  """`path` as an `epath.Path` without making a local one absolute (data sources)."""
  return path if isinstance(path, epath.Path) else epath.Path(os.fspath(path))


def makedirs(path: PathLike) -> epath.Path:
  path = as_path(path)
  path.mkdir(parents=True, exist_ok=True)
  return path


def read_text(path: PathLike) -> str | None:
  """The file's text, or None if it does not exist."""
  path = as_path(path)
  if not path.exists():
    return None
  return path.read_text()


def read_bytes(path: PathLike) -> bytes:
  return as_path(path).read_bytes()


def walk(top: PathLike) -> Iterator[tuple[epath.Path, list[str], list[str]]]:
  """(dirpath, dirnames, filenames) under `top`, as `os.walk`, for local and remote trees.

  Locally symlinked sub-folders are followed (torchvision's ImageFolder does so; epath's
  own walk does not). fsspec's walk yields directories without their `gs://`: put back.
  """
  top = as_path(top)
  if not is_remote(top):
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
      yield epath.Path(dirpath), dirnames, filenames
    return
  scheme = os.fspath(top).split("://", 1)[0] + "://"
  for dirpath, dirnames, filenames in top.walk():
    text = os.fspath(dirpath)
    yield (as_path(text if text.startswith(scheme) else scheme + text.lstrip("/")),
           dirnames, filenames)


def write_text(path: PathLike, text: str) -> None:
  as_path(path).write_text(text)


def write_bytes(path: PathLike, data: bytes) -> None:
  as_path(path).write_bytes(data)


def append_text(path: PathLike, text: str) -> None:
  """Appends to a text file (created if absent). Object stores have no append: there the
  object is rewritten with the new text at its end (only process 0 writes run logs)."""
  path = as_path(path)
  if not is_remote(path):
    try:
      with path.open("a") as f:
        f.write(text)
    except OSError as e:  # a write or close (a full disk) names no file: this one
      e.filename = e.filename or os.fspath(path)
      raise
    return
  old = read_text(path) or ""
  path.write_text(old + text)


def rmtree(path: PathLike) -> None:
  """Removes a directory tree; a failure (vanished, a symlink...) is left to the caller."""
  as_path(path).rmtree()
