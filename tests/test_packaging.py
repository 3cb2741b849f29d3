"""Versions as a library declares them: ranges in setup.cfg, exact tested versions in
.ci/constraints.txt (what make install and CI use), and the venv holding exactly those."""

import configparser
import importlib.metadata
import pathlib

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _declared() -> list[Requirement]:
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  lines = cfg["options"]["install_requires"].splitlines()
  lines += [l for v in cfg["options.extras_require"].values() for l in v.splitlines()]
  return [Requirement(l) for l in lines if l.strip() and not l.strip().startswith("#")]


def _constraints() -> dict[str, str]:
  out = {}
  for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
    if line and not line.startswith("#"):
      name, _, version = line.partition("==")
      out[name.lower().replace("_", "-")] = version
  return out


def test_setup_cfg_declares_ranges_that_admit_the_gpu_images_jax():
  reqs = {r.name: r for r in _declared()}
  assert not [r for r in reqs.values() if any(s.operator == "==" for s in r.specifier)]
  for name in ("jax", "jaxlib"):
    spec = reqs[name].specifier
    for v in ("0.10.2", "0.11.2", "0.12.0.1"):   # CI's, the H200 image's, PyPI's newest
      assert spec.contains(Version(v)), (name, v)
    assert not spec.contains(Version("0.13.0")), name


def test_constraints_pin_every_declared_package_inside_its_range():
  pins = _constraints()
  for r in _declared():
    name = r.name.lower().replace("_", "-")
    if name == "google-cloud-storage":   # the gcs extra is not installed in CI
      continue
    if name == "adpe-jax":   # an extra naming others ([test] pulls [tfds,wandb]): checked there
      continue
    assert name in pins, f"{name} is declared in setup.cfg but not pinned in .ci/constraints.txt"
    assert r.specifier.contains(Version(pins[name])), (name, pins[name], str(r.specifier))


def test_the_environment_holds_the_constrained_versions():
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ruff", "pytest"):
    installed = Version(importlib.metadata.version(name)).public
    assert installed == _constraints()[name], (name, installed)


def test_accelerator_extras_pull_jax_builds_in_the_same_range():
  """`[cuda12]`, `[cuda13]`, `[tpu]`: jax with that extra, admitting the tested 0.10.2, the
  H200 image's 0.11.2 and PyPI's 0.12.0.1, stopping before 0.13; CI pins 0.10.2."""
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  extras = cfg["options.extras_require"]
  for extra in ("cuda12", "cuda13", "tpu"):
    reqs = [Requirement(l) for l in extras[extra].splitlines()
            if l.strip() and not l.strip().startswith("#")]
    assert [(r.name, r.extras) for r in reqs] == [("jax", {extra})], extra
    for v in ("0.10.2", "0.11.2", "0.12.0.1"):
      assert reqs[0].specifier.contains(Version(v)), (extra, v)
    assert not reqs[0].specifier.contains(Version("0.13.0")), extra
  assert _constraints()["jax"] == "0.10.2" and _constraints()["jaxlib"] == "0.10.2"


def test_pytest_rewrites_asserts_in_our_tests_only(tmp_path, monkeypatch):
  """An installed package's module named like a test (TensorFlow's `test_util.py`) is
  imported as it is: pytest's assertion rewriting parses it otherwise, and on Python 3.11.7
  that parse fails at random (the CI failure of 3721efb)."""
  (tmp_path / "pkg_like_tf").mkdir()
  (tmp_path / "pkg_like_tf" / "__init__.py").write_text("")
  (tmp_path / "pkg_like_tf" / "test_util.py").write_text("def check(x):\n  assert x\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  import importlib
  module = importlib.import_module("pkg_like_tf.test_util")
  assert "@py_builtins" not in vars(module)   # what a rewritten module imports
  assert "@py_builtins" in globals()          # this module is rewritten
