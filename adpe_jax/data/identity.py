"""What a run's training data is, cheaply: `of(source)`, and what changed: `changes`.

A resumed run continues exactly only on the data it was trained on: the epoch permutation
is drawn over `len(source)`, and the labels are the ranks of the class names.  Its
checkpoints record this identity (the checkpoint's meta item, `data`), and the run skeleton
compares it with the data a resume reads (`adpe_jax.train.preflight.check_saved_data`).

The identity is a small JSON object, built without reading any file's contents:

  kind      "folder", "prepared", "tfds", "fashion_mnist", "synthetic", "arrays";
  examples  the example count;
  classes   the class names in label order (a list), or only their number (an int);
  files     a folder: a digest of its file list, the paths relative to the folder's root
            in the order read (a moved folder keeps its identity; a renamed, added or
            removed file changes it);
  index     a prepared source: a digest of its prepared.json (shards and their counts,
            the re-encoding settings, the substituted bad files), without the path of the
            source it was prepared from;

and what else names the data (tfds: name, version and split; synthetic: its size).  The
root's path is not part of it: the same data under another path is the same data.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping


def digest(items: Iterable[str]) -> str:
  """A short hex digest of strings in order (sha256 of them joined by newlines)."""
  h = hashlib.sha256()
  for item in items:
    h.update(item.encode("utf-8", "surrogateescape"))
    h.update(b"\n")
  return h.hexdigest()[:32]


def json_digest(value: Any) -> str:
  """`digest` of a JSON value (keys sorted)."""
  return digest([json.dumps(value, sort_keys=True)])


def of(source) -> dict:
  """The identity of `source` (module docstring): its own `identity()` where it has one,
  else its kind, example count and class count."""
  own = getattr(source, "identity", None)
  if callable(own):
    out = dict(own())
  else:
    out = {"kind": type(source).__name__, "examples": len(source)}
    if getattr(source, "num_classes", None) is not None:
      out["classes"] = int(source.num_classes)
  return json.loads(json.dumps(out))  # as it reads back from the checkpoint


def _quoted(names) -> str:
  return ", ".join(repr(n) for n in names)


def _classes(old, new) -> str:
  if isinstance(old, list) and isinstance(new, list):
    gone = [n for n in old if n not in new]
    came = [n for n in new if n not in old]
    parts = []
    if came:
      parts.append(f"class{'es' if len(came) > 1 else ''} {_quoted(came)} appeared")
    if gone:
      parts.append(f"class{'es' if len(gone) > 1 else ''} {_quoted(gone)} disappeared")
    return " and ".join(parts) or f"the class order changed ({_quoted(old)} -> {_quoted(new)})"
  count = lambda c: len(c) if isinstance(c, list) else c  # noqa: E731
  return f"classes {count(old)} -> {count(new)}"


def changes(saved: Mapping, now: Mapping) -> list[str]:
  """What differs between a checkpoint's data identity (`saved`) and this run's (`now`),
  as phrases for one sentence ([] when they are the same data)."""
  saved, now = dict(saved or {}), dict(now or {})
  if saved == now:
    return []
  if saved.get("kind") != now.get("kind"):
    return [f"the data is a {now.get('kind')} source now, a {saved.get('kind')} source before"]
  out = []
  if saved.get("examples") != now.get("examples"):
    out.append(f"examples {saved.get('examples')} -> {now.get('examples')}")
  if saved.get("classes") != now.get("classes"):
    out.append(_classes(saved.get("classes"), now.get("classes")))
  for key in sorted((set(saved) | set(now)) - {"kind", "examples", "classes", "files",
                                               "index"}):
    if saved.get(key) != now.get(key):
      out.append(f"{key} {saved.get(key)!r} -> {now.get(key)!r}")
  if not out:  # the same count and classes: the files themselves (or the shards) differ
    if saved.get("files") != now.get("files"):
      out.append(f"the file list differs ({now.get('examples')} files now, "
                 f"{saved.get('examples')} before)")
    else:
      out.append(f"the prepared index differs ({now.get('shards')} shards now, "
                 f"{saved.get('shards')} before)")
  return out
