"""A CLI run watched while it runs (the signal and resume tests send it signals at the
moment its stderr shows a given line)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_hangup():
  """A child's preexec_fn: SIGHUP at its default action, as in a terminal (a test runner
  started under nohup would otherwise pass its SIG_IGN on)."""
  signal.signal(signal.SIGHUP, signal.SIG_DFL)


class Watched:
  """A CLI run whose stderr is read line by line while it runs; `popen`: more of Popen's
  arguments (env)."""

  def __init__(self, args, command=("-m", "adpe_jax.main"), **popen):
    self.lines: list = []
    self.proc = subprocess.Popen([sys.executable, *command, *args], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, preexec_fn=default_hangup, **popen)
    self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr),
                                   daemon=True)
    self.reader.start()

  def wait_for(self, text, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and self.proc.poll() is None:
      if any(text in line for line in list(self.lines)):
        return
      time.sleep(0.05)
    pytest.fail(f"never logged {text!r}: {''.join(self.lines)[-3000:]}")

  def finish(self, timeout=180):
    rc = self.proc.wait(timeout=timeout)
    self.reader.join(timeout=10)
    return rc, "".join(self.lines)
