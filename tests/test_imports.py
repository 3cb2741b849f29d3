"""Import hygiene: the model, train step, kernels and parallel modules import neither
TensorFlow nor clu (GPU and TPU images often lack them); the kernels are leaves; no import
circle among the package's modules and no arrow from a lower layer back up (read from the
source, imports inside functions included)."""

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


# -- the layering: no import circle, no arrow from a lower layer back up ---------------------

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (importers, imported, why): no module under an importer prefix imports a module under the
# imported prefix.  A prefix names a module and everything below it ("adpe_jax.models" is
# models/ and all its modules).  docs/architecture.md draws the layers.
LAYER_RULES = (
    (("adpe_jax.models", "adpe_jax.data", "adpe_jax.kernels", "adpe_jax.config"),
     "adpe_jax.train", "the library's lower layers import nothing of the tasks"),
    (("adpe_jax.kernels",), "adpe_jax.models", "kernels are leaves under the models"),
    (("adpe_jax.config",), "adpe_jax.data", "validation does not import the input"),
    (("adpe_jax.models",), "adpe_jax.adversary",
     "the models read the collection name from adpe_jax.layout"),
    (("adpe_jax.adversary", "adpe_jax.checkpoint", "adpe_jax.parallel"), "adpe_jax.models",
     "the block layout and the collection name live in adpe_jax.layout, not in models/"),
    (("adpe_jax",), "adpe_jax.tools", "the command-line tools sit on top, like main"),
    (("adpe_jax",), "adpe_jax.main", "nothing imports the entry point"),
)


def _module_of(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _under(module: str, prefix: str) -> bool:
  return module == prefix or module.startswith(prefix + ".")


def import_graph() -> dict[str, set[str]]:
  """{module: the adpe_jax modules it imports}, from the source (top level and inside
  functions).  `from package import name` is an arrow to the submodule `package.name` when
  one exists, else to the package (its __init__)."""
  paths = sorted((ROOT / "adpe_jax").rglob("*.py"))
  modules = {_module_of(p) for p in paths}

  def target(name: str) -> str:
    while name not in modules:  # `import adpe_jax.a.b` of a module; an attribute's module
      name = name.rpartition(".")[0]
    return name

  graph = {}
  for path in paths:
    arrows = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Import):
        arrows |= {target(a.name) for a in node.names if _under(a.name, "adpe_jax")}
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
          and _under(node.module, "adpe_jax"):
        arrows |= {target(f"{node.module}.{a.name}") for a in node.names}
    graph[_module_of(path)] = arrows - {"adpe_jax", _module_of(path)}
  return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The import circles: strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def broken_rules(graph: dict[str, set[str]]) -> list[str]:
  return sorted(f"{a} -> {b} ({why})" for importers, imported, why in LAYER_RULES
                for a, targets in graph.items() for b in targets
                if any(_under(a, p) for p in importers) and _under(b, imported)
                and not _under(a, imported))


def test_no_import_circle_among_the_modules():
  graph = import_graph()
  assert len(graph) > 50 and "adpe_jax.train.loop" in graph["adpe_jax.train.pretrain"]
  assert not circles(graph), circles(graph)


def test_no_arrow_from_a_lower_layer_back_up():
  broken = broken_rules(import_graph())
  assert not broken, "\n".join(broken)


def test_the_layering_check_sees_what_it_must():
  """The checker itself, on a made-up graph: a function-local arrow counts like any."""
  graph = {"adpe_jax.data.prepare": {"adpe_jax.data.sources"},
           "adpe_jax.data.sources": {"adpe_jax.data.prepare"},
           "adpe_jax.models.mae": {"adpe_jax.adversary"}, "adpe_jax.adversary": set()}
  assert circles(graph) == [["adpe_jax.data.prepare", "adpe_jax.data.sources"]]
  assert broken_rules(graph) == ["adpe_jax.models.mae -> adpe_jax.adversary (the models read "
                                 "the collection name from adpe_jax.layout)"]
