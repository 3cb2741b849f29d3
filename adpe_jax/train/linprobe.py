"""The linear-probe task, MAE's `main_linprobe.py`: `linprobe(config, workdir)`, task
"linprobe".

The frozen encoder (`evaluate.load_encoder`: config.init through the fine-tune code's
loader, read out by model.pool, "cls" by default as MAE) feeds a probe
BatchNorm(affine=False, eps 1e-6) -> Dense (kernel trunc-normal 0.01, bias 0), trained with
MAE's LARS or SGD (momentum 0.9), lr = blr * batch / 256 with warmup + cosine set per
iteration, plain cross-entropy; RandomResizedCrop + flip for training (`FinetunePipeline`
with RandAugment and RandomErasing off), Resize -> CenterCrop for evaluation; top-1 / top-5
every epoch, best and last in summary.json; resume and preemption through the same
`Checkpointer` / `AgreedStop` as pretraining and fine-tuning.

Features are computed on the fly inside the train step (encoder forward under
`stop_gradient`, the gradient taken w.r.t. the probe only, so no encoder backward runs):
every epoch sees new random crops, so precomputing once per epoch costs the same forward
passes plus memory and an extra pass structure, and on-the-fly keeps a step a pure
function of (step, checkpoint) for exact resumption.  The eval transform is deterministic,
so the eval-set features ARE computed once per run (`evaluate.labelled_features`) and each
evaluation only applies the probe.

Differences from MAE, all negligible at its batch: BatchNorm statistics are over the
global batch (MAE's BatchNorm1d is per GPU, 512 examples); flax keeps the biased batch
variance in the running average (torch the unbiased one); flax's truncated normal cuts at
2 std (timm's trunc_normal_ at +-2 absolute, i.e. not at all for std 0.01).
"""

from __future__ import annotations

import time

import flax
import jax
import jax.numpy as jnp
import optax

from adpe_jax import data, parallel
from adpe_jax.config import probe as probe_config
from adpe_jax.config import validate as check
from adpe_jax.data import bad_images
from adpe_jax.data.finetune import FinetunePipeline
from adpe_jax.models.probe import LinearProbe
from adpe_jax.train import evaluate, loop, run
from adpe_jax.train import optimizer as optim
from adpe_jax.train.metrics import bad_image_metrics

@flax.struct.dataclass
class ProbeState:
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: optax.OptState


def make_optimizer(config, total_steps: int, steps_per_epoch: float):
  lr = optim.warmup_cosine(optim.scaled_lr(config.blr, config.batch_size), config.min_lr,
                           config.warmup_epochs * steps_per_epoch, total_steps, 1)
  if config.optimizer == "lars":
    return optim.lars(lr, config.weight_decay, config.momentum), lr
  # torch SGD(momentum, weight_decay): g + wd p, mu = m mu + g, p -= lr mu.
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.trace(decay=config.momentum),
                     optax.scale_by_learning_rate(lr)), lr


def probe_loss(probe, encoder_fn, params, batch_stats, encoder_params, images, labels):
  """(mean cross-entropy, (new batch_stats, logits)); the encoder sees stop_gradient."""
  feats = jax.lax.stop_gradient(encoder_fn(encoder_params, images).astype(jnp.float32))
  logits, updates = probe.apply({"params": params, "batch_stats": batch_stats}, feats,
                                train=True, mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, (updates["batch_stats"], logits)


def make_train_step(probe, encoder_fn, tx, lr_fn):
  """train_step(state, encoder_params, images, labels) -> (state, metrics); the encoder's
  params are an input only (never donated, never returned)."""
  grad_fn = jax.value_and_grad(probe_loss, argnums=2, has_aux=True)

  def train_step(state, encoder_params, images, labels):
    (loss, (stats, _)), grads = grad_fn(probe, encoder_fn, state.params, state.batch_stats,
                                        encoder_params, images, labels)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state.step),
               "finite": (jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.float32)}
    return ProbeState(state.step + 1, params, stats, opt_state), metrics

  return train_step


def probe_logits(probe):
  """(state, feats) -> logits of the probe in eval mode (running BatchNorm statistics)."""
  def apply(state, feats):
    return probe.apply({"params": state.params, "batch_stats": state.batch_stats}, feats,
                       train=False)
  return apply


def run_metadata(config, resolved) -> dict:
  return {"task": "linprobe", "init": config.init,
          "model": {"variant": resolved.model.variant, "patch_size": resolved.model.patch_size,
                    "pe": resolved.model.pe,
                    "rpe_lookup": resolved.model.rpe_lookup if resolved.model.pe == "rpe" else None,
                    "pool": resolved.model.pool},
          "image_size": resolved.image_size, "num_classes": config.data.num_classes,
          "optimizer": config.optimizer}


def build(config, mesh, workdir, resuming: bool, source) -> run.Built:
  del workdir, resuming  # a resumed run restores over the initial probe
  # 1. The frozen encoder (config.init), the eval-set features (once), the train input.
  t0 = time.time()
  encoder, info, resolved = evaluate.load_encoder(config)
  repl = parallel.replicated(mesh)
  encoder_params = jax.device_put(encoder.params, repl)
  check.num_classes(config, getattr(source, "num_classes", None))
  total_steps, steps_per_epoch = loop.steps_from_epochs(config, len(source))
  eval_feats, eval_labels = evaluate.labelled_features(
      evaluate.FrozenEncoder(encoder.fn, encoder_params),
      data.eval_source(config, config.data.eval_split), resolved.image_size,
      max_examples=config.eval.max_examples, crop_fraction=config.eval.crop_fraction,
      batch_size=config.eval.batch_size, mesh=mesh)
  feature_seconds = time.time() - t0
  pipeline = FinetunePipeline(
      source, config.batch_size, resolved.image_size, seed=config.seed, randaug="", reprob=0.0,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data.num_threads or None,
      bad_images=bad_images.Policy.from_config(config.data, source))

  # 2. Probe, optimizer, compiled step.
  probe = LinearProbe(config.data.num_classes)
  dim = eval_feats.shape[1]
  variables = jax.jit(lambda k: probe.init(k, jnp.zeros((2, dim)), train=False))(
      jax.random.key(config.seed + 1))
  tx, lr_fn = make_optimizer(config, total_steps, steps_per_epoch)
  state = jax.device_put(ProbeState(jnp.zeros((), jnp.int32), variables["params"],
                                    variables["batch_stats"],
                                    tx.init(variables["params"])), repl)
  batch_sharding = parallel.batch_sharding(mesh)
  train_step = jax.jit(make_train_step(probe, encoder.fn, tx, lr_fn),
                       in_shardings=(repl, repl, batch_sharding, batch_sharding),
                       out_shardings=(repl, repl), donate_argnums=(0,))

  # 3. The step; the evaluator reads the probe and the eval-set features.
  def step_fn(state, step, host):
    del step
    batch = parallel.global_batch({"images": host["images"], "labels": host["labels"]}, mesh)
    return train_step(state, encoder_params, batch["images"], batch["labels"])

  return run.Built(
      state=state, step_fn=step_fn, batches=pipeline, total_steps=total_steps,
      steps_per_epoch=steps_per_epoch,
      context=dict(probe_logits=probe_logits(probe), eval_feats=eval_feats,
                   eval_labels=eval_labels),
      summary=lambda result: dict(feature_seconds=feature_seconds, **info),
      log_extras=lambda state, done: bad_image_metrics(pipeline),
      outputs={"encoder": encoder, "encoder_params": encoder_params},
      note=f"init {config.init or 'random'}, pool {resolved.model.pool}")


def training_source(config):
  """The data the task trains on (`run.Task.source`: the skeleton opens it once, compares
  its identity with the checkpoint's and hands it to `build`)."""
  return data.from_config(config, config.data.train_split)


TASK = run.Task(
    "linprobe", probe_config.validate_linprobe, build=build, source=training_source,
    run_metadata=lambda c: run_metadata(c, evaluate.resolve_encoder_fields(c)),
    upgrade=check.upgrade_run_metadata, evaluators=("probe",))


def linprobe(config, workdir: str) -> dict:
  """Trains a linear probe on config.init's frozen encoder in `workdir` (the same command
  resumes): {"state", "summary", "history", "evals", "encoder", "encoder_params"}."""
  return run.run_task(TASK, config, workdir)
