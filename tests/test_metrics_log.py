"""metrics.jsonl survives what a run's end can do to it: a kill mid-record, a stray
non-UTF-8 byte, a diverged (non-finite) loss, a resume after steps the checkpoint lacks."""

import json

from adpe_jax.train import loop
from adpe_jax.train.metrics import MetricsLog


def strict_json(line: str) -> dict:
  """json.loads that refuses NaN / Infinity (not JSON; Python's json accepts them)."""
  def refuse(name):
    raise ValueError(f"not JSON: {name}")
  return json.loads(line, parse_constant=refuse)


def records(path) -> list[dict]:
  return [strict_json(l) for l in path.read_text().splitlines()]


def test_resume_drops_a_record_cut_mid_write_and_steps_after_the_checkpoint(tmp_path):
  jsonl = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4, 5)]
  lines.insert(2, "a complete line that is not a record")   # kept as it is: nothing lost
  jsonl.write_text("\n".join(lines) + "\n" + '{"step": 6, "lo')  # killed mid-write
  (tmp_path / "log.txt").write_text("2024 step=5 loss=0.2\n2024 step=6 lo")
  log = MetricsLog(str(tmp_path), 10, tensorboard=False, start_step=3)  # restored step 3
  log.write({"step": 4, "loss": 0.25})
  log.close()
  text = jsonl.read_text().splitlines()
  assert text[2] == "a complete line that is not a record"
  got = [strict_json(l) for l in text if l.startswith("{")]
  assert [r["step"] for r in got] == [1, 2, 3, 4]             # one record a step, none cut
  assert got[-1] == {"step": 4, "loss": 0.25}
  assert (tmp_path / "log.txt").read_text().splitlines()[-1].endswith("step=4 loss=0.25")
  # A fresh run (no restored step) and a resume at the last step change nothing.
  before = jsonl.read_bytes()
  MetricsLog(str(tmp_path), 10, tensorboard=False, start_step=4).close()
  MetricsLog(str(tmp_path), 10, tensorboard=False).close()
  assert jsonl.read_bytes() == before


def test_a_non_utf8_byte_does_not_break_reading_the_history(tmp_path):
  jsonl = tmp_path / "metrics.jsonl"
  jsonl.write_bytes(b'{"step": 1, "loss": 0.5}\n\xff\xfe garbage\n{"step": 2, "loss": 0.25}\n'
                    b'{"step": 3, "loss": 0.1, "note": "\xe9"}\n')
  got = loop.logged_records(tmp_path, "loss")
  assert [r["loss"] for r in got] == [0.5, 0.25, 0.1]   # a bad byte in a string: replaced
  assert got[-1]["note"] == "\ufffd"
  assert [r["step"] for r in loop.logged_records(tmp_path, "loss", upto=1)] == [1]
  MetricsLog(str(tmp_path), 10, tensorboard=False, start_step=2).close()  # resume trims
  assert [r["step"] for r in loop.logged_records(tmp_path, "loss")] == [1, 2]
  assert b"\xff\xfe garbage" in jsonl.read_bytes()


def test_non_finite_values_are_written_as_json_null(tmp_path):
  log = MetricsLog(str(tmp_path), 10, tensorboard=False)
  log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1})
  log.write({"step": 2, "loss": -float("inf"), "lr": 0.1})
  log.close()
  got = records(tmp_path / "metrics.jsonl")
  assert got == [{"step": 1, "loss": None, "grad_norm": None, "lr": 0.1},
                 {"step": 2, "loss": None, "lr": 0.1}]
  text = (tmp_path / "log.txt").read_text()
  assert "loss=nan grad_norm=inf" in text and "loss=-inf" in text   # the value itself
  assert [r["loss"] for r in loop.logged_records(tmp_path, "loss")] == [None, None]


def test_progress_reports_rate_and_eta_every_30_seconds():
  from adpe_jax.train.metrics import Progress
  now = [100.0]
  progress = Progress(total_steps=1000, every_seconds=30.0, clock=lambda: now[0])
  assert progress(0) is None               # the first call sets the origin
  now[0] = 110.0
  assert progress(50) is None              # 10 s: not yet
  now[0] = 140.0
  # 200 steps in 40 s = 5 steps/s; 800 steps left = 160 s.
  assert progress(200) == "progress: step 200/1000 (20.0 %), 5 steps/s, ETA 00:02:40"
  now[0] = 170.0 + 86400.0
  line = progress(201)                     # one step in a day: ETA in days
  # 799 steps left at 1 step per 86430 s = 69,057,570 s = 799 days + 23,970 s.
  assert line.endswith("ETA 799d 06:39:30"), line
