"""Import hygiene: the model, train step, kernels and parallel modules import neither
TensorFlow nor clu (GPU and TPU images often lack them); the kernels are leaves."""

import ast
import pathlib
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


def _adpe_imports(path: pathlib.Path) -> list[str]:
  """Every adpe_jax module a file imports (top-level or inside functions), as dotted names."""
  names = []
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names += [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                if node.module == "adpe_jax"]
  return [n for n in names if n.split(".")[0] == "adpe_jax" and n != "adpe_jax"]


def test_kernels_import_nothing_of_adpe_jax_outside_kernels():
  """kernels/ is a leaf: its modules import only each other (and jax, numpy, absl)."""
  files = sorted((pathlib.Path(__file__).parent.parent / "adpe_jax" / "kernels").glob("*.py"))
  assert {p.name for p in files} >= {"attention.py", "rpe_attention.py", "irpe.py"}
  outside = {f"{p.name}: {n}" for p in files for n in _adpe_imports(p)
             if not n.startswith("adpe_jax.kernels")}
  assert not outside, sorted(outside)


def test_the_supervisor_and_the_run_listing_import_no_jax():
  """The supervisor of a multi-process launch never imports JAX (it must not start a backend,
  and stays small); it lists checkpoints through `adpe_jax.checkpoint.rundir`, which, with
  the `adpe_jax.checkpoint` package itself, imports neither JAX, numpy nor orbax."""
  code = ("import sys\nimport adpe_jax.supervisor, adpe_jax.checkpoint.rundir\n"
          "import adpe_jax.checkpoint as c\nc.rundir, c.STATE_ITEM, c.CheckpointError\n"
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
          "('jax', 'jaxlib', 'numpy', 'orbax', 'flax', 'tensorstore'))\n"
          "print(bad)\nassert not bad, bad\n"
          "c.Checkpointer  # the orbax names load on first use\n"
          "assert 'orbax.checkpoint' in sys.modules\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr[-2000:]
