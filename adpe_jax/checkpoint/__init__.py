"""The run on disk: its checkpoints, run metadata, summary.json and config.json.

  rundir        JAX-free (the supervisor imports it): the workdir's files and names, the
                complete checkpoints (`complete_steps`, `newest_step`, `newest_checkpoint`,
                `step_dir`), `read_summary` / `write_summary`, `read_config` /
                `write_config`, and the one diff of configs and run metadata (`flat`,
                `config_fields`, `diff`, `metadata_changes`).
  checkpointer  orbax: the `Checkpointer` (async, keep-N saves; restores that refuse what
                does not fit), `read_meta` / `read_params` of one step directory without
                a Checkpointer, `read_checkpoint` (the readers' one read: again from the
                newest complete checkpoint when a live trainer deletes theirs),
                `checksums` / `verify_checksums`, `short_error`.

`from adpe_jax import checkpoint as ckpt_lib; ckpt_lib.Checkpointer(...)` keeps working:
the names of `checkpointer` are read from here on first use, so importing this package
(or `rundir`) imports neither JAX nor orbax.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adpe_jax.checkpoint import rundir
from adpe_jax.checkpoint.rundir import META_ITEM, STATE_ITEM
from adpe_jax.errors import CheckpointError

if TYPE_CHECKING:  # for readers and type checkers; at run time `__getattr__` below
  from adpe_jax.checkpoint.checkpointer import (  # noqa: F401
      Checkpointer, abstract_of, checksums, os_cause, quiet_orbax_teardown, read_checkpoint,
      read_meta, read_params, short_error, verify_checksums)

_CHECKPOINTER = ("Checkpointer", "abstract_of", "checksums", "os_cause",
                 "quiet_orbax_teardown", "read_checkpoint", "read_meta", "read_params",
                 "short_error",
                 "verify_checksums")

__all__ = ["CheckpointError", "META_ITEM", "STATE_ITEM", "rundir", *_CHECKPOINTER]


def __getattr__(name: str):
  """The orbax names (PEP 562): JAX and orbax are imported on first use only."""
  if name in _CHECKPOINTER:
    from adpe_jax.checkpoint import checkpointer  # noqa: PLC0415 (lazily: module docstring)
    value = globals()[name] = getattr(checkpointer, name)  # looked up once
    return value
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
