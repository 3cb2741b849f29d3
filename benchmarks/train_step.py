"""Compile time, ms/step, images/s, FLOPs, MFU and peak memory of the compiled train step.

Every case is measured in ONE run, interleaved, so the numbers compare (a slow spell of a
shared machine hits every case alike); each adversary case is also given as a ratio to the
MAE+ baseline step (same positional encoding, no adversary) measured in the same run.

    python benchmarks/train_step.py                                  # tiny12 @ 32 crops, all cases
    python benchmarks/train_step.py --crops 128 --cases ape,ape_coord --steps 10
    python benchmarks/train_step.py --config configs/vitb_rpe_coord.py --variant base \\
        --image-size 112 --patch 16 --crops 64 --steps 10 --dtype bfloat16      # a GPU
    python benchmarks/train_step.py --host-devices 2                 # one CPU device per core
    python benchmarks/train_step.py --dims 192,12,3,128,2,4          # any widths/depths

Model: `--variant` (adpe_jax/models/variants.py; default tiny12 = dim 192, depth 12, 3 heads,
decoder 128 x 2 x 4 heads, the size of the side-by-side runs against the original) or
`--dims E,DEPTH,HEADS,DEC_E,DEC_DEPTH,DEC_HEADS`.  Crops: `--crops` per step (= images x
num_crops, 4 crops per image as MAE+), 112 px at patch 16 by default (a 7x7 grid, the
original's pretraining crop).

Columns:
  compile_s   lower + compile of the step, seconds
  ms/step     median of --steps timed steps after 2 warm-up steps
  img/s       images (not crops) per second
  GFLOP/img   analytic matmul FLOPs of fwd + bwd per image (adpe_jax/flops.py)
  MFU         step FLOP/s over the peak: on CPU a float32 matmul measured in this run
              (the best of a single-device and an all-devices matmul), elsewhere the
              datasheet bf16 peak (adpe_jax/train/metrics.py PEAK_FLOPS) times devices
  MiB/img     peak memory (all devices) of the compiled step per image: arguments + outputs - aliased +
              temporaries (XLA's memory_analysis)
  vs base     ms/step over the same-PE no-adversary case's ms/step (adversary overhead);
              also with the fastest step of each case (min ms), less sensitive to steal time

`--profile N` then traces N steps of each case and sums the time of XLA's ops from the
trace: matmuls (XLA:CPU's `ynn_fusion`s, i.e. dots handed to YNNPACK with their fused
element-wise work, and plain dots), layout copies / transposes, everything else; the MFU
over the matmuls' share of the time is the rate of the matmuls themselves, and bounds the MFU:
the step cannot reach more even if nothing but its matmuls took time.  Shares are taken
from the trace; the MFU and its bound from the untraced steps (tracing slows ops alike).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = {  # name: (pe, adversary.kind, adversary.rpe_embedding)
    "ape": ("ape", "none", "per_bucket"), "ape_embed": ("ape", "embedding", "per_bucket"),
    "ape_coord": ("ape", "coordinate", "per_bucket"), "rpe": ("rpe", "none", "per_bucket"),
    "rpe_embed": ("rpe", "embedding", "faithful"),          # the original's adv_token
    "rpe_embed_bucket": ("rpe", "embedding", "per_bucket"),  # our per-bucket adv_table
    "rpe_coord": ("rpe", "coordinate", "per_bucket"),
}


def _args():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="", help="a config file[:arg] (default: base_config)")
  ap.add_argument("--variant", default="tiny12")
  ap.add_argument("--dims", default="", help="E,DEPTH,HEADS,DEC_E,DEC_DEPTH,DEC_HEADS")
  ap.add_argument("--cases", default=",".join(CASES))
  ap.add_argument("--crops", default="32", help="crops per step, comma-separated list")
  ap.add_argument("--num-crops", type=int, default=4, help="crops per image")
  ap.add_argument("--image-size", type=int, default=112)
  ap.add_argument("--patch", type=int, default=16)
  ap.add_argument("--accum", type=int, default=1)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--attention", default="xla", help="model.attention_impl")
  ap.add_argument("--remat", default="none")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--host-devices", type=int, default=0,
                  help="CPU: split the host into this many devices (batch sharded over them)")
  ap.add_argument("--devices", default="",
                  help="mesh sizes to compare in this run, e.g. 1,2 (default: all devices)")
  ap.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for this run")
  ap.add_argument("--serve", action="store_true",
                  help="worker mode (benchmarks/cpu_options.py): compile, print 'ready', then "
                       "time one step of every case per line read on stdin")
  ap.add_argument("--profile", type=int, default=0, metavar="N",
                  help="after the table, trace N more steps of each case (jax.profiler) and "
                       "print where the time goes: matmuls / layout copies / the rest, the "
                       "in-step matmul rate and the MFU bound it sets, the top source ops")
  ap.add_argument("--set", action="append", default=[],
                  help="config override field=value (repeatable), e.g. model.scan_blocks=True")
  return ap.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:  # XLA reads its flags once, at backend start: set them before jax
  flags = os.environ.get("XLA_FLAGS", "")
  if ARGS.host_devices:
    flags += f" --xla_force_host_platform_device_count={ARGS.host_devices}"
  os.environ["XLA_FLAGS"] = (flags + " " + ARGS.xla_flags).strip()

import jax
import jax.numpy as jnp
import numpy as np

from adpe_jax import parallel
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.models import variants
from adpe_jax.train.metrics import device_peak_flops
from adpe_jax.train.pretrain import build_training, step_flops


def load_config(spec: str):
  if not spec:
    return pretrain_config.base_config()
  path, _, arg = spec.partition(":")
  import importlib.util
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"True": True, "False": False}.get(text, text)


def case_config(args, case: str, crops: int):
  c = load_config(args.config)
  if args.dims:
    variants.VARIANTS["custom"] = tuple(int(x) for x in args.dims.split(","))
    c.model.variant = "custom"
  else:
    c.model.variant = args.variant
  pe, kind, emb = CASES[case]
  c.model.pe, c.adversary.kind, c.adversary.rpe_embedding = pe, kind, emb
  c.model.patch_size, c.model.dtype = args.patch, args.dtype
  c.model.attention_impl, c.model.remat = args.attention, args.remat
  if crops % args.num_crops:
    raise SystemExit(f"--crops {crops} is not a multiple of --num-crops {args.num_crops}.")
  c.image_size, c.num_crops = args.image_size, args.num_crops
  c.batch_size, c.accum_steps = crops // args.num_crops, args.accum
  for item in args.set:
    field, _, value = item.partition("=")
    node = c
    *parents, leaf = field.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(_parse_value(value)) if not isinstance(node[leaf], bool) \
        else value in ("True", "true", "1")
  return c


def measured_matmul_peak(n: int = 2048, repeats: int = 5) -> tuple[float, str]:
  """FLOP/s of a float32 (n, n) @ (n, n) matmul: best of one device and all devices."""
  best, how = 0.0, ""
  devices = jax.devices()
  for label, devs in (("1 device", devices[:1]), (f"{len(devices)} devices", devices)):
    if label != "1 device" and len(devices) == 1:
      continue
    mesh = parallel.make_mesh(devs)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    a = jax.device_put(jnp.ones((len(devs), n, n), jnp.float32), sharding)
    f = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x))
    jax.block_until_ready(f(a))
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(f(a))
      times.append(time.perf_counter() - t)
    rate = 2.0 * n ** 3 * len(devs) / min(times)
    if rate > best:
      best, how = rate, f"float32 {n}x{n} matmul on {label}: {rate / 1e9:.1f} GFLOP/s"
  return best, how


def prepare(config, num_devices: int = 0) -> dict:
  devices = jax.devices()[:num_devices or None]
  fsdp = config.mesh.fsdp if config.mesh.fsdp != -1 else len(devices)
  mesh = parallel.make_mesh(devices, data=-1, fsdp=fsdp)  # --set mesh.fsdp=N shards the state
  setup = build_training(config, mesh, total_steps=1000, steps_per_epoch=100)
  n = config.num_crops * config.batch_size
  rng = np.random.default_rng(0)
  host = {"images": rng.normal(size=(n, config.image_size, config.image_size, 3)
                               ).astype(np.float32)}
  batch = parallel.global_batch(host, mesh)
  t0 = time.perf_counter()
  compiled = setup["train_step"].lower(setup["state"], batch, setup["step_key"]).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak_bytes = None
  if mem is not None:
    peak_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                  - mem.alias_size_in_bytes + mem.temp_size_in_bytes) * mesh.size
  run = {"step": compiled, "state": setup["state"], "batch": batch, "key": setup["step_key"],
         "compile_s": compile_s, "flops": step_flops(config, setup["model"]), "times": [],
         "images": config.batch_size, "peak_bytes": peak_bytes}
  time_steps(run, 2)  # warm-up
  run["times"].clear()
  return run


def time_steps(run, n: int) -> None:
  for _ in range(n):
    t = time.perf_counter()
    run["state"], m = run["step"](run["state"], run["batch"], run["key"])
    jax.block_until_ready(m)
    run["times"].append(time.perf_counter() - t)


def main(args) -> None:
  devices = jax.devices()
  print(f"jax {jax.__version__}; devices: {len(devices)} x {devices[0].device_kind}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  if devices[0].platform == "cpu":
    peak, how = measured_matmul_peak()
    print(f"peak: {how}", flush=True)
  else:
    per = device_peak_flops(devices[0])
    peak, how = (per or 0.0) * len(devices), f"datasheet bf16 {per} FLOP/s x {len(devices)}"
    print(f"peak: {how}", flush=True)
  cases = args.cases.split(",")
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    raise SystemExit(f"--cases: unknown {unknown}; known: {', '.join(CASES)}.")
  runs = {}
  meshes = [int(x) for x in args.devices.split(",")] if args.devices else [0]
  for crops in (int(x) for x in args.crops.split(",")):
    for n in meshes:
      for case in cases:
        label = f"{case}@{crops}" + (f"/{n}dev" if args.devices else "")
        print(f"compiling {label} ...", flush=True)
        runs[label] = prepare(case_config(args, case, crops), n)
  if args.serve:
    print("ready " + json.dumps({k: {"compile_s": r["compile_s"], "flops": r["flops"],
                                     "images": r["images"], "peak_bytes": r["peak_bytes"]}
                                 for k, r in runs.items()}), flush=True)
    for _ in sys.stdin:
      for run in runs.values():
        time_steps(run, 1)
      print("times " + json.dumps({k: r["times"][-1] for k, r in runs.items()}), flush=True)
    return
  for _ in range(args.steps):  # interleaved rounds
    for run in runs.values():
      time_steps(run, 1)
  if devices[0].platform == "cpu":  # again after the steps: the better of the two (a
    after, how = measured_matmul_peak()  # shared machine only ever lowers the figure)
    if after > peak:
      peak = after
    print(f"peak after the steps: {how}; used {peak / 1e9:.1f} GFLOP/s", flush=True)
  print("\n| case | compile_s | ms/step | img/s | GFLOP/img | MFU | MiB/img | vs base | "
        "min ms | vs base (min) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for label, run in runs.items():
    ms = 1000 * float(np.median(run["times"]))
    img_s = run["images"] / (ms / 1000)
    mfu = run["flops"] / (ms / 1000) / peak if peak else float("nan")
    case, rest = label.split("@")
    base = runs.get(f"{CASES[case][0]}@{rest}")
    vs = (ms / (1000 * float(np.median(base["times"])))) if base else float("nan")
    ms_min = 1000 * min(run["times"])
    vs_min = (min(run["times"]) / min(base["times"])) if base else float("nan")
    mib = run["peak_bytes"] / 2 ** 20 / run["images"] if run["peak_bytes"] else float("nan")
    print(f"| {label} | {run['compile_s']:.1f} | {ms:.1f} | {img_s:.2f} | "
          f"{run['flops'] / run['images'] / 1e9:.2f} | {100 * mfu:.1f}% | {mib:.1f} | "
          f"{vs:.3f} | {ms_min:.1f} | {vs_min:.3f} |", flush=True)
  if args.profile:
    for label, run in runs.items():
      profile(label, run, args.profile, peak)


def _op_class(name: str) -> str:
  base = name.split(".")[0]
  if "ynn_fusion" in base or base in ("dot", "dot_general", "convolution") or "dot_" in base:
    return "matmul"
  if "copy" in base or "transpose" in base:
    return "copy/transpose"
  return "other"


def profile(label: str, run: dict, n: int, peak: float, top: int = 12) -> None:
  """Trace n steps; print time by op class and source op (from the HLO metadata)."""
  import collections
  import glob
  import gzip
  import re
  import tempfile
  source = {}
  for line in run["step"].as_text().splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
    if m:
      source[m.group(1)] = re.sub(r"blocks_\d+", "blocks_N", m.group(2))
  with tempfile.TemporaryDirectory() as d:
    start = time.perf_counter()
    with jax.profiler.trace(d, create_perfetto_trace=True):
      time_steps(run, n)
    wall = (time.perf_counter() - start) / n
    files = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
    if not files:
      print(f"[{label}] profile: no trace written", flush=True)
      return
    with gzip.open(files[0]) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  by_class, by_source = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in source:
      us = e.get("dur", 0) / n
      by_class[_op_class(e["name"])] += us
      by_source[source[e["name"]].removeprefix("jit(train_step)/")] += us
  total = sum(by_class.values())
  if not total:
    print(f"[{label}] profile: no XLA op events in the trace", flush=True)
    return
  ms = 1000 * float(np.median(run["times"][:-n] or run["times"]))  # untraced steps
  mfu = run["flops"] / (ms / 1000) / peak if peak else float("nan")
  share = by_class["matmul"] / total
  print(f"\n[{label}] profile of {n} steps (traced {wall * 1000:.0f} ms/step, untraced "
        f"{ms:.0f}): " + ", ".join(f"{k} {100 * v / total:.1f}%"
                                   for k, v in by_class.most_common()), flush=True)
  print(f"[{label}] MFU {100 * mfu:.1f}%; the matmuls alone run at {100 * mfu / share:.0f}% of "
        f"the peak (MFU / matmul share): the bound if nothing else took time", flush=True)
  devices = len(run["batch"]["images"].sharding.device_set)
  if devices > 1:
    print(f"[{label}] note: {devices} devices: a device that waits for the other(s) at a "
          f"cross-device reduction is timed inside that op, so the shares of the reductions "
          f"(and the bound) are inflated; profile on 1 device for clean shares", flush=True)
  for src, us in by_source.most_common(top):
    if src.startswith("("):  # one fusion of many ops (e.g. the gradient reductions)
      src = f"{src.count(':') + 1} ops fused, e.g. {src[1:].split(':')[0]}"
    print(f"  {100 * us / total:5.1f}%  {src[:160]}", flush=True)


if __name__ == "__main__":
  main(ARGS)
