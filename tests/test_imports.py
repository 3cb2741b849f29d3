"""Import hygiene: the model, train step, kernels and parallel modules import neither
TensorFlow nor clu (GPU and TPU images often lack them)."""

import subprocess
import sys

CORE = ["adpe_jax.models", "adpe_jax.models.posembed", "adpe_jax.models.irpe", "adpe_jax.adversary",
        "adpe_jax.train.step", "adpe_jax.train.optimizer", "adpe_jax.train.state",
        "adpe_jax.parallel", "adpe_jax.convert", "adpe_jax.data", "adpe_jax.kernels.attention",
        "adpe_jax.kernels.irpe", "adpe_jax.kernels.rpe_attention"]


def test_core_modules_do_not_import_tensorflow_or_clu():
  code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE) +
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'clu', 'tensorflow_datasets'))\n"
          "print(bad)\nassert not bad, bad\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr[-2000:]
