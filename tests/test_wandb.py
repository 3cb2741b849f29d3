"""Optional Weights & Biases logging (log.wandb), in wandb's offline mode (no network)."""

from __future__ import annotations

import json
import sys

import pytest

from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.errors import ConfigError
from adpe_jax.train.pretrain import train_and_evaluate

wandb = pytest.importorskip("wandb")


def wandb_history(data: bytes) -> list[dict]:
  """The history rows ({key: value}) of a .wandb file: wandb's LevelDB-style log (a 7-byte
  header, then 32 KiB blocks of records: crc32 (4), length (2, little-endian), type (1: full,
  2/3/4: first/middle/last piece), data) of `Record` protos."""
  from wandb.proto import wandb_internal_pb2
  block, pos, pieces, records = 32768, 7, b"", []
  while pos + 7 <= len(data):
    if block - pos % block < 7:
      pos += block - pos % block
      continue
    length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
    chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    if kind == 1:
      records.append(chunk)
    elif kind in (2, 3):
      pieces = (b"" if kind == 2 else pieces) + chunk
    elif kind == 4:
      records.append(pieces + chunk)
  rows = []
  for raw in records:
    record = wandb_internal_pb2.Record.FromString(raw)
    if record.WhichOneof("record_type") == "history":
      rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item})
  return rows


def _config():
  c = pretrain_config.apply_smoke(pretrain_config.base_config())
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 4, 1, 2
  c.max_steps_per_run = 2
  c.eval.knn_source = ""
  c.log.wandb, c.log.wandb_mode = True, "offline"
  return c


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_SILENT", "true")
  c = _config()
  assert train_and_evaluate(c, str(tmp_path))["summary"]["status"] == "stopped"
  run_id = (tmp_path / "wandb_run_id").read_text().strip()
  assert train_and_evaluate(c, str(tmp_path))["summary"]["status"] == "finished"
  runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
  assert len(runs) == 2 and all(r.name.endswith("-" + run_id) for r in runs)
  logged = [row for r in runs for row in wandb_history((r / f"run-{run_id}.wandb").read_bytes())
            if "loss" in row]
  records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(row["_step"], row["loss"]) for row in logged] == [(r["step"], r["loss"])
                                                            for r in records]
  # The reconstruction grid of the last step, as a wandb image (nested keys of its record).
  images = [row for r in runs for row in wandb_history((r / f"run-{run_id}.wandb").read_bytes())
            if "reconstructions/_type" in row]
  assert [(row["_step"], row["reconstructions/_type"]) for row in images] == [(4, "image-file")]


def test_log_wandb_without_the_package_is_refused_before_anything_is_written(tmp_path,
                                                                              monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
  with pytest.raises(ConfigError, match="log.wandb=True needs the wandb package"):
    train_and_evaluate(_config(), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
