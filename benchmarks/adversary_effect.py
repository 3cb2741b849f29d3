"""What the adversary changes in the encoder: attention locality and the held-out loss.

    python benchmarks/adversary_effect.py OUT                 # a study's OUT dir (adpe_vs_maeplus.py)
    python benchmarks/adversary_effect.py --out DIR WORKDIR...  # pretraining workdirs
    python benchmarks/adversary_effect.py --smoke ...         # 64 images: checks the path

Each pretraining workdir's newest complete checkpoint is read (`adpe_jax.weights.load`: its
params; its adversary by the same orbax partial restore) and its model rebuilt from its
config.json (`build_model`, unrolled blocks, the `xla` attention).  The MAE+ encoder then
runs on one fixed held-out set, the same for every run: the first --examples images of the
eval split (`data.eval_source`, eval transform, as the `heldout` evaluator), masks fixed by
noise from --mask-seed (`jax.random.uniform(key(seed), (N, L))`, the evaluator's
construction), once with the adversary at zero (true positions) and, for an AdPE run,
once more with its adversary as trained (the "what if" column).  The attention
probabilities of every encoder layer come from the model itself (the collection
`adpe_jax.models.vit.ATTENTION`).  Per layer, averaged over images, heads and query
patches:

  nbr   neighbour mass: the share of a patch query's attention on its (up to) 8 grid
        neighbours, out of its attention on all OTHER patches: the cls key is dropped and
        the query's own patch excluded (so a uniform attention over all tokens gives 8/48
        for an interior patch, 312/(49*48) = 0.133 averaged over a 7x7 grid; attention
        uniform over the 8 neighbours gives 1).  The cls query is not counted.
  dist  mean attention distance (as the ViT / MAE analyses): the Euclidean distance in
        patches between query and key patch centres, weighted by the attention over the
        patch keys (cls key dropped, the row renormalised, the query's own patch included
        at distance 0).
  loss  the pretraining loss on these images and masks (the held-out loss at
        --examples images; adversary on minus off is the held-out loss gap).

each separately for visible and masked query patches.  Runs are grouped by arm (from
their config: mae_plus_<pe> without adversary, adpe_<pe>_<coord|embed> with one, the
names of benchmarks/adpe_vs_maeplus.py) and paired by config.seed: the table gives each
arm's mean +- std over seeds, every other arm minus --baseline (same seed), and an AdPE
arm's adversary-on minus adversary-off (same run).  Output: a Markdown table on stdout and
in OUT/adversary_effect.md, everything per run and layer in OUT/adversary_effect.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from adpe_jax import data, layout, weights
from adpe_jax.checkpoint import rundir
from adpe_jax.checkpoint.checkpointer import read_meta, short_error, verify_checksums
from adpe_jax.checkpoint.rundir import STATE_ITEM
from adpe_jax.errors import CheckpointError
from adpe_jax.models.vit import ATTENTION
from adpe_jax.train.state import build_model

STATS = ("nbr", "dist")
QUERIES = ("visible", "masked", "all")
ROWS = [("nbr_visible", "neighbour mass, visible queries"),
        ("nbr_masked", "neighbour mass, masked queries"),
        ("dist_visible", "attention distance (patches), visible queries"),
        ("dist_masked", "attention distance (patches), masked queries"),
        ("loss", "loss on these images and masks")]
STUDY_ARMS = ("mae_plus_rpe", "adpe_rpe_coord", "adpe_ape_coord")  # adpe_vs_maeplus.py's
SUMMARY_ROWS = [("heldout_loss", "summary.json heldout_loss (adversary off)"),
                ("heldout_loss_adv", "summary.json heldout_loss_adv (adversary on)")]


# -- the metrics (numpy; tests/test_adversary_effect.py checks them by hand) ------------------

def grid_geometry(grid: int) -> tuple[np.ndarray, np.ndarray]:
  """(neighbours (L, L) bool: the 8-neighbourhood, Chebyshev distance 1, self excluded;
  distance (L, L): Euclidean distance of the patch centres in patches), L = grid**2,
  patches row-major as `mae.patchify`."""
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  dr = rows[:, None] - rows[None, :]
  dc = cols[:, None] - cols[None, :]
  neighbours = np.maximum(np.abs(dr), np.abs(dc)) == 1
  return neighbours, np.sqrt(dr ** 2 + dc ** 2).astype(np.float64)


def attention_metrics(probs, grid: int) -> dict[str, np.ndarray]:
  """probs (..., 1+L, 1+L), cls first, rows summing to 1 -> per patch query (..., L):
  "nbr" (neighbour mass over the other patches) and "dist" (mean attention distance over
  the patch keys); see the module docstring."""
  p = np.asarray(probs, np.float64)[..., 1:, 1:]     # patch queries x patch keys
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)  # the cls key dropped, renormalised
  neighbours, distance = grid_geometry(grid)
  others = 1.0 - np.diagonal(p, axis1=-2, axis2=-1)
  nbr = (p * neighbours).sum(-1) / np.maximum(others, 1e-30)
  return {"nbr": nbr, "dist": (p * distance).sum(-1)}


def uniform_reference(grid: int) -> dict[str, float]:
  """The metrics of an attention uniform over all 1 + L tokens (chance level)."""
  t = 1 + grid * grid
  m = attention_metrics(np.full((t, t), 1.0 / t), grid)
  return {k: float(v.mean()) for k, v in m.items()}


class Accumulator:
  """Sums of the per-query metrics per layer, for visible / masked / all query patches."""

  def __init__(self):
    self.sums: dict = {}
    self.counts: dict = {}

  def add(self, layer: int, probs, mask, grid: int) -> None:
    """probs (B, H, T, T); mask (B, L), True = masked."""
    m = attention_metrics(probs, grid)
    masked = np.broadcast_to(np.asarray(mask, bool)[:, None, :], m["nbr"].shape)
    for q, sel in (("visible", ~masked), ("masked", masked), ("all", np.ones_like(masked))):
      for s in STATS:
        key = (layer, f"{s}_{q}")
        self.sums[key] = self.sums.get(key, 0.0) + float(m[s][sel].sum())
        self.counts[key] = self.counts.get(key, 0) + int(sel.sum())

  def result(self) -> dict:
    layers = sorted({layer for layer, _ in self.sums})
    per_layer = [{k: (self.sums[(layer, k)] / self.counts[(layer, k)]
                      if self.counts[(layer, k)] else None)
                  for (l_, k) in self.sums if l_ == layer} for layer in layers]
    mean = {k: _mean([row[k] for row in per_layer]) for k in (per_layer[0] if per_layer else {})}
    return {"layers": per_layer, "mean": mean}


def _mean(values):
  values = [v for v in values if v is not None]
  return statistics.fmean(values) if values else None


# -- runs ------------------------------------------------------------------------------------

def arm_of(config: dict) -> str:
  """The study's arm name from a run's config (benchmarks/adpe_vs_maeplus.py ARMS)."""
  pe = config["model"]["pe"]
  kind = config["adversary"]["kind"]
  if kind == "none":
    return f"mae_plus_{pe}"
  return f"adpe_{pe}_{ {'coordinate': 'coord', 'embedding': 'embed'}.get(kind, kind)}"


def is_workdir(path: pathlib.Path) -> bool:
  return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def find_workdirs(paths) -> list[pathlib.Path]:
  """Pretraining workdirs: each path itself, or a study's OUT/<arm>/seed<S>/pretrain."""
  found = []
  for p in map(pathlib.Path, paths):
    if is_workdir(p):
      found.append(p)
      continue
    runs = sorted(d for d in p.glob("*/seed*/pretrain") if is_workdir(d))
    empty = [d for d in runs if rundir.newest_checkpoint(d) is None]
    if empty:  # a study still under way: its newest runs have no checkpoint yet
      print(f"note: skipped {len(empty)} run(s) without a complete checkpoint: "
            + ", ".join(map(str, empty)), flush=True)
    runs = [d for d in runs if d not in empty]
    if not runs:
      raise SystemExit(f"{p} is neither a pretraining workdir (config.json and checkpoints/) "
                       f"nor a study directory with <arm>/seed<S>/pretrain workdirs; pass one "
                       f"of those.")
    found += runs
  return found


def read_adversary(step_dir) -> dict:
  """The adversary of the checkpoint in `step_dir` (orbax partial restore, as
  `checkpointer.read_params` reads the params), checked against its checksums; {} when
  the run has none."""


  path = pathlib.Path(str(step_dir))
  try:
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path / STATE_ITEM)
    tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
    sub = tree.get("adversary") if isinstance(tree, dict) else None
    if not sub or not jax.tree.leaves(sub):
      return {}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), sub)
    args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=device), sub)
    adversary = checkpointer.restore(path / STATE_ITEM, args=ocp.args.PyTreeRestore(
        item={"adversary": abstract}, restore_args={"adversary": args},
        partial_restore=True))["adversary"]
  except Exception as e:
    raise CheckpointError(f"the adversary of checkpoint {path} could not be read "
                          f"({short_error(e)}).") from e
  verify_checksums(path, {"adversary": adversary}, read_meta(path))
  return adversary


class HeldoutSet:
  """The fixed images and masks, loaded once per (source, split, image size, grid)."""

  def __init__(self, examples: int, mask_seed: int, split: str, chunk: int):
    self.examples, self.mask_seed, self.split, self.chunk = examples, mask_seed, split, chunk
    self._cache: dict = {}

  def get(self, config, num_patches: int):


    key = (config.data.source, self.split, config.image_size, num_patches)
    if key not in self._cache:
      source = data.eval_source(config, self.split)
      n = min(self.examples, len(source))
      chunk = min(self.chunk, n)
      n -= n % chunk
      if n < 1:
        raise SystemExit(f"--examples={self.examples}: the {self.split} split of "
                         f"{config.data.source} gives no images.")
      images, _ = data.labelled_arrays(source, config.image_size, n)
      noise = np.asarray(jax.random.uniform(jax.random.key(self.mask_seed), (n, num_patches)))
      self._cache[key] = (images, noise, chunk)
    return self._cache[key]


def measure(workdir: pathlib.Path, heldout: HeldoutSet) -> dict:
  """One run: its metrics with the adversary off and, if it has one, on."""


  raw = rundir.read_config(workdir)
  if raw is None:
    raise SystemExit(f"{workdir}/config.json is missing or unreadable; pass a pretraining "
                     f"workdir.")
  config = ml_collections.ConfigDict(raw)
  w = weights.load(str(workdir))
  params = layout.to_unrolled(dict(w.params))
  adversary = layout.to_unrolled(dict(read_adversary(w.source)))
  model = build_model(config).clone(scan_blocks=False, remat="none", attention_impl="xla")
  images, noise, chunk = heldout.get(config, model.num_patches)

  @jax.jit
  def forward(params, adv, x, nz):
    (loss, _, mask), state = model.apply(
        {"params": params, "adversary": adv}, x, noise=nz, rngs={"masking": jax.random.key(0)},
        mutable=[ATTENTION])
    probs = [state[ATTENTION][f"blocks_{i}"]["attn"]["probs"][0] for i in range(model.depth)]
    return loss, mask, probs

  def run(adv) -> dict:
    acc, losses = Accumulator(), []
    for i in range(0, len(images), chunk):
      loss, mask, probs = forward(params, adv, jnp.asarray(images[i:i + chunk]),
                                  jnp.asarray(noise[i:i + chunk]))
      losses.append(float(loss))
      for layer, p in enumerate(probs):
        acc.add(layer, np.asarray(p), np.asarray(mask) > 0, model.grid)
    out = acc.result()
    out["mean"]["loss"] = out["loss"] = statistics.fmean(losses)  # equal masked counts per chunk
    return out

  step = int(pathlib.Path(w.source).name)
  summary = rundir.read_summary(workdir)
  result = {"arm": arm_of(raw), "seed": int(raw.get("seed", 0)), "workdir": str(workdir),
            "step": step, "examples": len(images), "grid": model.grid, "total_steps": raw.get("total_steps"),
            "finished": summary.get("status") == "finished",
            "summary": {k: summary.get(k) for k, _ in SUMMARY_ROWS},
            "off": run(jax.tree.map(jnp.zeros_like, adversary))}
  has_adv = bool(jax.tree.leaves(adversary))
  result["adv"] = run(adversary) if has_adv else None
  result["adv_norm"] = ({"/".join(str(getattr(k, "key", k)) for k in path): float(
      np.linalg.norm(np.asarray(v))) for path, v in jax.tree_util.tree_leaves_with_path(adversary)}
      if has_adv else {})
  return result


# -- the table -------------------------------------------------------------------------------

def _num(x: float) -> str:
  return f"{x:.4f}" if x == 0 or abs(x) >= 1e-3 else f"{x:.2e}"


def _fmt(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  mean = statistics.fmean(values)
  if len(values) == 1:
    return _num(mean)
  return f"{_num(mean)} ± {_num(statistics.stdev(values))}"


def paired(results: list[dict], baseline: str) -> dict:
  """{arm: {metric: {"diff": [per seed], "adv_minus_off": [per seed]}, "layers": ...}}."""
  base = {r["seed"]: r for r in results if r["arm"] == baseline}
  out = {}
  for arm in sorted({r["arm"] for r in results}):
    runs = [r for r in results if r["arm"] == arm]
    entry = {"seeds": sorted(r["seed"] for r in runs), "metrics": {}, "layers": []}
    keys = [k for k, _ in ROWS] + [k for k, _ in SUMMARY_ROWS]
    depth = max(len(r["off"]["layers"]) for r in runs)
    for k in keys:
      vals = [_value(r, "off", k) for r in runs]
      diffs = ([_value(r, "off", k) - _value(base[r["seed"]], "off", k) for r in runs
                if arm != baseline and r["seed"] in base
                and None not in (_value(r, "off", k), _value(base[r["seed"]], "off", k))])
      whatif = [_value(r, "adv", k) - _value(r, "off", k) for r in runs
                if r["adv"] is not None and k in dict(ROWS)]
      entry["metrics"][k] = {"values": vals, "minus_baseline": diffs, "adv_minus_off": whatif}
    for layer in range(depth):
      row = {}
      for k, _ in ROWS[:-1]:
        row[k] = [r["off"]["layers"][layer][k] - base[r["seed"]]["off"]["layers"][layer][k]
                  for r in runs if arm != baseline and r["seed"] in base]
        row[k + "_adv_minus_off"] = [r["adv"]["layers"][layer][k] - r["off"]["layers"][layer][k]
                                     for r in runs if r["adv"] is not None]
      entry["layers"].append(row)
    out[arm] = entry
  return out


def _value(r: dict, cond: str, key: str):
  if key in dict(SUMMARY_ROWS):
    return r["summary"].get(key) if cond == "off" else None
  return None if r.get(cond) is None else r[cond]["mean"].get(key)


def table(results: list[dict], pairs: dict, baseline: str, settings: dict) -> str:
  order = [baseline] + [a for a in STUDY_ARMS if a != baseline]
  arms = sorted(pairs, key=lambda a: (order.index(a) if a in order else len(order), a))
  others = [a for a in arms if a != baseline]
  adv_arms = [a for a in arms if any(r["adv"] is not None for r in results if r["arm"] == a)]
  ref = settings["uniform"]
  steps = sorted({r["step"] for r in results})
  lines = [
      f"Encoder attention on {settings['images']} {settings['split']}-split images, masks from "
      f"seed {settings['mask_seed']}, adversary off (true positions) unless said; "
      f"checkpoints at step {', '.join(map(str, steps))}.  Mean over the encoder's "
      f"{settings['depth']} layers; mean ± std over seeds; differences paired by seed.  "
      f"Neighbour mass: share of a patch query's attention on its 8 grid neighbours out of "
      f"all other patches (cls key dropped, self excluded; uniform attention: "
      f"{ref['nbr']:.3f}).  Distance: attention-weighted distance in patches over the patch "
      f"keys (cls dropped, renormalised; uniform: {ref['dist']:.3f}).",
      "",
      "| metric | " + " | ".join(f"{a} (n={len(pairs[a]['seeds'])})" for a in arms)
      + "".join(f" | {a} − {baseline}" for a in others)
      + "".join(f" | {a}: adversary on − off" for a in adv_arms) + " |",
      "|---|" + "---|" * (len(arms) + len(others) + len(adv_arms))]
  for key, label in ROWS + SUMMARY_ROWS:
    cells = [_fmt(pairs[a]["metrics"][key]["values"]) for a in arms]
    cells += [_fmt(pairs[a]["metrics"][key]["minus_baseline"]) for a in others]
    cells += [_fmt(pairs[a]["metrics"][key]["adv_minus_off"]) for a in adv_arms]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  if others:
    short = {"nbr_visible": "Δnbr vis", "nbr_masked": "Δnbr masked", "dist_visible": "Δdist vis",
             "dist_masked": "Δdist masked"}
    lines += ["", f"Per layer, minus {baseline} (same seed), adversary off:", "",
              "| layer | " + " | ".join(f"{a} {s}" for a in others for s in short.values()) + " |",
              "|---|" + "---|" * (len(others) * len(short))]
    for layer in range(settings["depth"]):
      cells = [_fmt(pairs[a]["layers"][layer][k]) if layer < len(pairs[a]["layers"]) else "-"
               for a in others for k in short]
      lines.append(f"| {layer} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("paths", nargs="+", help="a study's OUT dir and/or pretraining workdirs")
  p.add_argument("--out", default=None, help="where the .md and .json go (default: the "
                 "study dir, when one is given)")
  p.add_argument("--examples", type=int, default=256)
  p.add_argument("--mask-seed", type=int, default=0)
  p.add_argument("--split", default="test")
  p.add_argument("--chunk", type=int, default=64)
  p.add_argument("--baseline", default="mae_plus_rpe")
  p.add_argument("--smoke", action="store_true", help="64 images: checks the path quickly")
  opts = p.parse_args(argv)
  if opts.smoke:
    opts.examples = min(opts.examples, 64)
  out = opts.out
  if out is None:
    studies = [q for q in map(pathlib.Path, opts.paths) if not is_workdir(q)]
    if not studies:
      raise SystemExit("--out is needed when only workdirs are given (no study directory).")
    out = studies[0]
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  workdirs = find_workdirs(opts.paths)
  heldout = HeldoutSet(opts.examples, opts.mask_seed, opts.split, opts.chunk)
  t0 = time.perf_counter()
  results = []
  for wd in workdirs:
    r = measure(wd, heldout)
    print(f"{r['arm']} seed {r['seed']} step {r['step']}: "
          + json.dumps({k: round(v, 5) for k, v in r["off"]["mean"].items() if v is not None}),
          flush=True)
    results.append(r)
  unfinished = [r["workdir"] for r in results if not r["finished"]]
  if unfinished:
    print(f"note: {len(unfinished)} run(s) not finished, measured at their newest checkpoint: "
          + ", ".join(unfinished), flush=True)
  seen = {}
  for r in results:
    if (r["arm"], r["seed"]) in seen:
      raise SystemExit(f"two runs of arm {r['arm']} with seed {r['seed']}: {seen[r['arm'], r['seed']]} "
                       f"and {r['workdir']}; pass one of each.")
    seen[r["arm"], r["seed"]] = r["workdir"]
  first = results[0]["grid"]
  settings = {"images": results[0]["examples"],
              "split": opts.split, "mask_seed": opts.mask_seed, "baseline": opts.baseline,
              "depth": max(len(r["off"]["layers"]) for r in results),
              "uniform": uniform_reference(first), "grid": first,
              "seconds": round(time.perf_counter() - t0, 1)}
  pairs = paired(results, opts.baseline)
  md = table(results, pairs, opts.baseline, settings)
  (out / "adversary_effect.md").write_text(md + "\n")
  (out / "adversary_effect.json").write_text(json.dumps(
      {"settings": settings, "runs": results, "paired": pairs}, indent=2))
  print(md)
  print(f"wrote {out / 'adversary_effect.md'} and {out / 'adversary_effect.json'} "
        f"({settings['seconds']} s)", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
