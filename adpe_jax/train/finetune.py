"""The fine-tuning task (spec 6): `finetune(config, workdir)`, `config.task = "finetune"`.

Phases as in `pretrain.train_and_evaluate`: (1) config and mesh, (2) input, (3) model,
optimizer (`optimizer.finetune_optimizer`), initial weights (`config.init`) and the
compiled step, (4) resume, (5) the one loop (`loop.train`) with top-1 / top-5
(`evaluate.ClassifierEvaluator`) every epoch (or every `eval.every_steps`), (6)
summary.json with the best and the last evaluation.

The original's recipe (spec 6): AdamW (0.9, 0.999) with layer-wise lr decay
(`param_groups_lrd`: cls_token, pos_embed, patch_embed -> layer 0, blocks_k -> k + 1, the
rest -> depth + 1; scale layer_decay ** (depth + 1 - layer)); no weight decay for 1-D
tensors, pos_embed and cls_token; warmup + cosine to min_lr with the rate set at the first
micro-step of each optimizer step (`it % accum_iter == 0`); Mixup / CutMix with label
smoothing inside and a soft-target cross-entropy.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from adpe_jax import checkpoint as ckpt_lib
from adpe_jax import data, parallel, storage
from adpe_jax.config import finetune as finetune_config
from adpe_jax.config import validate as check
from adpe_jax.data.finetune import FinetunePipeline, mixup_params
from adpe_jax.errors import ConfigError, InitError
from adpe_jax.models import layout, posembed
from adpe_jax.models.classifier import ViTClassifier
from adpe_jax.train import evaluate, loop
from adpe_jax.train import optimizer as optim
from adpe_jax.train.mixup import mix_batch, soft_cross_entropy
from adpe_jax.train.state import build_classifier, init_classifier_params
from adpe_jax.train.step import split_micro


@flax.struct.dataclass
class FinetuneState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def make_train_step(model, tx, accum_steps: int, lr_fn, num_classes: int, smoothing: float):
  """train_step(state, batch, mix, rng): batch {"images", "labels"}; mix: per micro-batch
  {"lam" (A,), "cutmix" (A,), "box" (A, 4)}."""

  def loss_fn(params, images, targets, key):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
    return soft_cross_entropy(logits, targets).mean()

  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(state, batch, mix, rng):
    key = jax.random.fold_in(rng, state.step)
    micro = split_micro({"images": batch["images"], "labels": batch["labels"]}, accum_steps)

    def body(carry, inp):
      i, mb, lam, cutmix, box = inp
      images, targets = mix_batch(mb["images"], mb["labels"], lam, cutmix, box, num_classes,
                                  smoothing)
      loss, grads = grad_fn(state.params, images, targets, jax.random.fold_in(key, i))
      return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (loss, grads), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros),
        (jnp.arange(accum_steps), micro, mix["lam"], mix["cutmix"], mix["box"]))
    loss = loss / accum_steps
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state.step),
               "finite": (jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.float32)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


# -- initial weights (config.init) ------------------------------------------------------------

def _torch_state_dict(path: str) -> dict:
  try:
    import torch  # noqa: PLC0415
  except ImportError as e:
    raise InitError(f"config field init={path!r} is a PyTorch checkpoint, and reading it needs "
                    f"torch (CPU is enough: pip install torch), which is not installed.") from e
  try:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
  except Exception as e:  # noqa: BLE001
    raise InitError(f"config field init={path!r} could not be read by torch.load ({e}).") from e
  sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
  if not isinstance(sd, dict):
    raise InitError(f"config field init={path!r} holds no state dict ('model' entry).")
  return {k: v.detach().cpu().numpy() for k, v in sd.items() if hasattr(v, "detach")}


def _encoder_from_torch(sd: dict) -> tuple[dict, np.ndarray | None]:
  """The original's (pretraining or fine-tune) state dict -> our encoder params + pos_embed."""
  from adpe_jax import convert  # noqa: PLC0415
  flat = {}
  for name, value in sd.items():
    top = name.split(".")[0]
    if top.startswith("decoder") or top in ("mask_token", "pos_embed", "head", "fc_norm") or (
        name.endswith("no_shift") or "adv" in name.split(".")[-1]):
      continue
    path, arr = convert.convert_tensor(name, value, convert._is_layernorm(name))  # noqa: SLF001
    flat[path] = arr
  pos = sd.get("pos_embed")
  return traverse_util.unflatten_dict(flat), (None if pos is None else np.asarray(pos))


def load_init(config, model: ViTClassifier, fresh: dict) -> tuple[dict, dict]:
  """`fresh` (initialised params) with the encoder of `config.init` loaded into it.

  Returns (params, info for summary.json).  pos_embed = the source's position table
  (pretraining: the fixed sin-cos of its grid) resized with torch's bicubic to the
  fine-tune grid; head / fc_norm stay fresh (head trunc-normal 2e-5).
  """
  path = config.init
  d = model.embed_dim
  info: dict[str, Any] = {"init": path}
  if path.endswith((".pth", ".pt", ".bin")):
    if not storage.resolve(path).exists():
      raise InitError(f"config field init={path!r} does not exist.")
    encoder, pos = _encoder_from_torch(_torch_state_dict(path))
    if model.global_pool:
      encoder.pop("norm", None)  # the original deletes the encoder's final norm
    if pos is None:
      raise InitError(f"config field init={path!r} has no pos_embed entry.")
    pos = pos.reshape(-1, pos.shape[-1])
    source_pe = "rpe" if any("rpe_k" in "/".join(k) for k in
                             traverse_util.flatten_dict(encoder)) else "ape"
  else:
    try:
      params, run, step_dir = ckpt_lib.restore_params(path)
    except ckpt_lib.CheckpointError as e:
      raise InitError(f"config field init={path!r} cannot be used: {e}") from e
    # A scanned pretraining model's blocks/... (leading depth axis) -> blocks_i: the
    # classifier stays unrolled (per-layer drop path, layer-wise lr decay by name).
    params = layout.to_unrolled(dict(params))
    info["init_checkpoint"] = step_dir
    if run.get("model", {}).get("patch_size") not in (None, config.model.patch_size):
      raise InitError(
          f"config field init={path!r} was pretrained with patch size "
          f"{run['model']['patch_size']}, but model.patch_size={config.model.patch_size}.")
    encoder = {k: v for k, v in params.items() if k in ("patch_embed", "cls_token")
               or k.startswith("blocks_")}
    if not model.global_pool and "norm" in params:
      encoder["norm"] = params["norm"]
    grid = run.get("image_size", 0) // max(run.get("model", {}).get("patch_size", 1), 1)
    if grid < 1:
      raise InitError(f"config field init={path!r}: its run metadata gives no image size.")
    pos = posembed.sincos_table(grid, d)
    source_pe = run.get("model", {}).get("pe", "ape")
    info["init_adversary"] = run.get("adversary", {}).get("kind")
  if source_pe == "ape" and model.pe == "rpe":
    raise InitError(f"config field init={path!r} is an APE encoder (no iRPE tables), so it "
                    f"cannot initialise model.pe={config.model.pe!r}; use model.pe='ape'.")
  if source_pe == "rpe" and model.pe == "ape":
    logging.warning("init %s has iRPE tables; model.pe=ape drops them (as the original's "
                    "strict=False load)", path)
    encoder = traverse_util.unflatten_dict(
        {k: v for k, v in traverse_util.flatten_dict(encoder).items() if "rpe_k" not in k})
  want = traverse_util.flatten_dict(fresh)
  got = traverse_util.flatten_dict(encoder)
  missing = sorted("/".join(k) for k in want if k not in got
                   and k[0] not in ("head", "fc_norm", "pos_embed", "norm"))
  bad = [f"{'/'.join(k)} {tuple(np.shape(v))} vs {tuple(want[k].shape)}"
         for k, v in got.items() if k in want and tuple(np.shape(v)) != tuple(want[k].shape)]
  extra = sorted("/".join(k) for k in got if k not in want)
  if missing or bad or extra:
    what = (f"lacks {missing[0]}" if missing else f"has {bad[0]}" if bad
            else f"has {extra[0]}, which the model does not")
    raise InitError(f"config field init={path!r} does not fit model.variant="
                    f"{config.model.variant!r} / model.pe={config.model.pe!r}: it {what}.")
  if pos.shape[-1] != d or int(round(np.sqrt(pos.shape[0] - 1))) ** 2 + 1 != pos.shape[0]:
    raise InitError(f"config field init={path!r} has a position table of shape {pos.shape}, "
                    f"not (1 + grid**2, {d}).")
  info["init_pos_grid"] = int(round(np.sqrt(pos.shape[0] - 1)))
  merged = dict(want)
  merged.update({k: jnp.asarray(v, want[k].dtype) for k, v in got.items()})
  merged[("pos_embed",)] = jnp.asarray(posembed.resize_table(pos, model.grid)[None],
                                       want[("pos_embed",)].dtype)
  return traverse_util.unflatten_dict(merged), info


# -- the task ---------------------------------------------------------------------------------

def run_metadata(config) -> dict:
  m = config.model
  return {"task": "finetune",
          "model": {"variant": m.variant, "patch_size": m.patch_size, "pe": m.pe,
                    "rpe_lookup": m.rpe_lookup if m.pe == "rpe" else None,
                    "global_pool": m.global_pool},
          "image_size": config.image_size, "num_classes": config.data.num_classes}


def finetune(config, workdir: str) -> dict:
  # 1. Config and mesh.
  mesh, workdir = loop.start_run(config, workdir, finetune_config.validate)

  # 2. Input.
  source = data.from_config(config, config.data.train_split)
  if getattr(source, "num_classes", None) and source.num_classes > config.data.num_classes:
    raise ConfigError(f"config field data.num_classes={config.data.num_classes} is below the "
                      f"{source.num_classes} classes of data.source={config.data.source!r}.")
  total_steps, steps_per_epoch = loop.steps_from_epochs(config, len(source))
  pipeline = FinetunePipeline(
      source, config.batch_size, config.image_size, seed=config.seed,
      randaug=config.aug.randaug, reprob=config.aug.reprob,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data.num_threads or None)

  # 3. Model, optimizer, initial weights, compiled steps.
  model = build_classifier(config)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  params_shape = jax.eval_shape(lambda: init_classifier_params(model, init_key))
  tx, lr_fn = optim.finetune_optimizer(config, params_shape, model.depth, total_steps,
                                       steps_per_epoch)
  create = lambda p: FinetuneState(jnp.zeros((), jnp.int32), p, tx.init(p))  # noqa: E731
  state_sharding = parallel.state_shardings(mesh, jax.eval_shape(create, params_shape),
                                            config.mesh.fsdp_min_size)
  repl = parallel.replicated(mesh)
  info: dict[str, Any] = {"init": config.init or "random"}
  ckpt = ckpt_lib.Checkpointer(workdir, config.checkpoint_every_steps,
                               config.keep_checkpoints, metadata=run_metadata(config),
                               upgrade=check.upgrade_run_metadata)
  resuming = ckpt.latest_step() is not None
  params = jax.jit(lambda k: init_classifier_params(model, k))(init_key)
  if config.init and not resuming:
    params, info = load_init(config, model, params)
  # Host copies: the state is then created straight into its (possibly sharded) layout.
  state = jax.jit(create, out_shardings=state_sharding)(jax.device_get(params))
  del params
  train_step = jax.jit(
      make_train_step(model, tx, config.accum_steps, lr_fn, config.data.num_classes,
                      config.aug.smoothing),
      in_shardings=(state_sharding, parallel.batch_sharding(mesh), repl, repl),
      out_shardings=(state_sharding, repl), donate_argnums=(0,))
  evaluator = evaluate.ClassifierEvaluator(
      model, data.from_config(config, config.data.eval_split), mesh,
      image_size=config.image_size, batch_size=config.eval.batch_size,
      max_examples=config.eval.max_examples, crop_fraction=config.eval.crop_fraction,
      every_steps=config.eval.every_steps or int(steps_per_epoch))

  # 4. Resume (where the weights came from is kept from the first run's summary).
  restored = ckpt.restore(ckpt_lib.abstract_of(state))
  if restored is not None:
    state = restored
    info.update({k: v for k, v in loop.read_summary(workdir).items() if k.startswith("init")})
  start_step = int(state.step)
  kept = loop.already_finished(workdir, start_step, total_steps)
  if kept is not None:
    ckpt.close()
    pipeline.close()
    return {"state": state, "summary": kept, "evals": []}
  logging.info("fine-tuning %d steps (%d per epoch) from step %d, init %s",
               total_steps, steps_per_epoch, start_step, config.init or "random")

  # 5. The loop.
  def step_fn(state, step, host):
    batch = parallel.global_batch({"images": host["images"], "labels": host["labels"]}, mesh)
    mix = mixup_params(config.seed, step, config.accum_steps, config.image_size,
                       config.aug.mixup, config.aug.cutmix, config.aug.mixup_prob,
                       config.aug.mixup_switch_prob)
    return train_step(state, batch, mix, step_key)

  result = loop.train(config, workdir=workdir, ckpt=ckpt, state=state, step_fn=step_fn,
                      batches=pipeline, total_steps=total_steps,
                      steps_per_epoch=steps_per_epoch, evaluators=[evaluator],
                      num_devices=mesh.size)
  ckpt.close()

  # 6. Summary.
  summary: dict[str, Any] = {"status": result.status, "steps": result.end_step,
                             "total_steps": total_steps,
                             "train_seconds": result.train_seconds, **info}
  summary.update(loop.best_and_last(result.evals))
  loop.write_summary(workdir, summary)
  return {"state": result.state, "summary": summary, "evals": result.evals}
