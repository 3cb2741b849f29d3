"""Entry point: python -m adpe_jax.main --config=configs/vitb_rpe_coord.py --workdir=DIR"""

import contextlib
import importlib.util
import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from adpe_jax import phase, supervisor
from adpe_jax.config.validate import RENAMED_FIELDS
from adpe_jax.errors import AdpeError, ExitCode, out_of_memory, out_of_memory_message

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py), e.g. configs/vitb_ape.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def _explain_bad_flags(argv, error) -> str:
  """One sentence for a flag error: an unknown --config.a.b field gets named."""
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg:
    path, _, arg = config_arg.partition(":")
    if not os.path.isfile(path):
      return (f"config file {path!r} (from --config={config_arg}) "
              + ("is a directory" if os.path.isdir(path) else "does not exist")
              + "; pass one of configs/*.py, e.g. --config=configs/vitb_rpe_coord.py.")
    try:
      spec = importlib.util.spec_from_file_location("adpe_user_config", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      config = module.get_config(arg or None)
    except Exception as e:  # noqa: BLE001 (any failure becomes one sentence)
      return f"config file {config_arg!r} could not be loaded: {e}"
    for a in argv:
      if a.startswith("--config."):
        field = a[len("--config."):].split("=", 1)[0]
        node = config
        for part in field.split("."):
          if not hasattr(node, "keys") or part not in node:
            if field in RENAMED_FIELDS:
              return f"config field {field!r} (from {a}) {RENAMED_FIELDS[field]}"
            return (f"config field {field!r} (from {a}) does not exist in {path}; "
                    f"see docs/configuration.md.")
          node = node[part]
  return f"bad command line: {error}"


def _parse_flags(argv):
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.keys()  # a file that failed to load raises here (ml_collections defers it)
    return rest
  except Exception as e:  # noqa: BLE001 (any failure becomes one sentence)
    print(f"error: {_explain_bad_flags(argv, e)}", file=sys.stderr)
    sys.exit(ExitCode.REFUSED)


def _say(line: str) -> None:
  """The last line on stderr, flushed; nothing when stderr is gone (a SIGHUP of a closed
  terminal or a dropped ssh session: writing there fails with EIO or EPIPE)."""
  with contextlib.suppress(OSError, ValueError):
    sys.stdout.flush()
  with contextlib.suppress(OSError, ValueError):
    print(line, file=sys.stderr, flush=True)


def _out_of_memory(error: BaseException, workdir) -> str | None:
  """The sentence for memory exhausted (`errors.out_of_memory`), naming the phase this
  process was in (`adpe_jax.phase`), else None."""
  what = out_of_memory(error)
  if what is None:
    return None
  return out_of_memory_message(what, phase.describe(), supervisor.resume_point(workdir))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  config, workdir = _CONFIG.value, _WORKDIR.value
  multi_process = supervisor.detect_launch(config).multi_process
  if not supervisor.supervised():
    # The work runs in a child, so that JAX's fatal aborts (a lost peer or coordinator, a
    # peer that never joins; memory exhausted under `ulimit -v`) still end with our
    # sentence.  The supervisor never imports JAX (0.5 s and 20 MB, not 6 s and 260 MB).
    sys.exit(supervisor.supervise(workdir, multi_process=multi_process))
  import jax  # noqa: PLC0415 (here: the supervisor above does without)

  from adpe_jax.train import stop, tasks  # noqa: PLC0415
  ended = False  # the run returned: its summary.json says how it ended
  try:
    # The loop and its evaluations hold their own guard; several processes: none (JAX's).
    with stop.interruptible(multi_process=multi_process):
      tasks.run(config, workdir)
      ended = True
  except stop.PreemptedError as e:
    name = stop.signal_name(e.signum)
    if ended:
      # A signal after the run's end (its exception lost earlier, or raised on the way
      # out): the run ended and wrote its summary, so the exit code is that run's (0), never
      # the signal's: a finished run does not exit 128 + n.
      logging.warning("got %s after the run ended; summary.json says how it ended", name)
      return
    _say(f"error: interrupted by {name} outside the training steps (starting, restoring, "
         f"or a task that saves nothing); nothing on disk was lost; re-run the same command "
         f"to continue.")
    os._exit(128 + (e.signum or signal.SIGTERM))  # the shell's code for that signal
  except AdpeError as e:
    _say(f"error: {_out_of_memory(e, workdir) or e}")
    # Exit without interpreter teardown: a refused checkpoint leaves orbax reads in flight
    # (checkpoint.quiet_orbax_teardown).  Nothing is pending: the error precedes any save.
    os._exit(ExitCode.REFUSED)
  except Exception as e:
    said = _out_of_memory(e, workdir)
    if said:  # (the loop's clean-up has waited for a save in flight)
      _say(f"error: {said}")
      os._exit(ExitCode.REFUSED)
    if jax.process_count() <= 1:
      raise
    stop.lost_peer_exit(e, config.distributed.heartbeat_timeout_seconds)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
