"""What the input does with a file that does not decode: stop naming it, or skip it.

Config `data.bad_images`:
  "stop" (default)  the first bad file stops the run with a `BadImageError` (a DataError)
                    naming the file, its example index and the decoder's reason.
  "skip"            the bad example is replaced by a deterministic substitute: the next
                    example in source order (index + 1, + 2, ..., wrapping) that decodes. It
                    keeps the bad example's place, id and augmentation randomness (those
                    belong to the index drawn), so a batch stays a pure function of the step:
                    resume and any process count see the same batches. Its label is the
                    substitute's (the image and label stay together).
`data.max_bad_fraction` (default 0.001): under "skip", the run stops (DataError naming the
count) once the distinct bad files this process has met exceed that fraction of the
dataset's examples. The denominator is the dataset, not the examples read so far, so the
stop does not fire by chance on one unlucky early batch, and a copy with a few broken files
(ImageNet has a handful) trains, while a broken copy (a cut tar, a wrong directory: many
bad files) stops within its first epoch. 0.001 is 1281 files of ImageNet-1k.
`data.skip_list`: a file written by `python -m adpe_jax.tools.check` (one "path<TAB>reason"
per line); the files it lists are substituted without being read (they do not count
towards max_bad_fraction: they are known).

A read error (a missing file, a permission, a network failure) is not a bad image: it
stops the run in any policy, since skipping it would make a batch depend on the moment.
"""

from __future__ import annotations

import dataclasses

from absl import logging

from adpe_jax import storage
from adpe_jax.config import validate
from adpe_jax.errors import BadImageError, ConfigError, DataError

DEFAULT_MAX_BAD_FRACTION = 0.001


def example_name(source, index: int) -> str:
  """The file of example `index` where the source has files, else "example i of <source>"."""
  paths = getattr(source, "paths", None)
  if paths is not None:
    return str(paths[index])
  root = getattr(source, "root", None)
  return f"example {index} of {root}" if root else f"example {index}"


def check_command(source) -> str:
  """The command that lists every bad file of `source` (for the messages)."""
  root = getattr(source, "root", None)
  if root and getattr(source, "paths", None) is not None:
    return f"python -m adpe_jax.tools.check --source=folder:{root}"
  return "python -m adpe_jax.tools.check --source=<data.source>"


def read_skip_list(path: str, source) -> frozenset[int]:
  """Source indices of the files listed in a check command's output file."""
  text = storage.read_text(storage.as_path(path))
  if text is None:
    raise ConfigError(f"config field data.skip_list={path!r}: the file does not exist; write "
                      f"it with `{check_command(source)} --out={path}`.")
  listed = {line.split("\t", 1)[0] for line in text.splitlines() if line.strip()}
  # (paths as the source names them, which the check command writes: local or gs://...)
  index = {str(p): i for i, p in enumerate(getattr(source, "paths", ()))}
  found = {index[p] for p in listed if p in index}
  if listed and not found:
    raise ConfigError(f"config field data.skip_list={path!r} lists {len(listed)} files, none "
                      f"of them in the source (e.g. {sorted(listed)[0]}); was it written for "
                      f"another data.source?")
  return frozenset(found)


@dataclasses.dataclass(frozen=True)
class Policy:
  """data.bad_images, data.max_bad_fraction, and the skip list's source indices."""
  action: str = "stop"
  max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
  skip: frozenset = frozenset()

  def __post_init__(self):
    validate.bad_image_policy(self.action, self.max_bad_fraction)  # the rules' one home

  @classmethod
  def from_config(cls, data_config, source) -> "Policy":
    """The policy of a config's data block (fields absent: the defaults)."""
    skip_list = data_config.get("skip_list", "")
    return cls(data_config.get("bad_images", "stop"),
               float(data_config.get("max_bad_fraction", DEFAULT_MAX_BAD_FRACTION)),
               read_skip_list(skip_list, source) if skip_list else frozenset())

  @property
  def skips(self) -> bool:
    return self.action == "skip"


def load_or_substitute(source, index: int, load, policy: Policy, failed=(), on_bad=None):
  """(k, load(k)) for the first k of index, index + 1, ... (wrapping) that loads.

  `load(k)` raises BadImageError for a file that does not decode: under "stop" that error
  propagates; under "skip" `on_bad(error)` is told and the next index is tried. Indices in
  `failed` (known to fail here) and in the policy's skip list are passed over unread.
  """
  n = len(source)
  k = int(index)
  for _ in range(n):
    if k in policy.skip:
      pass  # listed by the check command: substituted unread, in either policy
    elif k not in failed:
      try:
        return k, load(k)
      except BadImageError as e:
        if not policy.skips:
          raise
        if on_bad is not None:
          on_bad(e)
    k = (k + 1) % n
  raise DataError(f"No example of the source ({n} examples, from {example_name(source, index)}) "
                  f"decodes: every file is bad or in data.skip_list; check data.source with "
                  f"`{check_command(source)}`.")


class Substituting:
  """`source` whose `source[i]` follows the policy: under "skip" a bad example is the next
  one that decodes (logged once per file; past max_bad_fraction a DataError). The eval sets
  (k-NN, probe and fine-tune evaluations) read their sources through it; the training
  pipelines apply the policy themselves (per place in a batch, JPEG fast paths included)."""

  def __init__(self, source, policy: Policy):
    self.source, self.policy = source, policy
    self.num_classes = getattr(source, "num_classes", None)
    self._bad: set[int] = set()

  def __getattr__(self, name: str):  # paths, root, labels, class_names of the source
    if name == "source":
      raise AttributeError(name)
    return getattr(self.source, name)

  def __len__(self) -> int:
    return len(self.source)

  def _met(self, error: BadImageError) -> None:
    if error.index in self._bad:
      return
    self._bad.add(error.index)
    logging.warning("bad image %s (example %d) skipped (%s); a substitute takes its place "
                    "(data.bad_images='skip')", error.path, error.index, error.reason)
    too_many(len(self._bad), len(self.source), self.policy, self.source)

  def __getitem__(self, index: int):
    return load_or_substitute(self.source, index, self.source.__getitem__, self.policy,
                              on_bad=self._met)[1]


def too_many(num_bad: int, num_examples: int, policy: Policy, source) -> None:
  """Raises past data.max_bad_fraction: `num_bad` distinct bad files of `num_examples`."""
  limit = policy.max_bad_fraction * num_examples
  if num_bad > limit:
    raise DataError(
        f"{num_bad} distinct image files of the source ({num_examples} examples) do not "
        f"decode, more than config field data.max_bad_fraction={policy.max_bad_fraction:g} of "
        f"it ({limit:.0f} files); the dataset looks broken: list its bad files with "
        f"`{check_command(source)}` and fix them (or pass that list as data.skip_list, or "
        f"raise data.max_bad_fraction).")


def with_policy(source, data_config, own_source: bool = True):
  """`source` read through the config's policy (`Substituting`); the skip list belongs to
  data.source only (`own_source`)."""
  skip_list = data_config.get("skip_list", "") if own_source else ""
  policy = Policy(data_config.get("bad_images", "stop"),
                  float(data_config.get("max_bad_fraction", DEFAULT_MAX_BAD_FRACTION)),
                  read_skip_list(skip_list, source) if skip_list else frozenset())
  if not policy.skips and not policy.skip:
    return source  # "stop": the source's own BadImageError names the file
  return Substituting(source, policy)
