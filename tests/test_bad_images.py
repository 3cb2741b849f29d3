"""Bad files in a folder dataset: named, stopped on or skipped by a deterministic substitute;
16-bit images scaled, not clipped; the check command lists exactly the bad files.

The dataset is real: 32 Fashion-MNIST items written as JPEG / PNG files (tinted and enlarged
to 56-80 px, sizes differing so a substitute's crops are drawn anew, so a truncated JPEG keeps its header and fails in the decode, not the header read).
Five of them are then spoiled: a truncated JPEG, random bytes and a text file named .jpg (two
neighbours: a substitute chain), and a truncated PNG as the last file (its substitute wraps to
example 0). The independent expectation of "skip" is the same folder with each bad file's
bytes replaced by its substitute's (the next good file in sorted order, wrapping), read under
"stop": batches must be equal.  (Those tests skip without Debian's dataset-fashion-mnist; the
multi-epoch run uses a folder of noise JPEGs and runs everywhere.)
"""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from adpe_jax import data
from adpe_jax.data import bad_images, images, prepare
from adpe_jax.errors import BadImageError, DataError
from adpe_jax.tools import check
from devices import xla_flags

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
N, PER_CLASS = 32, 16
# Sorted-order example index -> how it is spoiled.
BAD = {3: "truncated_jpeg", 18: "random_bytes", 19: "text", 31: "truncated_png"}
SKIP = bad_images.Policy("skip", max_bad_fraction=0.2)


def substitute(i: int) -> int:
  """The rule, computed here from the construction: the next index that is not bad."""
  j = (i + 1) % N
  while j in BAD:
    j = (j + 1) % N
  return j


def met(i: int) -> list:
  """The bad files example i's substitute search reads: i and the bad ones after it."""
  chain = []
  while i in BAD:
    chain.append(i)
    i = (i + 1) % N
  return chain


def _name(i: int) -> str:
  ext = "png" if i in (7, 31) else "jpg"   # 7: a good PNG among the JPEGs
  return f"c{i // PER_CLASS}/{i % PER_CLASS:03d}.{ext}"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """(bad_root, expected_root, fmnist images): the spoiled folder and its expectation."""
  if not os.path.exists(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz")):
    pytest.skip("apt-get install dataset-fashion-mnist")
  fm = data.FashionMnistSource("test", FMNIST_DIR)
  rng = np.random.default_rng(0)
  good = {}
  for i in range(N):
    tint = rng.uniform(0.5, 1.0, 3)
    rgb = Image.fromarray((fm.images[i][:, :, None] * tint).astype(np.uint8))
    out = io.BytesIO()
    rgb.resize((56 + 8 * (i % 4), 64 + 4 * (i % 3)), Image.BICUBIC).save(out, format="PNG" if _name(i).endswith("png")
                                             else "JPEG", quality=90)
    good[i] = out.getvalue()
  spoiled = dict(good)
  spoiled[3] = good[3][:len(good[3]) * 3 // 4]
  spoiled[18] = np.random.default_rng(1).bytes(700)
  spoiled[19] = b"this is a text file, not a picture\n" * 10
  spoiled[31] = good[31][:len(good[31]) // 2]
  expected = {i: good[substitute(i)] if i in BAD else good[i] for i in range(N)}
  roots = []
  for label, files in (("bad", spoiled), ("expected", expected)):
    root = tmp_path_factory.mktemp(label)
    for i, payload in files.items():
      (root / _name(i)).parent.mkdir(exist_ok=True)
      (root / _name(i)).write_bytes(payload)
    roots.append(str(root))
  return roots[0], roots[1], fm.images[:N]


def _source(root):
  return data.get_source(f"folder:{root}", "train")


def _pipe(root, policy=None, **kw):
  kw.setdefault("num_threads", 2)
  return data.PretrainPipeline(_source(root), 8, 28, 2, seed=5, bad_images=policy, **kw)


def _assert_batches_equal(a, b):
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_sources_name_each_bad_file_with_index_and_reason(folders):
  bad_root, _, _ = folders
  source = _source(bad_root)
  assert [os.path.relpath(p, bad_root) for p in source.paths] == [_name(i) for i in range(N)]
  for i, kind in BAD.items():
    with pytest.raises(BadImageError) as e:
      source[i]
    message = str(e.value)
    assert source.paths[i] in message and f"(example {i})" in message
    assert "data.bad_images='skip'" in message and "python -m adpe_jax.tools.check" in message
    assert "BytesIO" not in message and message.count(". ") == 0  # one sentence
    assert ("truncated" in message.lower()) == kind.startswith("truncated"), message


@pytest.mark.parametrize("decoder", ["pil", "simplejpeg"])
def test_stop_names_the_file_in_threads_and_worker_processes(folders, decoder):
  bad_root, _, _ = folders
  with _pipe(bad_root, decoder=decoder) as pipe:
    step = next(s for s in range(4) if 3 in pipe.example_indices(s))
    with pytest.raises(DataError) as in_process:
      pipe.get_batch(step)
  assert os.path.join(bad_root, _name(3)) in str(in_process.value)
  with _pipe(bad_root, decoder=decoder, num_workers=2) as pipe, \
       pytest.raises(DataError) as from_worker:
    list(pipe.iterate(step, 1))
  assert str(from_worker.value) == str(in_process.value)  # the same sentence, not a dead worker


@pytest.mark.parametrize("decoder", ["pil", "simplejpeg"])
def test_skip_gives_the_batches_of_the_folder_with_substitutes(folders, decoder):
  bad_root, expected_root, _ = folders
  with _pipe(bad_root, SKIP, decoder=decoder) as pipe, \
       _pipe(expected_root, decoder=decoder) as reference:
    counted = []
    for step in range(5):  # one epoch (4 steps: every bad file once) and a step of the next
      batch = pipe.get_batch(step)
      counted.append(int(batch.pop("bad_images", 0)))
      here = [i for i in pipe.example_indices(step).tolist() if i in BAD]
      assert counted[-1] == len(here)
      assert sorted(batch.pop("bad_indices", [])) == sorted(sum(map(met, here), []))
      assert len(batch.pop("bad_reasons", [])) == len(sum(map(met, here), []))
      _assert_batches_equal(batch, reference.get_batch(step))
    assert sum(counted[:4]) == len(BAD)


def test_skip_counts_in_iterate_through_workers_and_stays_exact_on_restart(folders):
  bad_root, _, _ = folders
  with _pipe(bad_root, SKIP, num_workers=2) as pipe:
    streamed = list(pipe.iterate(0, 6))
    assert pipe.bad_images_seen == len(BAD) + sum(
        len(set(BAD) & set(pipe.example_indices(s).tolist())) for s in (4, 5))
  assert all(set(b) == {"images", "ids"} for b in streamed)  # the counts are taken out
  with _pipe(bad_root, SKIP) as restarted:  # a fresh process resuming at step 3
    for step, batch in zip(range(3, 6), restarted.iterate(3, 3)):
      _assert_batches_equal(batch, streamed[step])


def test_skip_batches_do_not_depend_on_the_process_count(folders):
  bad_root, _, _ = folders
  with _pipe(bad_root, SKIP) as whole:
    halves = [_pipe(bad_root, SKIP, process_index=p, process_count=2) for p in range(2)]
    for step in range(4):
      full = whole.get_batch(step)
      parts = [h.get_batch(step) for h in halves]
      for key in ("images", "ids"):
        per_crop = [np.split(p[key], 2) for p in parts]   # 2 crops, each of 4 local examples
        joined = np.concatenate([np.concatenate([c[k] for c in per_crop]) for k in range(2)])
        np.testing.assert_array_equal(joined, full[key])
      assert int(full.get("bad_images", 0)) == sum(int(p.get("bad_images", 0)) for p in parts)
    for h in halves:
      h.close()


def test_more_bad_files_than_max_bad_fraction_stop_the_run(folders):
  bad_root, _, _ = folders
  limit = bad_images.Policy("skip", max_bad_fraction=0.1)  # 3.2 files of 32
  with _pipe(bad_root, limit) as pipe, pytest.raises(
      DataError, match=r"4 distinct image files .* data.max_bad_fraction=0.1 "
                       r".*adpe_jax.tools.check --source=folder:"):
    list(pipe.iterate(0, 4))


def test_check_command_lists_exactly_the_bad_files_and_its_list_skips_them(folders, tmp_path,
                                                                         capsys):
  bad_root, expected_root, _ = folders
  out = tmp_path / "bad.txt"
  assert check.check(f"folder:{bad_root}", workers=2, out=str(out)) == 1
  lines = out.read_text().splitlines()
  assert [line.split("\t")[0] for line in lines] == [os.path.join(bad_root, _name(i))
                                                     for i in sorted(BAD)]
  assert all(line.split("\t")[1] for line in lines)
  assert f"checked {N} images" in capsys.readouterr().out
  assert check.check(f"folder:{expected_root}", workers=1) == 0
  # The list as data.skip_list: those files are substituted unread, even under "stop".
  listed = bad_images.read_skip_list(str(out), _source(bad_root))
  assert listed == frozenset(BAD)
  with _pipe(bad_root, bad_images.Policy("stop", skip=listed)) as pipe, \
       _pipe(expected_root) as reference:
    for step in range(4):
      batch = pipe.get_batch(step)
      assert "bad_indices" not in batch or len(batch["bad_indices"]) == 0
      batch.pop("bad_images", None), batch.pop("bad_indices", None), batch.pop("bad_reasons",
                                                                               None)
      _assert_batches_equal(batch, reference.get_batch(step))


@pytest.mark.parametrize("package", ["tools", "data"])
def test_check_and_prepare_command_lines(folders, tmp_path, package):
  """`python -m adpe_jax.tools.check / .prepare` (absl) and their earlier names under data/:
  the same flags, output and exit status."""
  bad_root, _, _ = folders

  def run(tool, *flags):
    return subprocess.run([sys.executable, "-m", f"adpe_jax.{package}.{tool}", *flags],
                          capture_output=True, text=True, timeout=120)

  out = tmp_path / "bad.txt"
  r = run("check", f"--source=folder:{bad_root}", "--workers=1", f"--out={out}")
  assert r.returncode == 1, r.stderr[-2000:]
  assert f"checked {N} images of folder:{bad_root} (split train)" in r.stdout
  assert f"{len(BAD)} bad, listed in {out}" in r.stdout
  assert len(out.read_text().splitlines()) == len(BAD)
  r = run("check", "--source=folder:/nonexistent", "--workers=1")
  assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr[-2000:]
  prepared = tmp_path / "prepared"
  r = run("prepare", f"--source=folder:{bad_root}", f"--out={prepared}", "--num_shards=2",
          "--num_processes=1", "--bad_images=skip")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == (f"prepared {N} examples in 2 shards: {prepared}; {len(BAD)} bad "
                              f"files substituted")
  assert r.stderr.count("stored as its substitute") == len(BAD)
  assert run("prepare", f"--source=folder:{bad_root}", "--bad_images=ignore").returncode != 0


def test_eval_arrays_substitute_too(folders):
  bad_root, expected_root, _ = folders
  got, _ = data.labelled_arrays(bad_images.Substituting(_source(bad_root), SKIP), 28)
  want, _ = data.labelled_arrays(_source(expected_root), 28)
  np.testing.assert_array_equal(got, want)
  with pytest.raises(BadImageError, match=_name(3)):
    data.labelled_arrays(_source(bad_root), 28)


def test_prepare_stops_on_or_substitutes_and_lists_bad_files(folders, tmp_path):
  bad_root, _, _ = folders
  source = _source(bad_root)
  with pytest.raises(BadImageError, match=_name(3)):
    prepare.prepare(source, str(tmp_path / "stop"), num_shards=2)
  assert not [p for p in os.listdir(tmp_path / "stop") if ".tmp" in p]  # no partial shard
  index = prepare.prepare(source, str(tmp_path / "skip"), num_shards=2,
                          bad_images_policy="skip")
  assert [b[0] for b in index["bad_images"]] == sorted(BAD)
  prepared = data.get_source(f"prepared:{tmp_path / 'skip'}")
  for i in BAD:
    assert prepared.encoded(i) == prepared.encoded(substitute(i))


def _png16(values: np.ndarray, color: int) -> bytes:
  """A 16-bit PNG written here byte by byte (greyscale: color 0; RGB: color 2)."""
  h, w = values.shape[:2]
  raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

  def chunk(kind, payload):
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_images_are_scaled_to_8_bits(folders, tmp_path, caplog):
  _, _, originals = folders
  x = originals[0]                                  # a real 8-bit Fashion-MNIST image
  x16 = x.astype(np.uint16) * 257                   # the same picture at 16 bits (255 -> 65535)
  noise = np.random.default_rng(2).integers(0, 256, x.shape)  # low bytes must not matter
  root = tmp_path / "sixteen" / "c"
  root.mkdir(parents=True)
  Image.fromarray(x16).save(root / "0_pillow.png")  # Pillow's own 16-bit writer (mode I;16)
  (root / "1_grey.png").write_bytes(_png16((x16 & 0xFF00) | noise, 0))
  (root / "2_rgb48.png").write_bytes(_png16(np.stack([x16] * 3, -1), 2))
  Image.fromarray(x16).save(root / "3_tiff.tif")
  images._logged_16bit.clear()
  source = data.get_source(f"folder:{root.parent}", "train")
  with caplog.at_level("WARNING"):
    for i in range(len(source)):
      image, _ = source[i]
      assert image.shape == (28, 28, 3)
      for c in range(3):
        assert np.abs(image[..., c].astype(int) - x).max() <= 1, source.paths[i]
  assert sum("scaled to 8 bits" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_bad_image_error_survives_pickling_and_config_fields_are_validated():
  import pickle

  from adpe_jax.config import pretrain as pretrain_config
  from adpe_jax.errors import ConfigError

  e = BadImageError("/d/c/x.jpg", 7, "not an image file Pillow can identify")
  again = pickle.loads(pickle.dumps(e))
  assert str(again) == str(e) and (again.path, again.index) == ("/d/c/x.jpg", 7)
  c = pretrain_config.base_config()
  assert (c.data.bad_images, c.data.max_bad_fraction, c.data.skip_list) == ("stop", 0.001, "")
  c.data.bad_images = "ignore"
  with pytest.raises(ConfigError, match="data.bad_images='ignore'"):
    pretrain_config.validate(c)
  c.data.bad_images, c.data.max_bad_fraction = "skip", 1.5
  with pytest.raises(ConfigError, match="data.max_bad_fraction=1.5"):
    pretrain_config.validate(c)


def test_log_records_get_the_cumulative_count_under_skip_only(folders):
  from adpe_jax.train.metrics import bad_image_metrics

  bad_root, _, _ = folders
  with _pipe(bad_root, SKIP) as pipe:
    assert bad_image_metrics(pipe) == {"bad_images": 0}
    for _ in pipe.iterate(0, 4):  # one epoch: each bad example once
      pass
    assert bad_image_metrics(pipe) == {"bad_images": len(BAD)}
  with _pipe(bad_root) as pipe:
    assert bad_image_metrics(pipe) == {}


def test_pretrain_run_skips_bad_files_and_logs_the_count(folders, tmp_path):
  """One end-to-end run: the smoke config on the spoiled folder, skipping."""
  bad_root, _, _ = folders
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS=xla_flags(2),
             PYTHONPATH=os.pathsep.join([root] + sys.path))
  r = subprocess.run(
      [sys.executable, "-m", "adpe_jax.main", "--config=configs/vitb_ape.py:smoke",
       f"--workdir={tmp_path / 'run'}", f"--config.data.source=folder:{bad_root}",
       "--config.data.bad_images=skip", "--config.data.max_bad_fraction=0.2",
       "--config.data.num_workers=0", "--config.total_steps=4", "--config.log_every_steps=2",
       "--config.checkpoint_every_steps=4"],
      cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines() if '"loss"' in line]
  assert [rec["bad_images"] for rec in records][-1] == len(BAD)  # one epoch: each once
  assert all(rec["bad_images"] <= len(BAD) for rec in records)
  for i in BAD:
    assert r.stderr.count(f"bad image {os.path.join(bad_root, _name(i))}") == 1
  shutil.rmtree(tmp_path / "run")



@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory):
  """(root, bad file names): 32 small noise JPEGs in two class folders, two of them truncated.
  Needs no dataset, so it runs wherever the suite does."""
  root = tmp_path_factory.mktemp("noise")
  rng = np.random.default_rng(0)
  bad = ("c0/003.jpg", "c1/011.jpg")
  for i in range(N):
    name = f"c{i // PER_CLASS}/{i % PER_CLASS:03d}.jpg"
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (36 + 4 * (i % 3), 40, 3), np.uint8)).save(
        out, format="JPEG", quality=90)
    payload = out.getvalue()
    (root / name).parent.mkdir(exist_ok=True)
    (root / name).write_bytes(payload[:len(payload) // 2] if name in bad else payload)
  return str(root), bad


def test_a_multi_epoch_skip_run_with_few_bad_files_does_not_stop(noise_folder, tmp_path):
  """Three epochs under "skip" with 2 distinct bad files, below the limit (0.1 of 32 = 3.2):
  the bad files recur every epoch (6 substitutions by the end), but the stop counts distinct
  files, so a copy with a few broken files trains to the end instead of stopping in its
  second epoch."""
  bad_root, bad = noise_folder
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS=xla_flags(2),
             PYTHONPATH=os.pathsep.join([root] + sys.path))
  epochs, steps_per_epoch = 3, N // 8          # the smoke config's batch is 8 images
  r = subprocess.run(
      [sys.executable, "-m", "adpe_jax.main", "--config=configs/vitb_ape.py:smoke",
       f"--workdir={tmp_path / 'run'}", f"--config.data.source=folder:{bad_root}",
       "--config.data.bad_images=skip", "--config.data.max_bad_fraction=0.1",
       "--config.data.num_workers=0", f"--config.total_steps={epochs * steps_per_epoch}",
       f"--config.log_every_steps={steps_per_epoch}",
       f"--config.checkpoint_every_steps={epochs * steps_per_epoch}",
       "--config.compilation_cache=none"],
      cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["status"] == "finished", summary
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines() if '"loss"' in line]
  # The cumulative count is of substituted examples: each bad file once per epoch.
  counts = {rec["step"]: rec["bad_images"] for rec in records}
  assert {s: counts.get(s) for s in (4, 8, 12)} == {4: 2, 8: 4, 12: 6}, counts
  for name in bad:  # each bad file is still logged once, not once per epoch
    assert r.stderr.count(f"bad image {os.path.join(bad_root, name)}") == 1


def test_a_resumed_skip_run_logs_the_bad_image_counts_of_an_uninterrupted_one(noise_folder,
                                                                               tmp_path):
  """The cumulative `bad_images` count is of the run, not of the process: stopped mid-epoch
  (step 6, by max_steps_per_run) and resumed, the run logs at steps 8 and 12 what the
  uninterrupted run of the test above logs there (4 and 6), not a count restarted at 0."""
  bad_root, _ = noise_folder
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS=xla_flags(2),
             PYTHONPATH=os.pathsep.join([root] + sys.path))
  command = [sys.executable, "-m", "adpe_jax.main", "--config=configs/vitb_ape.py:smoke",
             f"--workdir={tmp_path / 'run'}", f"--config.data.source=folder:{bad_root}",
             "--config.data.bad_images=skip", "--config.data.max_bad_fraction=0.1",
             "--config.data.num_workers=0", "--config.total_steps=12",
             "--config.log_every_steps=4", "--config.checkpoint_every_steps=12",
             "--config.compilation_cache=none"]
  for extra in (["--config.max_steps_per_run=6"], []):   # stopped at 6, then resumed
    r = subprocess.run(command + extra, cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["status"] == "finished", summary
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines() if '"loss"' in line]
  counts = {rec["step"]: rec["bad_images"] for rec in records}
  assert sorted(counts) == [4, 6, 8, 12], counts
  # The uninterrupted run's values (test_a_multi_epoch_skip_run_with_few_bad_files...).
  assert {s: counts[s] for s in (4, 8, 12)} == {4: 2, 8: 4, 12: 6}, counts
  assert counts[4] <= counts[6] <= counts[8], counts
