"""Every use of JAX's private modules (`jax._src`) in adpe_jax, in one place.

`jax._src` has no stability promise: each use says which jax it targets; check them when
the supported range (setup.cfg) moves.  Only the multi-process code needs one: the
coordination service's client, which has no public API.
"""

from __future__ import annotations

# jax 0.10.2 (the tested stack); jax 0.11 and 0.12 keep `jax._src.distributed.global_state`
# with the same `client` and `coordinator_address` attributes.
from jax._src import distributed as _distributed


def coordination_client():
  """This process's client of JAX's coordination service (None before
  `jax.distributed.initialize`).  adpe_jax calls `key_value_set(key, value)`,
  `blocking_key_value_get(key, timeout_in_ms)` (jax 0.10.2 signatures; strings, no
  compiled computation, a timeout) and `get_live_nodes(process_ids)`."""
  return _distributed.global_state.client


def coordinator_address() -> str:
  """The coordinator's address this process joined ("" before it joined); jax 0.10.2."""
  return _distributed.global_state.coordinator_address or ""
