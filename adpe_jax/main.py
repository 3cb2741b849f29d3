"""Entry point: python -m adpe_jax.main --config=configs/vitb_rpe_coord.py --workdir=DIR"""

import importlib.util
import os
import sys
import threading

from absl import app, flags, logging
from ml_collections import config_flags

from adpe_jax.errors import AdpeError, ConfigError

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
    try:
      spec = importlib.util.spec_from_file_location("adpe_user_config", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      config = module.get_config(arg or None)
    except Exception as e:  # pylint: disable=broad-except
      return f"config file {config_arg!r} could not be loaded: {e}"
    for a in argv:
      if a.startswith("--config."):
        field = a[len("--config."):].split("=", 1)[0]
        node = config
        for part in field.split("."):
          if not hasattr(node, "keys") or part not in node.keys():
            return (f"config field {field!r} (from {a}) does not exist in {path}; "
                    f"see the configuration table in README.md.")
          node = node[part]
  return f"bad command line: {error}"


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    print(f"error: {_explain_bad_flags(argv, e)}", file=sys.stderr)
    sys.exit(2)


def _drop_closed_loop_noise() -> None:
  """Silence orbax's leftover reads after a refused checkpoint.

  When a corrupt checkpoint fails to restore, tensorstore callbacks still in flight try
  to reach orbax's already-closed asyncio loop and print 'Event loop is closed'
  tracebacks (through sys.excepthook / threading.excepthook / sys.unraisablehook) around
  our one-sentence error.  Only that exact error is dropped.
  """
  def noise(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)

  prev_except, prev_thread, prev_unraisable = (sys.excepthook, threading.excepthook,
                                               sys.unraisablehook)
  sys.excepthook = lambda t, v, tb: None if noise(v) else prev_except(t, v, tb)
  threading.excepthook = lambda a: None if noise(a.exc_value) else prev_thread(a)
  sys.unraisablehook = lambda u: None if noise(u.exc_value) else prev_unraisable(u)


def _enable_compilation_cache(config, workdir: str) -> str | None:
  """XLA's persistent compilation cache (config field compilation_cache): a re-run, a
  resumed run or another run of the same program loads the compiled step instead of
  compiling it again.  Returns the directory used (None = off)."""
  import jax  # noqa: PLC0415
  setting = str(config.get("compilation_cache", "auto"))
  if setting == "none":
    return None
  if setting == "auto":
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # jax has read it already
      return os.environ["JAX_COMPILATION_CACHE_DIR"]
    setting = (workdir.rstrip("/") + "/jax_cache" if "://" in workdir
               else os.path.join(os.path.abspath(workdir), "jax_cache"))
  elif not setting:
    raise ConfigError("config field compilation_cache='' is not allowed; use auto, none or "
                      "a directory.")
  jax.config.update("jax_compilation_cache_dir", setting)
  return setting


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  _drop_closed_loop_noise()
  # config.task: "pretrain" (default; the pretraining configs have no such field) or
  # "finetune" (configs/finetune_*.py, adpe_jax/train/finetune.py), "linprobe" / "knn"
  # (frozen-encoder evaluations, adpe_jax/train/linprobe.py and evaluate.py).
  task = _CONFIG.value.get("task", "pretrain")
  if task == "finetune":
    from adpe_jax.train.finetune import finetune as train_and_evaluate  # noqa: PLC0415
  elif task == "linprobe":  # configs/linprobe_*.py
    from adpe_jax.train.linprobe import linprobe as train_and_evaluate  # noqa: PLC0415
  elif task == "knn":  # configs/knn.py
    from adpe_jax.train.evaluate import run_knn as train_and_evaluate  # noqa: PLC0415
  elif task == "pretrain":
    from adpe_jax.train.pretrain import train_and_evaluate  # noqa: PLC0415
  else:
    print(f"error: config field task={task!r} is not allowed; allowed values: 'pretrain', "
          f"'finetune', 'linprobe', 'knn'.", file=sys.stderr)
    sys.exit(2)
  try:
    _enable_compilation_cache(_CONFIG.value, _WORKDIR.value)
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except AdpeError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without interpreter teardown: a refused checkpoint leaves orbax reads that
    # would print 'Event loop is closed' tracebacks after the one-sentence error.
    # Nothing is pending: the error happens before any save starts.
    os._exit(2)
  except Exception as e:  # noqa: BLE001
    import jax  # noqa: PLC0415
    if jax.process_count() <= 1:
      raise
    _lost_peer_exit(e, _CONFIG.value.distributed.heartbeat_timeout_seconds)


def _lost_peer_exit(error: BaseException, heartbeat_timeout: float) -> None:
  """A failure in a multi-process run: name the process that is gone, exit non-zero.

  A dead peer first shows up as a failed collective (e.g. gloo's 'Connection reset by
  peer'); JAX's coordination service declares it dead after the heartbeat timeout.  Wait
  (bounded) for that verdict and name it; if the service aborts this process first, its
  own message names the task ('Task N heartbeat timeout').  Never hangs.
  """
  import time  # noqa: PLC0415
  import jax  # noqa: PLC0415
  from jax._src import distributed  # noqa: PLC0415
  n, me = jax.process_count(), jax.process_index()
  first = " ".join(str(error).split())[:300]
  print(f"error: process {me} of {n}: {type(error).__name__}: {first}", file=sys.stderr)
  sys.stderr.flush()
  if isinstance(error, FloatingPointError):  # agreed by all processes (a global value)
    os._exit(1)
  dead: list[int] = []
  deadline = time.time() + float(heartbeat_timeout) + 15
  client = distributed.global_state.client

  def ask() -> None:  # get_live_nodes may block: asked from a daemon thread
    while client is not None and time.time() < deadline and not dead:
      try:
        live = client.get_live_nodes(list(range(n)))
        dead.extend(i for i in range(n) if i not in live)
      except Exception:  # noqa: BLE001
        pass
      if not dead:
        time.sleep(1.0)

  asker = threading.Thread(target=ask, daemon=True)
  asker.start()
  asker.join(timeout=max(0.0, deadline - time.time()))
  if dead:
    who = ", ".join(f"process {i}" for i in dead)
    print(f"error: lost peer: {who} of {n} stopped responding (no heartbeat for "
          f"{heartbeat_timeout:g} s); process {me} stops too. Re-run the same command on "
          f"every process to resume from the last complete checkpoint.", file=sys.stderr)
  else:
    print(f"error: process {me} of {n} stops after a failure shared with its peers (see the "
          f"other processes' logs); re-run the same command on every process to resume.",
          file=sys.stderr)
  sys.stderr.flush()
  os._exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
