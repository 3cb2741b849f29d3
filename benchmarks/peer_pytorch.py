"""Our compiled pretraining step next to the original PyTorch AdPE's, same config, same machine.

Runs the original's training step (github.com/maple-research-lab/AdPE: its model, its
parameter groups, its AdamW with the adversary's negative-lr group, its loss scaler and its
per-iteration lr schedule -- the body of training/train_epoch.py without the data loader)
and ours (`adpe_jax.train.pretrain.build_training`) on the same model, crops, images and
thread count.  Each (side, case) lives in its own persistent worker process, so the sides
share no threads or memory and compile / warm-up happens once; rounds are interleaved
(ours, original, original, ours, ...) so a slow spell of a shared machine hits both sides.

  git clone https://github.com/maple-research-lab/AdPE /tmp/AdPE
  python -m pip install --no-deps --target /tmp/timm032 timm==0.3.2
  python benchmarks/peer_pytorch.py --reference-src /tmp/AdPE --timm-dir /tmp/timm032

The original runs from its own checkout; nothing of it is copied here.  The import shims
it needs under torch 2.x / numpy 2.x (torch._six, numpy.float, a torchvision stand-in for
timm 0.3.2's package import, easydict) are in benchmarks/peer_shims/peer_compat.py.

Cases: ape, ape_embed, ape_coord, rpe, rpe_embed, rpe_coord (--pe_type 0/1 x --adv_type
0/1/2 of the original), each at every --crops value (crops per step = 4 x images).  Both
sides float32 (the original's fp16 autocast is CUDA-only), one optimizer step per step
(accum 1), adversary projection none (--norm 0: torch.optim.AdamW) unless --adv-norm, the
same lr schedule (half-cosine from step 0, no warm-up, so both lrs are non-zero) and the
same initial weights (the original's, loaded into ours with adpe_jax.convert.from_torch;
the loss at those weights with the same masking noise is printed for both sides).
The original's worker runs with OMP_WAIT_POLICY=PASSIVE (--omp-wait-policy): on a shared,
oversubscribed CPU torch's spinning OpenMP default made its steps 5-20x slower and erratic.
Each round starts with --round-warmup untimed steps per side (an idle worker's pages may
have been reclaimed meanwhile).

Output: per round the s/step of each side; then a table per case (median s/step,
images/s, compile / first-step seconds, peak RSS over the rounds' steps and per image) and
one line per case:
  ratio ours/original images_per_s <case>: <x.xx>
With two or more --crops values, also the peak RSS per added image (the slope between the
smallest and the largest batch, in which the fixed costs cancel) and
  ratio ours/original peak_rss_per_image <case>: <x.xx>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHIMS = HERE / "peer_shims"

CASES = {  # name: (pe, adversary kind) ; original: --pe_type 0/1, --adv_type 0/1/2
    "ape": ("ape", "none"), "ape_embed": ("ape", "embedding"), "ape_coord": ("ape", "coordinate"),
    "rpe": ("rpe", "none"), "rpe_embed": ("rpe", "embedding"), "rpe_coord": ("rpe", "coordinate"),
}
ADV_TYPE = {"none": 0, "embedding": 1, "coordinate": 2}
NORM = {"none": 0, "l2": 1, "linf": 2}
# The lr schedule both sides follow: 100 steps per epoch, 40 epochs, no warm-up, so the
# model's and the adversary's lrs at step k are the same non-zero values on both sides.
STEPS_PER_EPOCH_EPOCHS = (100, 40)
HOW_TO_GET = """\
peer_pytorch.py needs the original AdPE source tree:
  git clone https://github.com/maple-research-lab/AdPE /tmp/AdPE
and then:
  python benchmarks/peer_pytorch.py --reference-src /tmp/AdPE --timm-dir /tmp/timm032
(see --timm-dir for installing the timm 0.3.2 it imports)."""
HOW_TO_TIMM = """\
The original imports timm 0.3.2 (timm.models.vision_transformer / layers); install it
outside this environment's site-packages so the timm the tests use stays:
  python -m pip install --no-deps --target /tmp/timm032 timm==0.3.2
and pass --timm-dir /tmp/timm032."""


# ----------------------------------------------------------------------------- workers

def _proto_out():
  """The protocol stream: the original stdout fd; everything else printed goes to stderr."""
  fd = os.dup(1)
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  return os.fdopen(fd, "w", buffering=1)


def _pin_threads(n: int) -> None:
  cores = sorted(os.sched_getaffinity(0))
  if 0 < n < len(cores):
    os.sched_setaffinity(0, cores[:n])


def _images(spec):
  import numpy as np
  n, s = spec["crops"], spec["image_size"]
  rng = np.random.default_rng(spec["seed"])
  images = rng.normal(size=(n, 3, s, s)).astype(np.float32)  # NCHW, like the original's
  noise = rng.random((n, (s // spec["patch"]) ** 2), dtype=np.float32)  # loss-check masks
  return images, noise


def _status_mib() -> dict:
  """VmRSS and VmHWM (peak RSS) of this process in MiB, from /proc/self/status ({} off Linux)."""
  out = {}
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      key, _, value = line.partition(":")
      if key in ("VmRSS", "VmHWM"):
        out[key] = int(value.split()[0]) / 1024.0
  except OSError:
    pass
  return out


def _reset_peak_rss() -> bool:
  """Set the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
  try:
    Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def original_worker(spec) -> None:
  out = _proto_out()
  _pin_threads(spec["threads"])
  sys.path[:0] = [str(SHIMS), spec["timm_dir"], spec["reference_src"]]
  import peer_compat
  shims = peer_compat.install()
  import warnings
  warnings.filterwarnings("ignore")
  import importlib
  from functools import partial
  from types import SimpleNamespace

  import numpy as np
  import timm
  import torch
  from torch import nn

  torch.set_num_threads(spec["threads"])
  torch.manual_seed(spec["seed"])
  pe, kind = CASES[spec["case"]]
  m = spec["model"]
  images_per_step = spec["crops"] // spec["num_crops"]
  # The original's args (ops/argparser.py) as main_worker.py uses them; lr scaled by its rule.
  args = SimpleNamespace(
      pe_type=0 if pe == "ape" else 1, adv_type=ADV_TYPE[kind], norm=NORM[spec["adv_norm"]],
      eps=spec["adv_eps"], mask_ratio=0.75, norm_pix_loss=True, input_size=spec["image_size"],
      num_crop=spec["num_crops"], batch_size=images_per_step, accum_iter=1, blr=1.5e-4,
      adv_lr=1.5e-4 * images_per_step / 256, weight_decay=0.05, adv_wd=0.0, min_lr=0.0,
      warmup_epochs=0, epochs=STEPS_PER_EPOCH_EPOCHS[1])
  args.lr = args.blr * images_per_step / 256
  adpe = importlib.import_module("model.ad_ape" if pe == "ape" else "model.ad_rpe")
  # The factories adpe_vit_*_patch16 with this benchmark's widths (same keyword set).
  model = adpe.MaskedAutoencoderViT(
      args=args, norm_pix_loss=args.norm_pix_loss, img_size=spec["image_size"],
      patch_size=spec["patch"], embed_dim=m["embed_dim"], depth=m["depth"],
      num_heads=m["num_heads"], decoder_embed_dim=m["decoder_dim"],
      decoder_depth=m["decoder_depth"], decoder_num_heads=m["decoder_heads"], mlp_ratio=4,
      norm_layer=partial(nn.LayerNorm, eps=1e-6))
  model.train(True)
  add_weight_decay = importlib.import_module("optimizer.config_wd").add_weight_decay
  groups = add_weight_decay(model, args.lr, args.adv_lr, args.weight_decay, args.adv_wd, True)
  if args.norm != 0:
    adv_optimizer = importlib.import_module("optimizer.adv_optimizer").adv_optimizer
    optimizer = adv_optimizer(groups, lr=args.lr, betas=(0.9, 0.95), norm_type=args.norm,
                              limit=args.eps)
  else:
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
  scaler = importlib.import_module("optimizer.NativeScaler").NativeScalerWithGradNormCount()
  adjust_lr = importlib.import_module("optimizer.lr_schedule").adjust_learning_rate_adv
  n_adv = sum(p.numel() for n, p in model.named_parameters() if "adv" in n and p.requires_grad)

  images_np, noise_np = _images(spec)
  samples = torch.from_numpy(images_np)

  # Loss at the initial weights with fixed masking noise (our side recomputes it).
  real_rand = torch.rand

  def fixed_rand(*size, **kw):
    if tuple(size) == noise_np.shape:
      return torch.from_numpy(noise_np)
    return real_rand(*size, **kw)

  torch.rand = fixed_rand
  try:
    with torch.no_grad():
      check_loss = float(model(samples, mask_ratio=args.mask_ratio)[0])
  finally:
    torch.rand = real_rand
  weights = os.path.join(spec["tmpdir"], f"original_{spec['case']}_{spec['crops']}.npz")
  np.savez(weights, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})

  it = [0]

  def step():
    # training/train_epoch.py, one iteration, accum_iter 1, data already on the device.
    # Epoch it/100 of 40 without warm-up: the lrs of our schedule at optimizer step `it`.
    adjust_lr(optimizer, it[0] / STEPS_PER_EPOCH_EPOCHS[0], args)
    it[0] += 1
    loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
    loss_value = loss.item()
    loss = loss / args.accum_iter
    scaler(loss, optimizer, parameters=model.parameters(), update_grad=True)
    optimizer.zero_grad()
    return loss_value

  t0 = time.perf_counter()
  first_loss = step()
  warm_s = time.perf_counter() - t0
  out.write(json.dumps({
      "ready": True, "warmup_s": warm_s, "first_loss": first_loss, "check_loss": check_loss,
      "weights": weights,
      "n_adv": n_adv, "versions": {"torch": torch.__version__, "timm": timm.__version__,
                                   "threads": torch.get_num_threads()},
      "shims": shims,
      "rpe_ops": getattr(importlib.import_module("position_embed.irpe"), "RPEIndexFunction",
                         None) is not None}) + "\n")
  _serve(out, step)


def ours_worker(spec) -> None:
  out = _proto_out()
  _pin_threads(spec["threads"])
  if spec["devices"] > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={spec['devices']}")
  sys.path.insert(0, str(REPO))
  import jax
  import numpy as np

  from adpe_jax import convert, parallel
  from adpe_jax.config import pretrain as pretrain_config
  from adpe_jax.models import variants
  from adpe_jax.train.pretrain import build_training

  m = spec["model"]
  dims = (m["embed_dim"], m["depth"], m["num_heads"], m["decoder_dim"], m["decoder_depth"],
          m["decoder_heads"])
  name = next((k for k, v in variants.VARIANTS.items() if v == dims), None)
  if name is None:
    name = "peer_benchmark"
    variants.VARIANTS[name] = dims
  pe, kind = CASES[spec["case"]]
  c = pretrain_config.base_config()
  c.model.variant, c.model.patch_size, c.model.pe = name, spec["patch"], pe
  c.model.dtype = "float32"
  c.image_size, c.num_crops = spec["image_size"], spec["num_crops"]
  c.batch_size, c.accum_steps = spec["crops"] // spec["num_crops"], 1
  c.adversary.kind, c.adversary.norm, c.adversary.eps = kind, spec["adv_norm"], spec["adv_eps"]
  c.adversary.rpe_embedding = spec["rpe_embedding"]
  c.seed = spec["seed"]
  c.warmup_epochs = 0.0  # both sides: half-cosine from step 0, so both lrs are non-zero
  mesh = parallel.make_mesh()
  pretrain_config.validate(c, mesh.size)
  spe, epochs = STEPS_PER_EPOCH_EPOCHS
  setup = build_training(c, mesh, total_steps=spe * epochs, steps_per_epoch=spe)
  state, model = setup["state"], setup["model"]

  images_np, noise_np = _images(spec)
  images = images_np.transpose(0, 2, 3, 1)
  same_weights, check_loss = False, None
  if spec.get("weights"):
    ref = dict(np.load(spec["weights"]))
    variables = convert.from_torch(ref, {"params": state.params, "adversary": state.adversary},
                                   grid=model.grid, dtype=np.float32)
    loss_fn = jax.jit(lambda v, x, z: model.apply(v, x, noise=z)[0])
    check_loss = float(loss_fn(variables, images, noise_np))
    ok = (jax.tree.structure(variables["params"]) == jax.tree.structure(state.params) and
          jax.tree.structure(variables["adversary"]) == jax.tree.structure(state.adversary))
    if ok:  # train from the original's initial weights (fresh optimizer state, as there)
      new = state.replace(
          params=variables["params"], adversary=variables["adversary"],
          opt_state=setup["tx"].init(variables["params"]),
          adv_opt_state=setup["adv_tx"].init(variables["adversary"]))
      state = jax.device_put(new, setup["state_sharding"])
      same_weights = True
  batch = parallel.global_batch({"images": images}, mesh)
  n_adv = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.adversary))
  key = setup["step_key"]

  t0 = time.perf_counter()
  compiled = setup["train_step"].lower(state, batch, key).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch, key)
    return float(jax.block_until_ready(metrics)["loss"])

  t0 = time.perf_counter()
  first_loss = step()
  warm_s = time.perf_counter() - t0
  out.write(json.dumps({
      "ready": True, "compile_s": compile_s, "warmup_s": warm_s, "first_loss": first_loss,
      "check_loss": check_loss, "same_weights": same_weights,
      "n_adv": n_adv, "variant": name,
      "versions": {"jax": jax.__version__, "devices": mesh.size,
                   "backend": jax.default_backend()}}) + "\n")
  _serve(out, step)


def _serve(out, step) -> None:
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd.get("cmd") != "run":
      break
    times, losses = [], []
    # The same memory measure on both sides: the process's peak RSS over these steps
    # (the mark reset just before them, so start-up, compilation and the first step's
    # one-off allocations are not in it).
    reset = _reset_peak_rss()
    for _ in range(cmd["n"]):
      t = time.perf_counter()
      losses.append(step())
      times.append(time.perf_counter() - t)
    peak = _status_mib().get("VmHWM") if reset else None
    out.write(json.dumps({"times": times, "losses": losses, "peak_rss_mib": peak}) + "\n")


class Worker:
  """A (side, case) worker process; commands in on stdin, one JSON line back on stdout."""

  def __init__(self, side: str, spec: dict, logdir: str, python: str, env: dict | None = None):
    self.side, self.spec = side, spec
    self.log_path = os.path.join(logdir, f"{side}_{spec['case']}_{spec['crops']}.log")
    self.log = open(self.log_path, "w")  # noqa: SIM115
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    self.proc = subprocess.Popen(
        [python, str(Path(__file__).resolve()), "--_worker", side, "--_spec", json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        cwd=str(REPO))
    self.times: list[float] = []
    self.losses: list[float] = []
    self.peak_rss_mib: float | None = None  # max over rounds of the steps' peak RSS
    self.info: dict = {}

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      self.log.flush()
      tail = Path(self.log_path).read_text()[-3000:]
      raise RuntimeError(f"{self.side} worker ({self.spec['case']}, {self.spec['crops']} crops) "
                         f"exited with status {self.proc.returncode}; log {self.log_path}:\n{tail}")
    return json.loads(line)

  def ready(self) -> dict:
    self.info = self._read()
    return self.info

  def run(self, n: int, untimed: int = 0) -> list[float]:
    """`untimed` + n steps; returns all their times, keeps the last n."""
    self.proc.stdin.write(json.dumps({"cmd": "run", "n": untimed + n}) + "\n")
    self.proc.stdin.flush()
    r = self._read()
    self.times += r["times"][untimed:]
    self.losses += r["losses"]
    if r.get("peak_rss_mib") is not None:
      self.peak_rss_mib = max(self.peak_rss_mib or 0.0, r["peak_rss_mib"])
    return r["times"]

  def close(self) -> None:
    try:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=30)
    except Exception:  # noqa: BLE001
      self.proc.kill()
    self.log.close()


# ----------------------------------------------------------------------------- driver

def _median(x):
  s = sorted(x)
  n = len(s)
  return (s[n // 2] + s[(n - 1) // 2]) / 2 if n else float("nan")


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--reference-src", help="checkout of github.com/maple-research-lab/AdPE")
  ap.add_argument("--timm-dir", help="directory holding timm 0.3.2 (pip install --target)")
  ap.add_argument("--cases", default="ape,ape_coord,rpe,rpe_coord",
                  help=f"comma-separated, of {','.join(CASES)}")
  ap.add_argument("--crops", default="32,128", help="crops per step (4 per image), comma-separated")
  ap.add_argument("--embed-dim", type=int, default=192)
  ap.add_argument("--depth", type=int, default=12)
  ap.add_argument("--num-heads", type=int, default=3)
  ap.add_argument("--decoder-dim", type=int, default=128)
  ap.add_argument("--decoder-depth", type=int, default=2)
  ap.add_argument("--decoder-heads", type=int, default=4)
  ap.add_argument("--image-size", type=int, default=112)
  ap.add_argument("--patch", type=int, default=16)
  ap.add_argument("--steps", type=int, default=3, help="timed steps per case per round")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--round-warmup", type=int, default=1,
                  help="untimed steps before each side's timed steps in every round (shown "
                       "in parentheses): a worker that sat idle while the other side ran can "
                       "have had its pages reclaimed, making its next step seconds slower")
  ap.add_argument("--threads", type=int, default=0, help="0 = all cores of this process")
  ap.add_argument("--devices", type=int, default=1,
                  help="ours only: XLA host devices (one per core), batch sharded over them")
  ap.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "inherit"],
                  help="OMP_WAIT_POLICY of the original's worker (torch's intra-op OpenMP "
                       "pool; XLA does not use OpenMP). passive (default): on a shared, "
                       "oversubscribed CPU the spinning default made the original's 2-thread "
                       "steps 5-20x slower and erratic; inherit: leave the environment's")
  ap.add_argument("--adv-norm", default="none", choices=list(NORM),
                  help="adversary projection (original --norm 0/1/2; 1/2 use its adv_optimizer)")
  ap.add_argument("--adv-eps", type=float, default=1.0)
  ap.add_argument("--rpe-embedding", default="faithful", choices=["faithful", "per_bucket"],
                  help="ours, rpe_embed case: faithful = the original's computation")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--no-check-loss", action="store_true",
                  help="skip loading the original's initial weights into ours")
  ap.add_argument("--python", default=sys.executable, help="interpreter of our worker")
  ap.add_argument("--original-python", default=None,
                  help="interpreter of the original's worker (default: --python), e.g. an "
                       "environment with the original's torch 1.8.1; it imports only torch, "
                       "numpy, timm (--timm-dir) and the shims")
  ap.add_argument("--_worker", help=argparse.SUPPRESS)
  ap.add_argument("--_spec", help=argparse.SUPPRESS)
  return ap.parse_args(argv)


def check_sources(args) -> tuple[str, str]:
  if not args.reference_src:
    print(HOW_TO_GET, file=sys.stderr)
    sys.exit(2)
  src = Path(args.reference_src).expanduser().resolve()
  if not (src / "model" / "ad_ape.py").is_file() or not (src / "model" / "ad_rpe.py").is_file():
    print(f"--reference-src {src} does not hold model/ad_ape.py and model/ad_rpe.py.\n"
          + HOW_TO_GET, file=sys.stderr)
    sys.exit(2)
  if not args.timm_dir:
    print("--timm-dir is required.\n" + HOW_TO_TIMM, file=sys.stderr)
    sys.exit(2)
  timm_dir = Path(args.timm_dir).expanduser().resolve()
  if not (timm_dir / "timm" / "__init__.py").is_file():
    print(f"--timm-dir {timm_dir} holds no timm package.\n" + HOW_TO_TIMM, file=sys.stderr)
    sys.exit(2)
  probe = subprocess.run(
      [args.original_python or args.python, "-c",
       "import sys; sys.path[:0]=[sys.argv[1], sys.argv[2]]; import peer_compat; "
       "peer_compat.install(); import timm; print(timm.__version__, timm.__file__)",
       str(SHIMS), str(timm_dir)], capture_output=True, text=True)
  version = probe.stdout.split()[0] if probe.returncode == 0 and probe.stdout else None
  if version is None or not probe.stdout.split()[1].startswith(str(timm_dir)):
    print(f"could not import timm from --timm-dir {timm_dir}: "
          f"{(probe.stderr.strip().splitlines() or ['not found there'])[-1]}\n" + HOW_TO_TIMM,
          file=sys.stderr)
    sys.exit(2)
  if version != "0.3.2":
    print(f"warning: --timm-dir holds timm {version}; the original pins 0.3.2", file=sys.stderr)
  return str(src), str(timm_dir)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args._worker:
    spec = json.loads(args._spec)
    (original_worker if args._worker == "original" else ours_worker)(spec)
    return 0
  src, timm_dir = check_sources(args)
  cases = [c for c in args.cases.split(",") if c]
  bad = [c for c in cases if c not in CASES]
  if bad:
    print(f"unknown case(s) {bad}; allowed: {', '.join(CASES)}", file=sys.stderr)
    return 2
  crops_list = [int(x) for x in args.crops.split(",") if x]
  for n in crops_list:
    if n % 4 or (n // 4) % args.devices:
      print(f"--crops {n}: must be 4 x images, images divisible by --devices", file=sys.stderr)
      return 2
  threads = args.threads or len(os.sched_getaffinity(0))
  model = {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.num_heads,
           "decoder_dim": args.decoder_dim, "decoder_depth": args.decoder_depth,
           "decoder_heads": args.decoder_heads}
  tmpdir = tempfile.mkdtemp(prefix="peer_pytorch_")
  omp_env = ({} if args.omp_wait_policy == "inherit"
             else {"OMP_WAIT_POLICY": args.omp_wait_policy.upper()})
  print(f"peer_pytorch: original {src} | timm {timm_dir} | threads {threads} | "
        f"ours devices {args.devices} | model {model} | {args.image_size}px patch {args.patch} | "
        f"cases {cases} | crops {crops_list} | rounds {args.rounds} x {args.steps} steps | "
        f"adversary norm {args.adv_norm} | original OMP_WAIT_POLICY "
        f"{omp_env.get('OMP_WAIT_POLICY', os.environ.get('OMP_WAIT_POLICY', 'unset'))} | "
        f"logs {tmpdir}", flush=True)
  cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
              if ln.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
  print(f"machine: {os.cpu_count()} cores ({cpu}), {time.strftime('%Y-%m-%d %H:%M')}, "
        f"load average {os.getloadavg()[0]:.2f}", flush=True)
  git = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True)
  if git.returncode == 0:
    print(f"original commit {git.stdout.strip()}", flush=True)

  runs = []  # (label, {"original": Worker, "ours": Worker})
  # One group of workers per crops value: the cases of a group are interleaved round by
  # round; a group's workers exit before the next group starts (bounds the memory held).
  for crops in crops_list:
    group = []
    try:
      for case in cases:
        label = f"{case}@{crops}"
        spec = {"case": case, "crops": crops, "num_crops": 4, "image_size": args.image_size,
                "patch": args.patch, "model": model, "threads": threads, "seed": args.seed,
                "devices": args.devices, "adv_norm": args.adv_norm, "adv_eps": args.adv_eps,
                "rpe_embedding": args.rpe_embedding, "reference_src": src,
                "timm_dir": timm_dir, "tmpdir": tmpdir}
        # Sequential start-up: one process busy at a time.
        w = {"original": Worker("original", spec, tmpdir, args.original_python or args.python,
                                omp_env)}
        group.append((label, w))
        oi = w["original"].ready()
        ours_spec = dict(spec, weights=None if args.no_check_loss else oi["weights"])
        w["ours"] = Worker("ours", ours_spec, tmpdir, args.python)
        ui = w["ours"].ready()
        if os.path.exists(oi["weights"]):
          os.remove(oi["weights"])
        if not runs and len(group) == 1:
          print(f"versions: original {oi['versions']} shims {oi['shims']} rpe_ops built "
                f"{oi['rpe_ops']} | ours {ui['versions']} variant {ui['variant']}", flush=True)
        check = ""
        if ui.get("check_loss") is not None:
          d = abs(ui["check_loss"] - oi["check_loss"]) / max(abs(oi["check_loss"]), 1e-30)
          check = (f" | same weights+masks: original {oi['check_loss']:.7f} ours "
                   f"{ui['check_loss']:.7f} rel diff {d:.1e}")
        print(f"[{label}] ready: ours compile {ui['compile_s']:.1f} s, first step "
              f"{ui['warmup_s']:.2f} s, loss {ui['first_loss']:.4f} | original first step "
              f"{oi['warmup_s']:.2f} s, loss {oi['first_loss']:.4f} | adversary size ours "
              f"{ui['n_adv']} original {oi['n_adv']}{check}", flush=True)

      for r in range(args.rounds):
        order = ("ours", "original") if r % 2 == 0 else ("original", "ours")
        for label, w in group:
          parts = []
          for side in order:
            t = w[side].run(args.steps, args.round_warmup)
            parts.append(f"{side} " + " ".join(
                (f"({x:.3f})" if i < args.round_warmup else f"{x:.3f}")
                for i, x in enumerate(t)))
          print(f"round {r + 1} [{label}] s/step (untimed): " + " | ".join(parts), flush=True)
    finally:
      for _, w in group:
        for x in w.values():
          x.close()
    runs += group

  print()
  hdr = (f"{'case':16s} {'side':9s} {'s/step':>8s} {'img/s':>8s} {'crops/s':>8s} "
         f"{'compile s':>9s} {'1st step s':>10s} {'peak MiB':>8s} {'MiB/img':>8s}  "
         f"loss first->last")
  print(hdr)
  print("-" * len(hdr))
  ratios = []
  peaks = {}  # (case, side) -> [(images, peak RSS MiB)]
  for label, w in runs:
    ips = {}
    for side in ("original", "ours"):
      x = w[side]
      med = _median(x.times)
      images = x.spec["crops"] / 4
      ips[side] = images / med
      comp = x.info.get("compile_s")
      peak = x.peak_rss_mib
      if peak is not None:
        peaks.setdefault((x.spec["case"], side), []).append((images, peak))
      print(f"{label:16s} {side:9s} {med:8.3f} {ips[side]:8.2f} {4 * ips[side]:8.2f} "
            f"{(f'{comp:9.1f}' if comp is not None else '        -')} "
            f"{x.info['warmup_s']:10.2f} "
            f"{(f'{peak:8.0f}' if peak is not None else '       -')} "
            f"{(f'{peak / images:8.2f}' if peak is not None else '       -')}  "
            f"{x.info['first_loss']:.4f}->{x.losses[-1]:.4f}")
    ratios.append((label, ips["ours"] / ips["original"]))
  print("peak MiB: the process's peak RSS over each round's steps (its untimed warm-up "
        "included), on both sides (the kernel's peak mark reset before each round: start-up, "
        "compilation and the first step are not in it); MiB/img = peak MiB / images, so fixed "
        "costs (the framework, the weights and optimizer state) are in it.")
  slopes = []
  for case in cases:
    row = {}
    for side in ("original", "ours"):
      pts = sorted(peaks.get((case, side), []))
      if len(pts) >= 2 and pts[-1][0] > pts[0][0]:
        row[side] = (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])
    if len(row) == 2:
      slopes.append((case, row))
  if slopes:
    lo, hi = min(crops_list) // 4, max(crops_list) // 4
    print(f"\npeak RSS per added image, between {lo} and {hi} images (fixed costs cancel):")
    for case, row in slopes:
      print(f"  {case:12s} original {row['original']:7.2f} MiB/img | ours {row['ours']:7.2f} "
            f"MiB/img")
  print(f"load average at the end {os.getloadavg()[0]:.2f} (1 min), "
        f"{os.getloadavg()[1]:.2f} (5 min)")
  print()
  for label, r in ratios:
    print(f"ratio ours/original images_per_s {label}: {r:.2f}")
  for case, row in slopes:
    ratio = row["ours"] / row["original"] if row["original"] > 0 else float("nan")
    print(f"ratio ours/original peak_rss_per_image {case}: {ratio:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
