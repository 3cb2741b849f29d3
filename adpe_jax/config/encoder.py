"""The frozen encoder's fields of the k-NN and linear-probe configs (`config/probe.py`),
resolved: those left "auto" (model.variant "", model.patch_size 0, model.pe "",
model.rpe_lookup "", image_size 0) are taken from the run metadata of `config.init` (a
pretraining workdir / checkpoint of ours); a .pth or a random init needs them set.

The metadata is read by the caller's `read_run(init) -> dict | None` (None: a PyTorch
file; raises CheckpointError), `adpe_jax.weights.metadata` in the tasks: the config layer
imports no checkpoint code.
"""

from __future__ import annotations

from typing import Callable, Optional

import ml_collections

from adpe_jax import storage
from adpe_jax.errors import CheckpointError, ConfigError, InitError


def pe_of(run: dict) -> tuple[str, str]:
  """(model.pe, model.rpe_lookup) of the encoder a pretraining run trained: the
  coordinate adversary's runs use the continuous (bilinear) lookup."""
  if run.get("model", {}).get("pe") != "rpe":
    return "ape", "integer"
  return "rpe", ("continuous" if run.get("adversary", {}).get("kind") == "coordinate"
                 else "integer")


def resolve_encoder_fields(config, read_run: Callable[[str], Optional[dict]]
                           ) -> ml_collections.ConfigDict:
  """An unlocked copy of `config` with the auto fields (model.variant "", model.patch_size
  0, model.pe "", model.rpe_lookup "", image_size 0) taken from the run metadata of
  `config.init` (`read_run(config.init)`, read only when a field is auto); a .pth or a
  random init needs them set."""
  c = ml_collections.ConfigDict(config.to_dict())
  if c.init and not storage.resolve(c.init).exists():
    raise InitError(f"config field init={c.init!r} does not exist.")
  if not c.init:             # a random init: APE (integer lookup for rpe) unless set
    c.model.pe = c.model.pe or "ape"
    c.model.rpe_lookup = c.model.rpe_lookup or "integer"
  if c.model.pe == "ape":
    c.model.rpe_lookup = c.model.rpe_lookup or "integer"   # unused
  auto = [f for f, v in (("model.variant", c.model.variant == ""),
                         ("model.patch_size", c.model.patch_size <= 0),
                         ("model.pe", c.model.pe == ""),
                         ("model.rpe_lookup", c.model.rpe_lookup == ""),
                         ("image_size", c.image_size <= 0)) if v]
  if auto:
    run = None
    if c.init:
      try:
        run = read_run(c.init)
      except CheckpointError as e:
        raise InitError(f"config field init={c.init!r} cannot be used: {e}") from e
    if run is None:
      what = (f"config.init={c.init!r} is a PyTorch checkpoint" if c.init
              else "config.init is empty (random init)")
      raise ConfigError(f"config field {auto[0]} is left to the checkpoint, but {what}; "
                        f"set {', '.join(auto)}.")
    m = run.get("model", {})
    if c.model.variant == "":
      c.model.variant = m.get("variant", "")
    if c.model.patch_size <= 0:
      c.model.patch_size = int(m.get("patch_size", 0))
    pe, lookup = pe_of(run)
    c.model.pe = c.model.pe or pe
    c.model.rpe_lookup = c.model.rpe_lookup or lookup
    if c.image_size <= 0:
      c.image_size = int(run.get("image_size", 0))
  c.model.drop_path = 0.0
  c.model.global_pool = False
  if "num_classes" not in c.data:
    c.data.num_classes = 2    # the classifier's head is not used
  return c
