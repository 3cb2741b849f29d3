"""Import shims that let the original AdPE code (github.com/maple-research-lab/AdPE, written
for torch 1.8.1 / timm 0.3.2 / numpy < 1.24) import under this repository's torch 2.x and
numpy 2.x, for `benchmarks/peer_pytorch.py` only.

Nothing here re-implements the original: each shim restores an API that the original or
timm 0.3.2 imports and that newer libraries removed.  `install()` must run before timm or
the original's modules are imported.

  torch._six        removed in torch 2.0; timm 0.3.2 (`container_abcs`) and the original's
                    optimizer/NativeScaler.py (`inf`) import from it.
  numpy.float/int   removed in numpy 1.24; position_embed/ape_pos_embed.py uses np.float.
  torchvision       timm 0.3.2's package __init__ imports timm.data, which imports
                    torchvision.transforms at module level; the model and the train step
                    never call it.  The torchvision wheel next to a +cpu torch often fails to
                    import (`operator torchvision::nms does not exist`), so a stand-in module
                    is used unless `real_torchvision=True` and it imports cleanly.
  easydict          a dependency of the original's position_embed/irpe*.py
                    (`from easydict import EasyDict as edict`); the real package is used when
                    installed, else a minimal attribute-dict stand-in.
"""

from __future__ import annotations

import collections.abc
import importlib.abc
import importlib.machinery
import math
import sys
import types


class _Stub(types.ModuleType):
  """A module whose every attribute is a do-nothing class (torchvision stand-in)."""
  __path__: list = []

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    stub = type(name, (), {"__init__": lambda self, *a, **k: None,
                           "__call__": lambda self, x, *a, **k: x})
    setattr(self, name, stub)
    return stub


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def __init__(self, top: str):
    self.top = top

  def find_spec(self, name, path, target=None):  # noqa: ARG002
    if name == self.top or name.startswith(self.top + "."):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    return _Stub(spec.name)

  def exec_module(self, module):
    pass


class _EasyDict(dict):
  """The part of easydict.EasyDict the original uses: attribute access to dict keys,
  nested dicts converted."""

  def __init__(self, d=None, **kwargs):
    super().__init__()
    for k, v in dict(d or {}, **kwargs).items():
      self[k] = v

  def __setitem__(self, k, v):
    if isinstance(v, dict) and not isinstance(v, _EasyDict):
      v = _EasyDict(v)
    super().__setitem__(k, v)

  __setattr__ = __setitem__

  def __getattr__(self, k):
    try:
      return self[k]
    except KeyError as e:
      raise AttributeError(k) from e


def install(real_torchvision: bool = False) -> dict:
  """Installs the shims; returns {name: 'real' | 'shim'} for the report."""
  used = {}
  import numpy as np
  import torch

  try:
    import torch._six
    used["torch._six"] = "real"
  except ImportError:
    six = types.ModuleType("torch._six")
    six.inf = math.inf
    six.nan = math.nan
    six.container_abcs = collections.abc
    six.string_classes = (str, bytes)
    six.int_classes = int
    sys.modules["torch._six"] = six
    torch._six = six
    used["torch._six"] = "shim"

  for name, value in (("float", float), ("int", int), ("bool", bool), ("object", object)):
    if name not in np.__dict__:
      setattr(np, name, value)
      used[f"numpy.{name}"] = "shim"

  have_tv = False
  if real_torchvision:
    try:
      import torchvision  # noqa: F401
      have_tv = True
    except Exception:  # noqa: BLE001 (a broken CUDA build raises RuntimeError)
      for n in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
        del sys.modules[n]
  if not have_tv:
    sys.meta_path.insert(0, _StubFinder("torchvision"))
  used["torchvision"] = "real" if have_tv else "shim"

  try:
    import easydict  # noqa: F401
    used["easydict"] = "real"
  except ImportError:
    mod = types.ModuleType("easydict")
    mod.EasyDict = _EasyDict
    sys.modules["easydict"] = mod
    used["easydict"] = "shim"
  return used
