"""Does AdPE pretraining beat MAE+ at equal compute?  Measured at demo scale, 3 seeds per arm.

    python benchmarks/adpe_vs_maeplus.py                    # 3 arms x 3 seeds (about 75 min, 2 cores)
    python benchmarks/adpe_vs_maeplus.py --table-only       # the table from finished runs
    python benchmarks/adpe_vs_maeplus.py --smoke            # the whole path in a few minutes

Arms (each pretrains `configs/demo.py` for the same number of steps on Fashion-MNIST):
  mae_plus_rpe     MAE+ with iRPE, no adversary (`configs/demo.py:mae_plus`)
  adpe_rpe_coord   AdPE, iRPE + adversarial coordinates (`configs/demo.py`, the demo)
  adpe_ape_coord   AdPE, sin-cos APE + adversarial coordinates (`--config.model.pe=ape`)
  random_init      no pretraining: the same encoder at initialisation (--baseline-seeds)

Each pretrained encoder is then judged three ways, all through the project's CLI
(`python -m adpe_jax.main`), so the numbers are what a user gets:
  k-NN       k=20 cosine on 5000 train / 1000 test images (the pretraining run's own
             end-of-run evaluator; it also gives the random-init number)
  linprobe   `configs/linprobe_demo.py:avg`, 1 epoch (MAE's BN + linear head, LARS)
  finetune   `configs/demo_finetune.py`, --finetune-steps steps (the original's recipe;
             pe_type 2 after RPE-coordinate, 1 after MAE+ RPE, 0 after APE)
The adversary's measured effect at the end of pretraining (adv_loss_gap: the loss increase
of the ascent step on the last batch, and the L2 norms of the adversarial shifts) comes from
the last record of the run's metrics.jsonl.

Runs go to OUT/<arm>/seed<S>/{pretrain,linprobe,finetune}; a finished run (summary.json says
finished) is not repeated, so an interrupted benchmark resumes.  All runs share one
persistent compilation cache (OUT/jax_cache), so seeds 1 and 2 reuse seed 0's programs.
Results: OUT/results.json and a Markdown table (mean +- std over seeds) on stdout and in
OUT/table.md.

The protocol at a scale where the paper's effect can show (one command, GPUs):
    python benchmarks/adpe_vs_maeplus.py --protocol cifar10 --data DIR --dtype bfloat16
                                                     # DIR/{train,test}/<class>/
    python benchmarks/adpe_vs_maeplus.py --protocol cifar10 --cost       # its FLOPs and GPU hours
    python benchmarks/adpe_vs_maeplus.py --protocol cifar10 --data DIR --smoke   # minutes, a CPU
The same arms and seeds, each stage its own config at its own length: configs/cifar10_pretrain.py
(ViT-S, 7x7 grid, 800 epochs; `:mae_plus`, `:ape`), configs/cifar10_linprobe.py (90 epochs)
and configs/cifar10_finetune.py (100 epochs, the pe_type that follows each pretraining).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARMS = {
    "mae_plus_rpe": {"pretrain": ["--config=configs/demo.py:mae_plus"], "pe": "rpe", "rpe_lookup": "integer"},
    "adpe_rpe_coord": {"pretrain": ["--config=configs/demo.py"], "pe": "rpe", "rpe_lookup": "continuous"},
    "adpe_ape_coord": {"pretrain": ["--config=configs/demo.py", "--config.model.pe=ape"],
                       "pe": "ape", "rpe_lookup": "integer"},
    "random_init": {"pretrain": None, "pe": "rpe", "rpe_lookup": "continuous"},
}
# The headline judges first (the held-out loss, probe, fine-tune); k-NN is reported, not
# headlined: it is a weak metric for MAE-style encoders.
METRICS = [("heldout_loss", "held-out loss (adversary off)"),
           ("linprobe_top1", "linear probe top-1"), ("finetune_top1", "fine-tune top-1"),
           ("heldout_loss_adv", "held-out loss (adversary on)"),
           ("heldout_gap", "held-out gap (on - off)"), ("knn_top1", "k-NN top-1 (not headlined)"),
           ("final_loss", "final pretrain loss"),
           ("adv_loss_gap", "adv_loss_gap (end, train batch)"),
           ("adv_frac", "mean adv_frac (end)"), ("adv_shift_norm", "mean adv shift L2 (end)"),
           ("pretrain_s", "pretrain wall s"), ("total_s", "all stages wall s")]
PAIRED = ["heldout_loss", "linprobe_top1", "finetune_top1", "knn_top1"]
# --protocol cifar10: each arm's argument of configs/cifar10_{pretrain,finetune}.py (None: no
# pretraining).  The probe reads its encoder's fields from the pretraining's workdir.
CIFAR10_ARMS = {"mae_plus_rpe": "mae_plus", "adpe_rpe_coord": "", "adpe_ape_coord": "ape",
                "random_init": None}
CIFAR10_TRAIN, CIFAR10_TEST = 50000, 10000
# The cost's assumption: this share of the bf16 dense peak (a 50-token ViT-S keeps its
# matmuls small); a run logs its own `mfu` (metrics.jsonl) to rescale the hours by.
UTILISATION = 0.3


def _summary(workdir: pathlib.Path) -> dict:
  try:
    return json.loads((workdir / "summary.json").read_text())
  except (OSError, ValueError):
    return {}


def _run(workdir: pathlib.Path, args: list[str], env: dict) -> tuple[dict, float]:
  """Runs one CLI job unless it already finished; returns (summary, wall seconds)."""
  done = _summary(workdir)
  if done.get("status") == "finished":
    return done, float(done.get("wall_seconds", 0.0))
  cmd = [sys.executable, "-m", "adpe_jax.main", f"--workdir={workdir}", *args]
  print("+", " ".join(cmd), flush=True)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)
  wall = time.perf_counter() - t0
  (workdir.parent / f"{workdir.name}.log").write_text(proc.stdout)
  if proc.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); its output is in "
                     f"{workdir.parent / (workdir.name + '.log')}.")
  summary = _summary(workdir)
  summary["wall_seconds"] = wall
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary, wall


def _last_adversary_record(workdir: pathlib.Path) -> dict:
  from adpe_jax.train.loop import logged_records  # lazily: skips cut lines
  return (logged_records(workdir, "adv_loss_gap") or [{}])[-1]


def cifar10_args(arm: str, stage: str, init: str, opts) -> list[str]:
  """The CLI arguments of one stage (pretrain | linprobe | finetune) of one arm of the
  cifar10 protocol on the folder opts.data, from `init` (a pretraining workdir; "" = none)."""
  flags = [] if stage == "linprobe" else [CIFAR10_ARMS[arm] or ""]
  if CIFAR10_ARMS[arm] is None:
    flags = ["random"]
  flags = [f for f in flags if f] + (["smoke"] if opts.smoke else [])
  dtype = getattr(opts, "dtype", "")
  return [f"--config=configs/cifar10_{stage}.py" + (":" + ",".join(flags) if flags else ""),
          f"--config.data.dir={opts.data}", *([f"--config.init={init}"] if init else []),
          *([f"--config.model.dtype={dtype}"] if dtype else [])]


def stage_args(arm: str, pretrain: pathlib.Path, seed_arg: list[str], opts) -> dict:
  """{stage: CLI arguments} of one arm and seed (no "pretrain" for random_init)."""
  spec = ARMS[arm]
  init = str(pretrain) if spec["pretrain"] is not None else ""
  if opts.protocol == "cifar10":
    out = {stage: cifar10_args(arm, stage, init if stage != "pretrain" else "", opts) + seed_arg
           for stage in ("pretrain", "linprobe", "finetune")}
    if not init:
      del out["pretrain"]
    return out
  out = {}
  if init:
    out["pretrain"] = spec["pretrain"] + seed_arg + [
        f"--config.total_steps={opts.pretrain_steps}", *opts.pretrain_extra]
  init = [f"--config.init={init}"] if init else ["--config.init="]
  out["linprobe"] = ["--config=configs/linprobe_demo.py:avg" + (",random" if not spec["pretrain"] else ""),
                     *([] if not spec["pretrain"] else init), *seed_arg,
                     f"--config.total_epochs={opts.linprobe_epochs}", *opts.probe_extra]
  out["finetune"] = [
      "--config=configs/demo_finetune.py" + (":random" if not spec["pretrain"] else ""),
      *([] if not spec["pretrain"] else init), *seed_arg,
      f"--config.model.pe={spec['pe']}", f"--config.model.rpe_lookup={spec['rpe_lookup']}",
      f"--config.total_steps={opts.finetune_steps}",
      f"--config.warmup_epochs={max(opts.finetune_steps // 10, 1) / (60000 // 64)}",
      f"--config.eval.every_steps={opts.finetune_steps}",
      f"--config.checkpoint_every_steps={opts.finetune_steps}", *opts.finetune_extra]
  return out


def run_one(arm: str, seed: int, out: pathlib.Path, opts, env: dict) -> dict:
  base = out / arm / f"seed{seed}"
  base.mkdir(parents=True, exist_ok=True)
  result = {"arm": arm, "seed": seed}
  total = 0.0
  pretrain = base / "pretrain"
  args = stage_args(arm, pretrain, [f"--config.seed={seed}"], opts)
  if "pretrain" in args:
    s, wall = _run(pretrain, args["pretrain"], env)
    total += wall
    result.update(knn_top1=s.get("knn_top1"), knn_top1_random_init=s.get("knn_top1_random_init"),
                  final_loss=s.get("final_loss"), pretrain_s=wall,
                  heldout_loss=s.get("heldout_loss"), heldout_loss_adv=s.get("heldout_loss_adv"))
    if s.get("heldout_loss") is not None and s.get("heldout_loss_adv") is not None:
      result["heldout_gap"] = s["heldout_loss_adv"] - s["heldout_loss"]
    adv = _last_adversary_record(pretrain)
    if adv:
      shifts = [v for k, v in adv.items() if k.startswith("adv_norm/")]
      result["adv_loss_gap"] = adv["adv_loss_gap"]
      result["adv_shift_norm"] = sum(shifts) / len(shifts) if shifts else None
      fracs = [v for k, v in adv.items() if k.startswith("adv_frac/")]
      result["adv_frac"] = sum(fracs) / len(fracs) if fracs else None
  # random init: the k-NN number is the pretraining runs' random-init evaluation
  s, wall = _run(base / "linprobe", args["linprobe"], env)
  total += wall
  result["linprobe_top1"] = s.get("last_top1")
  s, wall = _run(base / "finetune", args["finetune"], env)
  total += wall
  result["finetune_top1"] = s.get("last_top1")
  result["total_s"] = total
  return result


def protocol_cost(arms: list[str], seeds: int, baseline_seeds: int) -> dict:
  """FLOPs of the cifar10 protocol (adpe_jax/flops.py run_flops) by arm and stage, one seed
  each, and in total over `seeds` seeds (`baseline_seeds` for random_init)."""
  from adpe_jax import flops  # lazily: keeps --help light
  opts = argparse.Namespace(smoke=False, data="")
  rows, total = {}, 0.0
  arms = [a for a in arms if a != "random_init"] + (["random_init"] if baseline_seeds else [])
  for arm in arms:
    pretrain = None
    for stage in ("pretrain", "linprobe", "finetune"):
      if stage == "pretrain" and CIFAR10_ARMS[arm] is None:
        continue
      config_arg = cifar10_args(arm, stage, "", opts)[0].split("=", 1)[1]
      c = _load_config(config_arg)
      if stage == "pretrain":
        pretrain = c
      elif stage == "linprobe" and pretrain is not None:  # the fields it reads from init
        c.model.variant, c.model.patch_size = pretrain.model.variant, pretrain.model.patch_size
        c.model.pe, c.image_size = pretrain.model.pe, pretrain.image_size
      rows[(arm, stage)] = flops.run_flops(c, CIFAR10_TRAIN, CIFAR10_TEST)["total"]
      total += rows[(arm, stage)] * (baseline_seeds if arm == "random_init" else seeds)
  return {"per_run": rows, "total": total, "seeds": seeds, "baseline_seeds": baseline_seeds}


def _load_config(config_arg: str):
  """`configs/x.py:args` -> its ConfigDict (as the CLI's --config loads it)."""
  import importlib.util
  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def cost_table(cost: dict) -> str:
  """The cost as Markdown: PFLOP per run, and the protocol's hours on one H100 / A100."""
  from adpe_jax import flops
  peaks = flops.PEAK_BF16
  rows = ["| run (one seed) | PFLOP | H100 h | A100 h |", "|---|---|---|---|"]
  hours = lambda f, chip: flops.accelerator_hours(f, peaks[chip], UTILISATION)  # noqa: E731
  for (arm, stage), f in cost["per_run"].items():
    rows.append(f"| {arm} {stage} | {f / 1e15:,.1f} | {hours(f, 'H100'):.2f} | "
                f"{hours(f, 'A100'):.2f} |")
  t = cost["total"]
  rows.append(f"| **the protocol** ({cost['seeds']} seeds; random_init "
              f"{cost['baseline_seeds']}) | {t / 1e15:,.0f} | {hours(t, 'H100'):.1f} | "
              f"{hours(t, 'A100'):.1f} |")
  return "\n".join(rows) + (
      f"\n\nHours at {UTILISATION:.0%} of the bf16 dense peak (H100 {peaks['H100'] / 1e12:.0f}, "
      f"A100 {peaks['A100'] / 1e12:.0f} TFLOP/s): matmul FLOPs of adpe_jax/flops.py run_flops, "
      f"evaluations included.  Each run logs its own `mfu`: hours x {UTILISATION} / mfu.")


def _fmt(values: list) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  mean = statistics.fmean(values)
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  digits = 0 if abs(mean) >= 100 else (4 if abs(mean) < 0.01 and mean else 3)
  return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def table(results: list[dict]) -> str:
  arms = [a for a in ARMS if any(r["arm"] == a for r in results)]
  rows = ["| metric | " + " | ".join(
      f"{a} (n={sum(r['arm'] == a for r in results)})" for a in arms) + " |",
          "|---|" + "---|" * len(arms)]
  for key, label in METRICS:
    cells = []
    for a in arms:
      vals = [r.get(key) for r in results if r["arm"] == a]
      if a == "random_init" and key == "knn_top1":  # the pretraining runs' init evaluation
        vals = list({r["seed"]: r["knn_top1_random_init"] for r in results
                     if r.get("knn_top1_random_init") is not None}.values())
      cells.append(_fmt(vals))
    rows.append(f"| {label} | " + " | ".join(cells) + " |")
  # Paired by seed (same data order, masks and initialisation): the arm minus MAE+.
  base = {r["seed"]: r for r in results if r["arm"] == "mae_plus_rpe"}
  labels = dict(METRICS)
  for key in PAIRED:
    label = labels[key]
    cells = []
    for a in arms:
      diffs = [r[key] - base[r["seed"]][key] for r in results
               if r["arm"] == a and a != "mae_plus_rpe" and r["seed"] in base
               and r.get(key) is not None and base[r["seed"]].get(key) is not None]
      cells.append(_fmt(diffs) if diffs else "-")
    rows.append(f"| {label}, minus MAE+ (same seed) | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=str(ROOT / "runs" / "adpe_vs_maeplus"))
  p.add_argument("--arms", default="mae_plus_rpe,adpe_rpe_coord,adpe_ape_coord")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--baseline-seeds", default="0", help="seeds of the random_init arm ('' = none)")
  p.add_argument("--protocol", choices=("demo", "cifar10"), default="demo",
                 help="demo: configs/demo*.py on Fashion-MNIST (the lengths below); cifar10: "
                      "configs/cifar10_*.py on the folder --data, each at its config's length")
  p.add_argument("--data", default="", help="--protocol cifar10: the folder DIR/{train,test}/<class>/")
  p.add_argument("--dtype", default="", choices=("", "float32", "bfloat16"),
                 help="--protocol cifar10: every stage's model.dtype (bfloat16 on GPUs/TPUs; "
                      "the --cost hours assume it); '' = the configs' float32")
  p.add_argument("--cost", action="store_true",
                 help="--protocol cifar10: print its FLOPs and accelerator hours, run nothing")
  p.add_argument("--pretrain-steps", type=int, default=300, help="demo protocol only")
  p.add_argument("--linprobe-epochs", type=int, default=1, help="demo protocol only")
  p.add_argument("--finetune-steps", type=int, default=300, help="demo protocol only")
  p.add_argument("--smoke", action="store_true", help="test-size model, a few steps: checks the path")
  p.add_argument("--table-only", action="store_true")
  opts = p.parse_args()
  opts.pretrain_extra, opts.probe_extra, opts.finetune_extra = [], [], []
  if opts.protocol == "cifar10":
    if opts.cost:
      print(cost_table(protocol_cost(opts.arms.split(","), len(opts.seeds.split(",")),
                                     opts.baseline_seeds.count(",") + bool(opts.baseline_seeds))))
      return
    if not opts.data and not opts.table_only:
      raise SystemExit("--protocol cifar10 needs --data DIR: the image folder with "
                       "DIR/train/<class>/ and DIR/test/<class>/ (e.g. CIFAR-10 as JPEGs).")
    opts.data = str(pathlib.Path(opts.data).resolve()) if opts.data else ""
    if opts.out == p.get_default("out"):
      opts.out = str(ROOT / "runs" / "protocol_cifar10") + ("_smoke" if opts.smoke else "")
  elif opts.cost:
    raise SystemExit("--cost is for --protocol cifar10 (the demo's cost is a few CPU minutes).")
  elif opts.smoke:
    opts.pretrain_steps, opts.finetune_steps = 10, 10
    opts.pretrain_extra = ["--config.model.variant=test", "--config.batch_size=16",
                           "--config.eval.knn_train_examples=500",
                           "--config.eval.knn_test_examples=200", "--config.eval.recon_every_steps=0"]
    opts.probe_extra = ["--config.total_steps=10", "--config.eval.max_examples=200",
                         "--config.checkpoint_every_steps=10"]
    opts.finetune_extra = ["--config.model.variant=test", "--config.batch_size=16",
                           "--config.eval.max_examples=200"]
    if opts.out == p.get_default("out"):
      opts.out += "_smoke"
  out = pathlib.Path(opts.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(out / "jax_cache"),
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  # Seed-major: an interrupted benchmark leaves complete pairs (every arm of a seed).
  plan = [(a, int(s)) for s in opts.seeds.split(",") if s
          for a in opts.arms.split(",") if a != "random_init"]
  if "random_init" in opts.arms.split(",") or opts.baseline_seeds:
    plan += [("random_init", int(s)) for s in opts.baseline_seeds.split(",") if s]
  unknown = sorted({a for a, _ in plan} - set(ARMS))
  if unknown:
    raise SystemExit(f"--arms: unknown arm(s) {unknown}; known: {sorted(ARMS)}.")
  results_path = out / "results.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else []
  if not opts.table_only:
    t0 = time.perf_counter()
    for arm, seed in plan:
      r = run_one(arm, seed, out, opts, env)
      results = [x for x in results if (x["arm"], x["seed"]) != (arm, seed)] + [r]
      results_path.write_text(json.dumps(results, indent=2))
      print(json.dumps(r), flush=True)
    print(f"benchmark wall time {time.perf_counter() - t0:.0f} s", flush=True)
  md = table(results)
  (out / "table.md").write_text(md + "\n")
  print(md)


if __name__ == "__main__":
  main()
