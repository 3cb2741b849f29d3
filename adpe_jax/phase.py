"""Which phase a run is in (compile, restore, a training step, a save): the words of the
one sentence for a fault that says nothing of where it happened.

Host or device memory running out surfaces wherever an allocation fails: an XLA
`RESOURCE_EXHAUSTED` error or a `MemoryError` that `main` catches, or a C++ abort
(SIGABRT / SIGSEGV under an address-space limit) that nothing in the process survives.
`enter` records the phase here (for `main`'s handler) and, in a supervised child
(`adpe_jax.supervisor`), reports it through the supervisor's pipe as {"stage", "step"},
so that the supervisor's last sentence names the phase the child died in.

A leaf: imports nothing of adpe_jax nor JAX (the supervisor reads `describe`).
"""

from __future__ import annotations

import contextlib
import json
import os

SUPERVISED = "ADPE_SUPERVISED"
REPORT_FD = "ADPE_SUPERVISOR_FD"

_current: dict = {"stage": "starting", "step": None}


def _report_fd() -> int | None:
  fd = os.environ.get(REPORT_FD)
  if not fd or os.environ.get(SUPERVISED) != "1":
    return None
  try:
    return int(fd)
  except ValueError:
    return None


def enter(stage: str, step: int | None = None) -> None:
  """This process is now in `stage` ("compile", "restore", "first step", "training",
  "save", "evaluation"), at `step` where it has one; never fails.  Called every training
  step: a no-op unless the phase changed, one small pipe write when supervised."""
  if _current["stage"] == stage and _current["step"] == step:
    return
  _current.update(stage=stage, step=step)
  fd = _report_fd()
  if fd is not None:
    with contextlib.suppress(OSError, ValueError):
      os.write(fd, (json.dumps({"stage": stage, "step": step}) + "\n").encode())


def current() -> dict:
  """{"stage", "step"} of this process (a copy)."""
  return dict(_current)


def describe(info: dict | None = None) -> str:
  """The phase of {"stage", "step"} (default: this process's) in words."""
  info = _current if info is None else info
  stage, step = info.get("stage") or "starting", info.get("step")
  return {
      "starting": "the start (before the model was built)",
      "compile": "the compile (building the model, its initial state and the train step)",
      "restore": "the restore of the checkpoint",
      "first step": f"the first training step (step {step})",
      "training": f"training step {step}",
      "save": f"the save at step {step}",
      "evaluation": f"the evaluation at step {step}",
  }.get(stage, f"{stage}" + (f" at step {step}" if step is not None else ""))
