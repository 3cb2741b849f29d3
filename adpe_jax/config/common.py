"""Config blocks every task shares: devices (mesh), processes (distributed), the run's
cadence (logging, checkpoints, compilation cache) and the comma-separated config argument."""

from __future__ import annotations

import ml_collections

PE_TYPES = ("ape", "rpe")
RPE_LOOKUPS = ("integer", "continuous")
RPE_QUERIES = ("unscaled", "scaled")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("auto", "xla", "pallas")


def parse_arg(arg: str | None) -> set[str]:
  """`configs/x.py:a,b` -> {"a", "b"}."""
  return set(a for a in (arg or "").split(",") if a)


def mesh() -> ml_collections.ConfigDict:
  """Devices: a (data, fsdp) mesh; -1 = the rest of the devices.  fsdp > 1 shards the big
  kernels (and their optimizer state) over the fsdp axis; the batch is split over both."""
  m = ml_collections.ConfigDict()
  m.data = -1
  m.fsdp = 1
  m.fsdp_min_size = 2 ** 14   # tensors with fewer elements stay replicated
  return m


def distributed() -> ml_collections.ConfigDict:
  """Multi-process runs.  Empty / 0 / -1: auto-detected (SLURM, TPU pod slices, GKE) or
  taken from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""
  d = ml_collections.ConfigDict()
  d.coordinator_address = ""     # host:port of process 0
  d.num_processes = 0
  d.process_id = -1
  d.heartbeat_timeout_seconds = 100   # a dead peer stops the others after this
  d.initialization_timeout_seconds = 300
  return d


def labelled_data() -> ml_collections.ConfigDict:
  """The data block of the supervised tasks (fine-tune, linear probe): ImageNet by default."""
  d = ml_collections.ConfigDict()
  d.source = "tfds:imagenet2012"   # fashion_mnist | folder:<dir> | tfds:<name> | synthetic
  d.dir = ""
  d.train_split = "train"
  d.eval_split = "validation"
  d.num_classes = 1000
  d.num_examples = 0               # synthetic sources only
  d.num_threads = 0                # 0 = os.cpu_count()
  add_bad_image_fields(d)
  d.allow_changed = False          # resume on other data than the checkpoint's (a warning)
  return d


def add_bad_image_fields(d: ml_collections.ConfigDict) -> None:
  # A file that does not decode (adpe_jax/data/bad_images.py): "stop" names it; "skip" trains
  # on a deterministic substitute (the next example that decodes) and stops once more than
  # max_bad_fraction of the dataset's files are bad; skip_list: a `python -m
  # adpe_jax.tools.check --out=FILE` list whose files are substituted unread.
  d.bad_images = "stop"            # stop | skip
  d.max_bad_fraction = 0.001       # of the dataset; 0.001 of ImageNet-1k is 1281 files
  d.skip_list = ""


def top1_eval() -> ml_collections.ConfigDict:
  """The eval block of the supervised tasks: top-1 / top-5 on data.eval_split."""
  e = ml_collections.ConfigDict()
  e.every_steps = 0                # 0 = every epoch (the original)
  e.batch_size = 1024              # global
  e.max_examples = 0               # spread over the eval split; 0 = all of it
  e.crop_fraction = 0.875          # Resize(size / 0.875) -> CenterCrop(size)
  return e


def add_run_fields(c: ml_collections.ConfigDict, keep_checkpoints: int) -> None:
  """Cadence of the one training loop (adpe_jax/train/loop.py)."""
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = keep_checkpoints
  c.max_steps_per_run = 0     # > 0: stop (with a checkpoint) after this many steps; re-run resumes
  # Stop (keeping the last good checkpoint) at the first step whose loss exceeds this many
  # times the run's first loss; <= 0 disables.  Healthy runs stay below 1.0x (smoke runs,
  # 150 steps, with and without the adversary; MAE's normalised-pixel loss starts near
  # its maximum); blr=1e2 / 1e3 runs exceed 10x at their first bad step and reach 1e4-1e8x.
  c.divergence_factor = 10.0
  c.log = tracker()
  add_cache_field(c)


def tracker() -> ml_collections.ConfigDict:
  """Optional Weights & Biases logging of the logged records (process 0; the run id is kept
  in WORKDIR/wandb_run_id so a resumed run continues the same wandb run)."""
  t = ml_collections.ConfigDict()
  t.wandb = False
  t.wandb_project = "adpe_jax"
  t.wandb_entity = ""       # "" = wandb's default entity
  t.wandb_name = ""         # "" = the workdir's name
  t.wandb_mode = "online"   # online | offline (WORKDIR/wandb/, `wandb sync` later) | disabled
  return t


def add_cache_field(c: ml_collections.ConfigDict) -> None:
  c.compilation_cache = "auto"  # XLA's persistent cache: auto = $JAX_COMPILATION_CACHE_DIR
                                # or <workdir>/jax_cache; none = off; else a directory
