"""XLA_FLAGS for the test processes and for the runs the tests start as subprocesses.

The tests compile hundreds of small programs and run each for a few steps, so most of
their time is XLA's CPU backend compiling.  They compile with LLVM at -O0
(`--xla_backend_optimization_level=0`): about 15 % less CPU for the whole suite on the
2-core CI machine (benchmarks/README.md, "Test-suite time").  The level changes only
LLVM's code generation, not the HLO that XLA optimises, nor float semantics (XLA's CPU
fast-math is off at every level).  ADPE_TEST_XLA_CODEGEN="" runs them at XLA's default.
"""

import os

CODEGEN = os.environ.get("ADPE_TEST_XLA_CODEGEN", "--xla_backend_optimization_level=0")


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a CPU process with `devices` fake devices, at the tests' codegen level."""
  return f"--xla_force_host_platform_device_count={devices} {CODEGEN}".strip()
