"""Start-of-run checks shared by the task configs; each raises ConfigError in one
sentence naming the field, its value and what is allowed."""

from __future__ import annotations

import math

from adpe_jax.errors import ConfigError

TASKS = ("pretrain", "finetune", "linprobe", "knn")
BAD_IMAGE_POLICIES = ("stop", "skip")   # data.bad_images (adpe_jax/data/bad_images.py)


def get(c, field: str):
  value = c
  for part in field.split("."):
    value = value[part]
  return value


def choice(c, field: str, allowed) -> None:
  one_of(field, get(c, field), allowed)


def one_of(field: str, value, allowed) -> None:
  """`value` (of config field `field`) among `allowed`."""
  if value not in allowed:
    raise ConfigError(f"config field {field}={value!r} is not allowed; allowed values: "
                      f"{', '.join(map(repr, allowed))}.")


def positive(c, *fields: str) -> None:
  """Each field a positive integer."""
  for field in fields:
    value = get(c, field)
    if value < 1:
      raise ConfigError(f"config field {field}={value} must be a positive integer.")


def bad_images(c) -> None:
  """data.bad_images / data.max_bad_fraction (adpe_jax/data/bad_images.py)."""
  bad_image_policy(c.data.bad_images, c.data.max_bad_fraction)


def bad_image_policy(action: str, max_bad_fraction: float) -> None:
  """The values of data.bad_images and data.max_bad_fraction (also checked where a
  `bad_images.Policy` is made from them, e.g. by `python -m adpe_jax.tools.prepare`)."""
  one_of("data.bad_images", action, BAD_IMAGE_POLICIES)
  if not 0.0 <= max_bad_fraction <= 1.0:
    raise ConfigError(f"config field data.max_bad_fraction={max_bad_fraction} must lie in "
                      f"[0, 1] (a fraction of the dataset's examples).")


def patch_grid(c) -> None:
  """image_size a multiple of model.patch_size."""
  if c.model.patch_size <= 0 or c.image_size % c.model.patch_size:
    raise ConfigError(
        f"config field image_size={c.image_size} is not divisible by model.patch_size="
        f"{c.model.patch_size}; choose an image size that is a multiple of the patch size.")


def steps_or_epochs(c) -> None:
  if c.total_steps <= 0 and c.total_epochs <= 0:
    raise ConfigError("config fields total_steps and total_epochs are both <= 0; set one.")


def divisible_batch(c, field: str, num_devices: int) -> None:
  value = get(c, field)
  if value < 1 or value % num_devices:
    raise ConfigError(f"config field {field}={value} must be a positive multiple of the "
                      f"{num_devices} devices.")


def task_of(c) -> str:
  """config.task ("pretrain" when absent: the pretraining configs have no such field)."""
  task = c.get("task", "pretrain")
  if task not in TASKS:
    raise ConfigError(f"config field task={task!r} is not allowed; allowed values: "
                      f"{', '.join(map(repr, TASKS))}.")
  return task


# Fields of earlier versions: a command line that still sets one gets this sentence.
RENAMED_FIELDS = {
    "model.pe_type": (
        "was replaced by model.pe and model.rpe_lookup: pe_type 0 is model.pe=ape; 1 is "
        "model.pe=rpe with model.rpe_lookup=integer; 2 is model.pe=rpe with "
        "model.rpe_lookup=continuous."),
    "faithful": (
        "was replaced by model.rpe_query: faithful=True is model.rpe_query=unscaled (the "
        "original's fine-tune query, spec 9.2), faithful=False is model.rpe_query=scaled."),
}


def upgrade_run_metadata(run: dict) -> dict:
  """A fine-tune / probe checkpoint's run metadata written before model.pe_type became
  model.pe + model.rpe_lookup, in today's names (so such a workdir resumes)."""
  model = dict(run.get("model", {}) or {})
  if "pe_type" not in model:
    return run
  pe_type = model.pop("pe_type")
  model["pe"] = "ape" if pe_type == 0 else "rpe"
  model["rpe_lookup"] = {1: "integer", 2: "continuous"}.get(pe_type)
  return {**run, "model": model}


# Values every task checks at start (`values`), for the fields a config has: rates and epoch
# counts (a negative blr trains by gradient ascent, issue 17), counts, probabilities.
# Intervals as written in the sentence ("[a, b)"; inf = no bound).
_RANGES = {
    "blr": "(0, inf)",
    "min_lr": "[0, inf)",
    "weight_decay": "[0, inf)",
    "warmup_epochs": "[0, inf)",
    "total_epochs": "[0, inf)",
    "layer_decay": "(0, 1]",
    "momentum": "[0, 1]",
    "b1": "[0, 1)",          # Adam's bias correction divides by 1 - b ** t
    "b2": "[0, 1)",
    "temperature": "[0, inf)",
    "crop_fraction": "(0, 1]",
    "adversary.lr": "[0, inf)",
    "adversary.weight_decay": "[0, inf)",
    "adversary.inner_step_size": "[0, inf)",
    "aug.mixup": "[0, inf)",
    "aug.cutmix": "[0, inf)",
    "aug.mixup_prob": "[0, 1]",
    "aug.mixup_switch_prob": "[0, 1]",
    "aug.reprob": "[0, 1]",
    "eval.crop_fraction": "(0, 1]",
    "seed": "[0, inf)",
    "keep_checkpoints": "[1, inf)",
    "data.num_threads": "[0, inf)",
    "data.num_workers": "[-1, inf)",
    "data.num_examples": "[0, inf)",
    "eval.max_examples": "[0, inf)",
    "eval.heldout_examples": "[1, inf)",
    "eval.heldout_every_steps": "[0, inf)",
}

_MEANING = {
    "keep_checkpoints": "at least 1 (a resume needs the newest checkpoint)",
    "data.num_threads": "0 (one per CPU) or a positive number of threads",
    "data.num_workers": "-1 (auto), 0 (threads in this process) or a number of worker processes",
}


def _has(c, field: str) -> bool:
  node = c
  for part in field.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def _inside(value: float, interval: str) -> bool:
  lo, hi = (float(x) for x in interval[1:-1].split(","))
  return ((lo < value if interval[0] == "(" else lo <= value)
          and (value < hi if interval[-1] == ")" else value <= hi))


def values(c) -> None:
  """Every rate, epoch count and count of `_RANGES` the config has: finite and in range."""
  for field, interval in _RANGES.items():
    if not _has(c, field):
      continue
    value = get(c, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      continue  # ml_collections keeps a field's type; another type is another field
    if not (math.isfinite(value) and _inside(value, interval)):
      allowed = _MEANING.get(field, f"a finite number in {interval}")
      raise ConfigError(f"config field {field}={value!r} is not allowed: it must be {allowed}.")
  if _has(c, "compilation_cache") and not str(c.compilation_cache):
    raise ConfigError("config field compilation_cache='' is not allowed; use auto, none or "
                      "a directory.")
  tracker(c)


def tracker(c) -> None:
  """log.* (adpe_jax/train/wandb_log.py): the mode, and the wandb package when enabled --
  refused at start, before anything is written, not at the first log step."""
  if not _has(c, "log.wandb") or not c.log.wandb:
    return
  choice(c, "log.wandb_mode", ("online", "offline", "disabled"))
  import importlib.util  # noqa: PLC0415
  try:
    found = importlib.util.find_spec("wandb") is not None
  except (ImportError, ValueError):  # a module entry None (blocked) or without a spec
    found = False
  if not found:
    raise ConfigError("config field log.wandb=True needs the wandb package, which is not "
                      "installed: pip install wandb (or pip install -e '.[wandb]').")


def num_classes(c, source_classes) -> None:
  """data.num_classes holds every class of data.source (`source_classes`: the source's
  count, None when it has none)."""
  if source_classes and source_classes > c.data.num_classes:
    raise ConfigError(f"config field data.num_classes={c.data.num_classes} is below the "
                      f"{source_classes} classes of data.source={c.data.source!r}.")


def evaluators(c, known) -> None:
  """eval.evaluators names only evaluators of this task (`known`: train/evaluate.py's
  names that the task supplies what they read)."""
  names = tuple(c.eval.get("evaluators", ())) if _has(c, "eval") else ()
  for name in names:
    if name not in known:
      raise ConfigError(f"config field eval.evaluators={names!r} names "
                        f"{name!r}, not an evaluator of this task; allowed: "
                        f"{', '.join(map(repr, known))}.")
