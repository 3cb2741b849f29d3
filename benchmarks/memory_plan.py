"""Per-device memory plan of the compiled train step for ViT-B/L/H, and what fits where.

For each variant x mesh.fsdp x model.remat it prints the bytes PER DEVICE of

  params     the model's float32 parameters           } exact: jax.eval_shape of the train
  opt        AdamW mu + nu (+ count)                   } state and the FSDP rule of
  adv        the adversary and its ascent state        } parallel.state_shardings (a leaf
                                                         sharded over fsdp costs 1/fsdp)
  batch      this device's shard of the global batch (all crops, float32 images + ids)
  resid      activations the backward pass keeps for ONE micro-step (JAX's saved
             residuals of the loss, `jax.ad_checkpoint`), backend-independent; honours
             remat; not counting the params themselves
  temp       everything else XLA allocates while the step runs -- activations, the
             gradient accumulator, gathered FSDP weights, workspace: the `temp` of
             `compiled.memory_analysis()` of the step compiled for a mesh of fake CPU
             devices (see "How temp is obtained")
  total      params + opt + adv + batch + temp + (output - alias)
  floor      params + opt + adv + batch + f32 gradient accumulator + resid

then a table of which configurations fit one device of each accelerator (below).

How temp is obtained (all printed in the output):
  * The step is lowered and compiled exactly as `pretrain.build_training` builds it (same
    optimizers, `make_train_step`, in/out shardings, donation) but on ShapeDtypeStructs
    that carry the shardings: no parameter is ever allocated, so ViT-H plans on a laptop.
  * Depth extrapolation (--depth-scale A,B, default 2,4): the step is compiled with the
    encoder cut to A and to B blocks (decoder unchanged) and temp is extrapolated
    linearly per encoder block to the full depth (blocks are unrolled, so temp grows
    linearly).  The default run checks this once against a full compile of ViT-B and
    prints the error.  --depth-scale full compiles every variant at full depth.
  * remat=block: XLA:CPU does not keep jax.checkpoint's savings (its temp for
    remat=block is no smaller than for none; the default run measures this on full
    ViT-B), while TPU/GPU do.  So block rows use temp(none) - (resid(none) -
    resid(block)): the compiled CPU temp minus the activations remat stops saving.
  * The CPU backend is a proxy: it fuses differently and computes bfloat16 dots and
    elementwise ops in float32 (so bf16 activations count up to twice), so temp is an
    upper-leaning estimate for TPU/GPU.  XLA:CPU's peak_memory_in_bytes is not used
    (there it reports about the argument bytes only).

Accelerators (memory of ONE JAX device; public docs):
  TPU v4 chip: 32 GiB HBM2, 2 TensorCores run as ONE JAX device (megacore)
    (cloud.google.com/tpu/docs/v4).  The issue's "16 GB TPU v4 core" is half a chip;
    both columns are shown.
  TPU v5p chip: 95 GB HBM2e, 2 TensorCores as ONE JAX device
    (cloud.google.com/tpu/docs/v5p).  The issue's "32 GB TPU v5p core" matches no v5p
    figure (95 GB per chip, 47.5 GB per TensorCore); 95 GB is used.
  NVIDIA H100 (SXM5 / PCIe): 80 GB HBM3 / HBM2e.  JAX preallocates 75% of a GPU by
    default: set XLA_PYTHON_CLIENT_MEM_FRACTION=.95 to use it.
  Decimal GB are taken as 1e9 bytes, GiB as 2**30.  "ok": total <= 90% of the device;
  "tight": <= 100%; "maybe": only the floor (params + opt + adv + batch + the float32
  gradient accumulator + resid, no workspace) is <= 90%; "no": neither.

Default run (about 5 minutes on a 2-core CPU): ViT-B/16, ViT-L/16, ViT-H/14 (the
configs/vit*_rpe_coord.py seed recipes: RPE + coordinate adversary, 112 px, 4 crops),
global batch 4096 images (16384 crops), accum_steps 4, 32 devices -- 32 images = 128
crops per device per micro-step (e.g. 4 nodes x 8 H100, a v5p-64 or a v4-64 slice;
the seed's 8 x V100 ran 4x that per GPU: --devices 8) -- fsdp 1 and 8, remat none and
block, bfloat16 compute.

  python benchmarks/memory_plan.py                       # the default plan (~5 min)
  python benchmarks/memory_plan.py --quick               # depths 1,2, no validation (~3 min)
  python benchmarks/memory_plan.py --variants huge --fsdp 16 --devices 64 --batch 4096
  python benchmarks/memory_plan.py --dtype float32 --remat none --accum 8
  # on a real accelerator (no fake devices; remat=block compiled, not corrected), e.g.
  # one H100 at the default per-device micro-batch (128 crops):
  python benchmarks/memory_plan.py --backend native --devices 1 --batch 128 --fsdp 1 \
      --variants base --no-validate
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import time

VARIANTS = ("base", "large", "huge")
PATCH = {"base": 16, "large": 16, "huge": 14}     # configs/vit{b,l,h}_rpe_coord.py
SHORT = {"base": "ViT-B/16", "large": "ViT-L/16", "huge": "ViT-H/14"}
GiB = 2 ** 30
# (column, bytes of one JAX device, short source)
DEVICES = [("v4core16GiB", 16 * GiB, "issue: 'TPU v4 core' (half of a 32 GiB v4 chip)"),
           ("v4chip32GiB", 32 * GiB, "cloud.google.com/tpu/docs/v4: 32 GiB HBM2 per chip"),
           ("v5p95GB", 95e9, "cloud.google.com/tpu/docs/v5p: 95 GB HBM2e per chip"),
           ("H100-80GB", 80e9, "NVIDIA H100 SXM5/PCIe: 80 GB")]
FIT_MARGIN = 0.9


def VARIANT_DEPTH(variant: str) -> int:  # noqa: N802
  from adpe_jax.models.variants import VARIANTS as TABLE
  return TABLE[variant][1]


class PlanError(Exception):
  """A bad flag or setting: reported as one line."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, not the usage block
    raise PlanError(message)


def _int_list(text: str) -> list[int]:
  try:
    out = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
  if not out or any(v < 1 for v in out):
    raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 1,8")
  return out


def _choice_list(allowed):
  def parse(text: str) -> list[str]:
    out = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in out if v not in allowed]
    if not out or bad:
      raise argparse.ArgumentTypeError(
          f"{text!r}: allowed values are {', '.join(allowed)} (comma-separated)")
    return out
  return parse


def _depth_scale(text: str):
  if text == "full":
    return None
  vals = _int_list(text)
  if len(vals) != 2 or vals[0] >= vals[1]:
    raise argparse.ArgumentTypeError(f"{text!r}: give two depths A<B, e.g. 2,4, or 'full'")
  return tuple(vals)


def parse_args(argv=None) -> argparse.Namespace:
  p = _Parser(prog="memory_plan.py", description=__doc__.split("\n")[0])
  p.add_argument("--variants", type=_choice_list(VARIANTS), default=list(VARIANTS))
  p.add_argument("--batch", type=int, default=4096, help="global images per optimizer step")
  p.add_argument("--accum", type=int, default=4, help="accum_steps (micro-batches per step)")
  p.add_argument("--devices", type=int, default=32, help="fake CPU devices = the mesh size")
  p.add_argument("--backend", choices=("cpu", "native"), default="cpu",
                 help="cpu: fake CPU devices (default); native: the machine's own devices "
                      "(GPU/TPU), whose count must equal --devices")
  p.add_argument("--fsdp", type=_int_list, default=[1, 8], help="mesh.fsdp values, e.g. 1,8")
  p.add_argument("--remat", type=_choice_list(("none", "block")), default=["none", "block"])
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  p.add_argument("--pe", choices=("ape", "rpe"), default="rpe")
  p.add_argument("--adversary", choices=("none", "embedding", "coordinate"),
                 default="coordinate")
  p.add_argument("--depth-scale", type=_depth_scale, default=(2, 4), dest="depth_scale",
                 help="compile the encoder at depths A,B and extrapolate; 'full' = no")
  p.add_argument("--no-validate", action="store_true",
                 help="skip the full ViT-B compile that checks the extrapolation")
  p.add_argument("--quick", action="store_true",
                 help="depths 1,2 and no validation compile (about 3 minutes)")
  args = p.parse_args(argv)
  if args.devices < 1 or args.devices > 4096:
    raise PlanError(f"--devices={args.devices} must be between 1 and 4096")
  if args.batch < 1 or args.accum < 1:
    raise PlanError("--batch and --accum must be positive integers")
  for f in args.fsdp:
    if args.devices % f:
      raise PlanError(f"--fsdp={f} does not divide --devices={args.devices}")
  if args.quick:
    args.no_validate = True
    if args.depth_scale is not None:
      args.depth_scale = (1, 2)
  return args


def main(argv=None) -> int:
  try:
    args = parse_args(argv)
  except PlanError as e:
    print(f"memory_plan.py: error: {e}", file=sys.stderr)
    return 2
  # Fake CPU devices: must be set before jax is imported.
  if args.backend == "cpu" and "jax" in sys.modules:
    import jax
    if jax.device_count() != args.devices or jax.default_backend() != "cpu":
      print(f"memory_plan.py: error: jax is already initialised with {jax.device_count()} "
            f"{jax.default_backend()} devices; run this script in its own process",
            file=sys.stderr)
      return 2
  if args.backend == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    return Planner(args).run()
  except PlanError as e:
    print(f"memory_plan.py: error: {e}", file=sys.stderr)
    return 2


class Planner:
  def __init__(self, args):
    import jax
    import numpy as np
    from adpe_jax import parallel
    from adpe_jax.config import pretrain as pretrain_config
    self.jax, self.np, self.defaults, self.parallel = jax, np, pretrain_config, parallel
    self.args = args
    self.t0 = time.time()
    if jax.device_count() != args.devices:
      raise PlanError(f"--devices={args.devices} but the {jax.default_backend()} backend has "
                      f"{jax.device_count()} devices (XLA_FLAGS="
                      f"{os.environ.get('XLA_FLAGS', '')!r})")
    self.backend = jax.default_backend()
    self.cpu = self.backend == "cpu"
    self.device_kind = jax.devices()[0].device_kind

  # -- config, abstract state, compiled step ------------------------------------------
  def config(self, variant, fsdp, remat, batch=None, devices=None):
    d = self.defaults
    a = self.args
    c = d.seed_config(a.pe, a.adversary, None, variant=variant, patch_size=PATCH.get(variant, 16))
    c.batch_size = batch or a.batch
    c.accum_steps = a.accum
    c.model.dtype = a.dtype
    c.model.remat = remat
    c.mesh.fsdp = fsdp
    c.mesh.data = -1
    try:
      d.validate(c, num_devices=devices or a.devices)
      self.parallel.mesh_shape(devices or a.devices, -1, fsdp)
    except d.ConfigError as e:
      raise PlanError(str(e)) from None
    return c

  def mesh(self, config):
    return self.parallel.make_mesh(self.jax.devices(), config.mesh.data, config.mesh.fsdp)

  def abstract(self, config, mesh, depth=None):
    """(model, abstract sharded state, shardings, jitted step) -- as build_training."""
    jax = self.jax
    from adpe_jax.train import optimizer as optim
    from adpe_jax.train.state import build_model, create_train_state
    from adpe_jax.train.step import make_train_step
    model = build_model(config)
    if depth is not None and depth != model.depth:
      model = model.clone(depth=depth)
    total_steps, steps_per_epoch = 1000, 100.0   # only the lr schedule depends on them
    tx, adv_tx = optim.make_optimizers(config, total_steps, steps_per_epoch)
    lr_fn, adv_lr_fn = optim.schedules(config, total_steps, steps_per_epoch)
    create = lambda k: create_train_state(model, tx, adv_tx, k)  # noqa: E731
    shapes = jax.eval_shape(create, jax.random.key(config.seed))
    shardings = self.parallel.state_shardings(mesh, shapes, config.mesh.fsdp_min_size)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         shapes, shardings)
    repl = self.parallel.replicated(mesh)
    step = jax.jit(
        make_train_step(model, tx, adv_tx, config.accum_steps, lr_fn, adv_lr_fn,
                        inner_steps=config.adversary.inner_steps,
                        adv_norm=config.adversary.norm, adv_eps=config.adversary.eps,
                        inner_step_size=config.adversary.inner_step_size),
        in_shardings=(shardings, self.parallel.batch_sharding(mesh), repl),
        out_shardings=(shardings, repl),
        donate_argnums=(0,))
    return model, state, shardings, step

  def batch_spec(self, config, mesh):
    from adpe_jax.train import pretrain
    return pretrain._batch_spec(config, self.parallel.batch_sharding(mesh))

  def key_spec(self, mesh):
    jax = self.jax
    k = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=self.parallel.replicated(mesh))

  def compile_stats(self, config, mesh, depth=None) -> dict:
    _, state, _, step = self.abstract(config, mesh, depth)
    t = time.time()
    with contextlib.redirect_stderr(io.StringIO()):   # XLA:CPU's donation warnings
      compiled = step.lower(state, self.batch_spec(config, mesh), self.key_spec(mesh)).compile()
    m = compiled.memory_analysis()
    if m is None:
      raise PlanError("compiled.memory_analysis() returned None on this jax/backend")
    return dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
                seconds=time.time() - t)

  # -- exact bytes ---------------------------------------------------------------------
  def local_bytes(self, tree, shardings) -> int:
    jax, np = self.jax, self.np
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
      shape = tuple(x.shape)
      total += math.prod(s.shard_shape(shape) if shape else ()) * np.dtype(x.dtype).itemsize
    return total

  def state_bytes(self, state, shardings) -> dict:
    return {"params": self.local_bytes(state.params, shardings.params),
            "opt": self.local_bytes(state.opt_state, shardings.opt_state),
            "adv": (self.local_bytes(state.adversary, shardings.adversary)
                    + self.local_bytes(state.adv_opt_state, shardings.adv_opt_state)
                    + self.local_bytes(state.step, shardings.step))}

  def batch_bytes(self, config, mesh) -> int:
    np = self.np
    spec = self.batch_spec(config, mesh)
    return sum(math.prod(v.sharding.shard_shape(v.shape)) * np.dtype(v.dtype).itemsize
               for v in spec.values())

  def residual_bytes(self, config, model) -> int:
    """Activations kept for the backward pass of one micro-step on one device."""
    jax, np = self.jax, self.np
    import jax.numpy as jnp
    try:
      from jax._src.ad_checkpoint import saved_residuals
    except ImportError as e:  # pragma: no cover
      raise PlanError(f"this jax has no saved_residuals ({e})") from None
    from adpe_jax.train.state import init_variables
    from adpe_jax.train.step import make_loss_fn
    n = config.num_crops * config.batch_size // config.accum_steps // self.args.devices
    v = jax.eval_shape(lambda k: init_variables(model, k), jax.random.key(0))
    batch = {"images": jax.ShapeDtypeStruct((n, config.image_size, config.image_size, 3),
                                            jnp.float32),
             "noise": jax.ShapeDtypeStruct((n, model.num_patches), jnp.float32)}
    key = jax.eval_shape(lambda: jax.random.key(0))
    total = 0
    for aval, why in saved_residuals(make_loss_fn(model), v["params"], v["adversary"],
                                     batch, key):
      if "argument" in why:   # params / adversary themselves: already counted
        continue
      dtype = getattr(aval, "dtype", None)
      if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        continue
      total += math.prod(aval.shape) * np.dtype(dtype).itemsize
    return total

  # -- the plan ------------------------------------------------------------------------
  def say(self, line=""):
    print(line, flush=True)

  def temp_for(self, variant, fsdp, remat_compile="none") -> dict:
    """temp (and output-alias) at full depth, by extrapolation or a full compile."""
    c = self.config(variant, fsdp, remat_compile)
    mesh = self.mesh(c)
    full = VARIANT_DEPTH(variant)
    ds = self.args.depth_scale
    if ds is None or ds[1] >= full:
      s = self.compile_stats(c, mesh)
      self.say(f"  compiled {SHORT[variant]} fsdp={fsdp} remat={remat_compile} at full depth "
               f"{full}: temp {s['temp'] / GiB:.2f} GiB ({s['seconds']:.0f} s)")
      return dict(temp=s["temp"], extra=s["output"] - s["alias"], how=f"full {full}")
    a, b = ds
    sa, sb = self.compile_stats(c, mesh, a), self.compile_stats(c, mesh, b)
    per_block = (sb["temp"] - sa["temp"]) / (b - a)
    temp = sa["temp"] + per_block * (full - a)
    self.say(f"  compiled {SHORT[variant]} fsdp={fsdp} remat={remat_compile} at encoder depth "
             f"{a} and {b}: temp {sa['temp'] / GiB:.2f} / {sb['temp'] / GiB:.2f} GiB, "
             f"{per_block / 2**20:.0f} MiB per block -> {temp / GiB:.2f} GiB at depth {full} "
             f"({sa['seconds'] + sb['seconds']:.0f} s)")
    return dict(temp=temp, extra=sb["output"] - sb["alias"], how=f"extrap {a},{b}->{full}")

  def validate_extrapolation(self):
    """One full compile of ViT-B vs the extrapolation; and XLA:CPU's remat behaviour."""
    a = self.args
    fsdp = max(a.fsdp)
    c = self.config("base", fsdp, "none")
    mesh = self.mesh(c)
    ds = a.depth_scale or (2, 4)
    sa, sb = self.compile_stats(c, mesh, ds[0]), self.compile_stats(c, mesh, ds[1])
    full = self.compile_stats(c, mesh)
    depth = VARIANT_DEPTH("base")
    extrap = sa["temp"] + (sb["temp"] - sa["temp"]) / (ds[1] - ds[0]) * (depth - ds[0])
    err = (extrap - full["temp"]) / full["temp"] * 100
    _, state, shardings, _ = self.abstract(c, mesh)
    exact = sum(self.state_bytes(state, shardings).values()) + self.batch_bytes(c, mesh)
    cb = self.config("base", fsdp, "block")
    block = self.compile_stats(cb, self.mesh(cb))
    self.say(f"  validation, ViT-B/16 fsdp={fsdp} remat=none, full compile "
             f"({full['seconds']:.0f} s): temp {full['temp'] / GiB:.3f} GiB; extrapolated "
             f"from depths {ds[0]},{ds[1]}: {extrap / GiB:.3f} GiB (error {err:+.2f}%)")
    self.say(f"  validation, compiled argument bytes {full['argument'] / GiB:.3f} GiB vs exact "
             f"state + batch shard {exact / GiB:.3f} GiB (+ the step key)")
    if self.cpu:
      self.say(f"  XLA:CPU remat=block full ViT-B temp {block['temp'] / GiB:.3f} GiB vs "
               f"none {full['temp'] / GiB:.3f} GiB: the CPU compiler does not keep remat's "
               f"savings, hence the resid-based correction for block rows")
    else:
      self.say(f"  XLA:{self.backend} remat=block full ViT-B temp {block['temp'] / GiB:.3f} "
               f"GiB vs none {full['temp'] / GiB:.3f} GiB")
    return err

  def self_check(self):
    """The abstract step compiles to the same buffers as build_training's real one."""
    from adpe_jax.train import pretrain
    c = self.pretrain_config.seed_config(self.args.pe, self.args.adversary, "smoke")
    c.batch_size, c.accum_steps, c.model.dtype = 2 * self.args.devices, 2, self.args.dtype
    c.mesh.fsdp = max(f for f in self.args.fsdp)
    c.mesh.fsdp_min_size = 256   # so the test model's kernels are sharded too
    mesh = self.mesh(c)
    try:
      setup = pretrain.build_training(c, mesh, 1000, 100.0)
      with contextlib.redirect_stderr(io.StringIO()):
        real = setup["train_step"].lower(setup["state"], self.batch_spec(c, mesh),
                                         setup["step_key"]).compile().memory_analysis()
    except Exception as e:  # noqa: BLE001
      self.say(f"  self-check skipped: build_training failed ({type(e).__name__}: {e})")
      return
    mine = self.compile_stats(c, mesh)
    same = (real.argument_size_in_bytes, real.temp_size_in_bytes) == (mine["argument"],
                                                                     mine["temp"])
    self.say(f"  self-check vs pretrain.build_training (test model, fsdp={c.mesh.fsdp}): "
             + ("same argument and temp bytes" if same else
                f"DIFFERENT (real arg/temp {real.argument_size_in_bytes}/"
                f"{real.temp_size_in_bytes}, plan {mine['argument']}/{mine['temp']}): "
                f"build_training changed; update Planner.abstract"))

  def run(self) -> int:
    a = self.args
    for v in a.variants:   # fail fast on a bad batch / mesh before compiling anything
      for f in a.fsdp:
        c = self.config(v, f, "none")
    k = c.num_crops
    crops = k * a.batch // a.accum // a.devices
    self.say(f"memory plan: pe={a.pe} adversary={a.adversary}, {c.image_size} px, {k} crops, "
             f"global batch {a.batch} images ({k * a.batch} crops), accum_steps {a.accum}, "
             f"{a.devices} devices -> {crops} crops ({crops // k} images) per device per "
             f"micro-step; compute dtype {a.dtype}, params/optimizer float32")
    self.say("steps:")
    self.self_check()
    err = None
    if not a.no_validate:
      err = self.validate_extrapolation()
    rows = []
    for v in a.variants:
      c = self.config(v, 1, "none")
      model = self.abstract(c, self.mesh(c))[0]
      resid = {r: self.residual_bytes(c, model.clone(remat=r)) for r in ("none", "block")}
      self.say(f"  {SHORT[v]}: saved residuals per micro-step {resid['none'] / GiB:.2f} GiB "
               f"(remat none), {resid['block'] / GiB:.2f} GiB (block)")
      for f in a.fsdp:
        c = self.config(v, f, "none")
        mesh = self.mesh(c)
        _, state, shardings, _ = self.abstract(c, mesh)
        sb = self.state_bytes(state, shardings)
        bb = self.batch_bytes(c, mesh)
        base = self.temp_for(v, f) if (self.cpu or "none" in a.remat) else None
        for r in a.remat:
          if r == "none":
            t, how = base, base["how"]
          elif self.cpu:   # XLA:CPU undoes remat: subtract what remat stops saving
            t = dict(base, temp=max(base["temp"] - (resid["none"] - resid["block"]), 0))
            how = base["how"] + " - dresid"
          else:            # a real backend keeps remat: compile it
            t = self.temp_for(v, f, "block")
            how = t["how"]
          temp = t["temp"]
          total = sum(sb.values()) + bb + temp + t["extra"]
          # Must be live at the end of a micro-step's forward whatever the backend:
          # state, batch shard, the float32 gradient accumulator (params-shaped, sharded
          # like them) and the saved activations.
          floor = sum(sb.values()) + bb + sb["params"] + resid[r]
          rows.append(dict(variant=v, fsdp=f, data=a.devices // f, remat=r, **sb, batch=bb,
                           resid=resid[r], temp=temp, total=total, floor=floor, how=how))
    self.table(rows, err)
    self.say(f"\nrun time {time.time() - self.t0:.0f} s")
    return 0

  def table(self, rows, err):
    g = lambda b: f"{b / GiB:7.2f}"  # noqa: E731
    self.say(f"\nper-device GiB (params/opt/adv exact; resid = JAX saved activations of one "
             f"micro-step; temp = XLA:{self.backend} temp on {self.device_kind}, see notes)")
    head = (f"{'model':9s} {'mesh dxf':>8s} {'remat':5s} {'params':>7s} {'opt':>7s} "
            f"{'adv':>7s} {'batch':>7s} {'resid':>7s} {'temp':>7s} {'total':>7s} "
            f"{'floor':>7s}  "
            + " ".join(f"{name:>11s}" for name, _, _ in DEVICES) + "  temp from")
    self.say(head)
    self.say("-" * len(head))
    for r in rows:
      fits = []
      for _, cap, _ in DEVICES:
        fits.append("ok" if r["total"] <= FIT_MARGIN * cap else
                    "tight" if r["total"] <= cap else
                    "maybe" if r["floor"] <= FIT_MARGIN * cap else "no")
      how = r["how"]
      self.say(f"{SHORT[r['variant']]:9s} {str(r['data']) + 'x' + str(r['fsdp']):>8s} "
               f"{r['remat']:5s} {g(r['params'])} {g(r['opt'])} {g(r['adv'])} "
               f"{g(r['batch'])} {g(r['resid'])} {g(r['temp'])} {g(r['total'])} "
               f"{g(r['floor'])}  "
               + " ".join(f"{x:>11s}" for x in fits) + f"  {how}")
    self.say("\nnotes:")
    if err is not None:
      self.say(f"  * depth extrapolation checked on ViT-B against a full compile: "
               f"{err:+.2f}% error in temp.")
    if self.cpu:
      self.say("  * temp comes from XLA:CPU's memory_analysis(), a proxy for TPU/GPU: other "
               "fusion, and bf16 math done in f32 on CPU, so it leans high for bf16.")
      if "block" in self.args.remat:
        self.say("  * remat=block rows: temp(none) minus the activations remat stops saving "
                 "(resid none - resid block), since XLA:CPU undoes remat; TPU/GPU keep it.")
    else:
      self.say(f"  * temp comes from memory_analysis() of the step compiled for "
               f"{self.device_kind} ({self.backend}); remat rows are compiled as such.")
    self.say("  * floor = params + opt + adv + batch + f32 gradient accumulator + resid: "
             "live whatever the backend (no workspace counted).")
    self.say(f"  * fit: ok = total <= {FIT_MARGIN:.0%} of one device, tight = <= 100%, "
             f"maybe = only floor <= {FIT_MARGIN:.0%} (measure on the device), no = "
             "neither.  Devices (one JAX device each):")
    for name, cap, src in DEVICES:
      self.say(f"      {name:12s} {cap / GiB:6.1f} GiB  {src}")
    self.say("    The issue's '32 GB TPU v5p core' matches no v5p figure: a v5p chip (one JAX "
             "device, 2 TensorCores) has 95 GB, used here.  On GPUs set "
             "XLA_PYTHON_CLIENT_MEM_FRACTION=.95 (JAX preallocates 75% by default).")


if __name__ == "__main__":
  sys.exit(main())
