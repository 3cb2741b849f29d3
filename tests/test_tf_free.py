"""The main job on an accelerator image's packages: no TensorFlow, no tensorflow_datasets.

GPU and TPU images carry jax, flax, optax and orbax but usually no TensorFlow.  One
subprocess, with `tensorflow` and `tensorflow_datasets` made unimportable, runs every task
(pretrain, fine-tune, linear probe, k-NN, export to timm); this process (where TensorFlow
is installed) then reads their TensorBoard event files with tensorboard's own reader, on
tensorboard's TensorFlow stub as a user without TensorFlow would.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from devices import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"

# Runs in the subprocess: every task through the entry main.py calls (`tasks.run`).
_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    sys.modules["tensorflow"] = None            # `import tensorflow` raises ImportError
    sys.modules["tensorflow_datasets"] = None
    from adpe_jax.train import tasks
    from adpe_jax import export

    def config(path, arg, **fields):
      spec = importlib.util.spec_from_file_location("cfg", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      c = module.get_config(arg)
      for dotted, value in fields.items():
        node, *parts = [c, *dotted.split("__")]
        for p in parts[:-1]:
          node = node[p]
        node[parts[-1]] = value
      return c

    out = sys.argv[1]
    pre, ft, lp, knn = (f"{out}/{n}" for n in ("pre", "ft", "lp", "knn"))
    tasks.run(config("configs/vitb_rpe_coord.py", "smoke", total_steps=4,
                     checkpoint_every_steps=4, log_every_steps=2, eval__knn_source=""), pre)
    tasks.run(config("configs/finetune_vitb_rpe_interp.py", "smoke", init=pre, total_steps=2,
                     log_every_steps=1, data__source="fashion_mnist"), ft)
    tasks.run(config("configs/linprobe_vitb.py", "smoke", init=pre, total_steps=2,
                     log_every_steps=1), lp)
    tasks.run(config("configs/knn.py", "smoke", init=pre), knn)
    export.export(pre, f"{out}/encoder.safetensors")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "clu")
                    and sys.modules[m] is not None)
    print("LOADED " + json.dumps(loaded))
""")


def read_event_file(data: bytes) -> list:
  """The Event protos of an event file's bytes (TFRecord framing; CRCs not checked)."""
  from tensorboard.compat.proto import event_pb2
  events, i = [], 0
  while i < len(data):
    (length,) = struct.unpack("<Q", data[i:i + 8])
    events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + length]))
    i += 12 + length + 4
  return events


def scalars_of(logdir) -> dict:
  """{tag: [(step, value)]} through tensorboard's own reader (EventAccumulator).

  `tensorboard.compat.notf` present makes tensorboard take its TensorFlow stub: the
  reader then imports no TensorFlow (5 s, and under pytest TensorFlow's `test_util.py`
  would be parsed for assertion rewriting, which Python 3.11.7 fails at random with
  "AST constructor recursion depth mismatch").
  """
  sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0,
                                                                       "images": 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  if not os.path.exists(FMNIST):
    pytest.skip("Fashion-MNIST not installed (make data)")
  out = tmp_path_factory.mktemp("tf_free")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
  r = subprocess.run([sys.executable, "-c", _SCRIPT, str(out)], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  loaded = json.loads(r.stdout.split("LOADED ", 1)[1].splitlines()[0])
  return out, loaded


def test_every_task_runs_without_tensorflow(runs):
  out, loaded = runs
  assert loaded == []  # not even clu's writers
  for task in ("pre", "ft", "lp", "knn"):
    summary = json.loads((out / task / "summary.json").read_text())
    assert summary.get("status", "finished") == "finished", (task, summary)
  assert (out / "encoder.safetensors").stat().st_size > 0
  for task in ("pre", "ft", "lp"):
    records = [json.loads(x) for x in (out / task / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)


def test_event_files_hold_the_logged_scalars_and_images(runs):
  out, _ = runs
  for task in ("pre", "ft", "lp"):
    records = [json.loads(x) for x in (out / task / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["loss"]) for r in records if "loss" in r]
    got = scalars_of(out / task)["loss"]
    assert [s for s, _ in got] == [s for s, _ in logged]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in logged], rtol=1e-6)
  # The pretraining reconstruction grid and the adversary's picture, as PNG image summaries.
  events = []
  for f in sorted((out / "pre").glob("events.out.tfevents.*")):
    events += read_event_file(f.read_bytes())
  images = [v for e in events for v in e.summary.value if v.HasField("image")]
  assert sorted(v.tag for v in images) == ["adversary", "reconstructions"]
  for v in images:
    assert v.image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    assert v.image.width > 0 and v.image.height > 0


def test_a_built_tfds_dataset_reads_without_tensorflow():
  """tests/data/tfds/tiny_images was built with TensorFlow (make_tiny_images.py); reading it
  (ArrayRecord, tfds.data_source) imports no TensorFlow.  In `make test-next` TensorFlow is
  not installed at all, tensorflow-datasets is: the accelerator image with tfds."""
  pytest.importorskip("tensorflow_datasets")
  code = textwrap.dedent("""
      import json, sys
      import numpy as np
      from adpe_jax import data
      src = data.get_source("tfds:tiny_images", "train", sys.argv[1])
      out = [(src[i][0].tolist(), int(src[i][1])) for i in range(len(src))]
      loaded = [m for m in sys.modules if m.split(".")[0] == "tensorflow"]
      print(json.dumps({"examples": out, "classes": src.num_classes, "tf": loaded}))
  """)
  r = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "tests", "data", "tfds")],
                     cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got["tf"] == [] and got["classes"] == 3
  rng = np.random.default_rng(0)  # the images the builder wrote, in generation order
  expected = {rng.integers(0, 256, (28, 28, 3), dtype=np.uint8).tobytes(): i % 3
              for i in range(12)}
  read = {np.asarray(img, np.uint8).tobytes(): label for img, label in got["examples"]}
  assert read == expected  # every image (PNG: lossless) with its label, in tfds's order


def test_main_imports_no_tensorflow_even_where_it_is_installed(tmp_path):
  """`python -X importtime -m adpe_jax.main ...` (TensorFlow installed here) lists no
  tensorflow module: the writers, the data sources and the tasks all do without."""
  pytest.importorskip("tensorflow")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  r = subprocess.run([sys.executable, "-X", "importtime", "-m", "adpe_jax.main",
                      "--config=configs/vitb_ape.py:smoke", f"--workdir={tmp_path}",
                      "--config.total_steps=1", "--config.eval.knn_source="],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  imported = [line.split("|")[-1].strip() for line in r.stderr.splitlines()
              if line.startswith("import time:")]
  assert "adpe_jax.train.event_writer" in imported
  assert not [m for m in imported if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
  assert list(tmp_path.glob("events.out.tfevents.*"))
