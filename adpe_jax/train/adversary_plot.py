"""Pictures of the adversary at work (issue 30): WORKDIR/adversary.png and TensorBoard.

Two panels, drawn with Pillow (no plotting library):

* the trajectory: every adversary tensor's size over its bound (`adv_frac/<tensor>` of
  metrics.jsonl) against the step, one line per tensor, the bound a dashed line at 1; below
  it the loss gap on the training batch (`adv_loss_gap`: loss with the adversary minus
  without, same batch and masks) with its zero line;
* for a coordinate adversary, where it moves the masked tokens: the patch grid, one small
  grid per shift tensor (per layer for RPE, one for APE), the masked patches of one sample
  mask grey and an arrow from each one's centre by the shift, in patch units.  APE: the
  (column, row) shift added to the masked patches' sin-cos coordinates (spec 4.3); RPE: the
  (row, column) shift added to a masked query's relative offsets to every key (spec 4.5),
  drawn as the place the query is read from.

`AdversaryPlot` is the evaluator (name "adversary_plot"): at eval.recon_every_steps and at
the end it redraws from the records logged so far and the current adversary.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from adpe_jax import adversary as adv_lib
from adpe_jax import storage
from adpe_jax.train import reconstruction

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
_BG, _AXIS, _TEXT = (255, 255, 255), (60, 60, 60), (20, 20, 20)


def _font():
  return ImageFont.load_default()


def _polyline(draw, points, color, dashed=False, width=2):
  for (x0, y0), (x1, y1) in zip(points, points[1:]):
    if not dashed:
      draw.line([(x0, y0), (x1, y1)], fill=color, width=width)
      continue
    length = math.hypot(x1 - x0, y1 - y0)
    for k in range(0, int(length), 8):
      a, b = k / max(length, 1e-9), min((k + 4) / max(length, 1e-9), 1.0)
      draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)),
                 (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], fill=color, width=1)


def _panel(draw, box, series: dict, title: str, y_range, guides=()):
  """Lines of {label: [(step, value)]} in box (x0, y0, x1, y1); guides: y values dashed."""
  x0, y0, x1, y1 = box
  draw.rectangle(box, outline=_AXIS)
  draw.text((x0 + 4, y0 - 14), title, fill=_TEXT, font=_font())
  steps = [s for pts in series.values() for s, _ in pts] or [0, 1]
  s_lo, s_hi = min(steps), max(max(steps), min(steps) + 1)
  v_lo, v_hi = y_range
  if v_hi <= v_lo:
    v_hi = v_lo + 1.0

  def xy(step, value):
    return (x0 + (x1 - x0) * (step - s_lo) / (s_hi - s_lo),
            y1 - (y1 - y0) * (min(max(value, v_lo), v_hi) - v_lo) / (v_hi - v_lo))

  for g in guides:
    _polyline(draw, [xy(s_lo, g), xy(s_hi, g)], _AXIS, dashed=True)
  for i, (label, pts) in enumerate(series.items()):
    color = COLORS[i % len(COLORS)]
    if len(pts) > 1:
      _polyline(draw, [xy(s, v) for s, v in pts], color)
    elif pts:
      cx, cy = xy(*pts[0])
      draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=color)
  draw.text((x0 + 2, y1 + 2), f"step {s_lo:g}", fill=_TEXT, font=_font())
  draw.text((x1 - 70, y1 + 2), f"step {s_hi:g}", fill=_TEXT, font=_font())
  draw.text((x1 + 4, y0 - 4), f"{v_hi:.3g}", fill=_TEXT, font=_font())
  draw.text((x1 + 4, y1 - 8), f"{v_lo:.3g}", fill=_TEXT, font=_font())


def trajectory(records: list[dict], width: int = 720) -> np.ndarray:
  """uint8 (H, W, 3): adv_frac/<tensor> and adv_loss_gap of metrics records over steps."""
  fracs: dict[str, list] = {}
  gap = []
  for r in records:
    for k, v in r.items():
      if k.startswith("adv_frac/") and isinstance(v, (int, float)):
        fracs.setdefault(k[len("adv_frac/"):], []).append((r["step"], float(v)))
    if isinstance(r.get("adv_loss_gap"), (int, float)):
      gap.append((r["step"], float(r["adv_loss_gap"])))
  legend_rows = max(1, math.ceil(len(fracs) / 2))
  height = 40 + 200 + 50 + 120 + 30 + 14 * legend_rows
  img = Image.new("RGB", (width, height), _BG)
  draw = ImageDraw.Draw(img)
  top = max([v for pts in fracs.values() for _, v in pts] + [1.0]) * 1.05
  _panel(draw, (50, 40, width - 60, 240), fracs,
         "adversary size / its bound eps (adv_frac), per tensor; dashed: the bound", (0.0, top),
         guides=(1.0,))
  g = [v for _, v in gap] or [0.0]
  span = max(abs(min(g)), abs(max(g)), 1e-12)
  _panel(draw, (50, 290, width - 60, 410), {"adv_loss_gap": gap},
         "loss with the adversary minus without (training batch, same masks)",
         (-span * 1.1, span * 1.1), guides=(0.0,))
  for i, name in enumerate(fracs):
    x = 50 + (i % 2) * (width - 110) // 2
    y = 440 + 14 * (i // 2)
    draw.rectangle([x, y + 3, x + 10, y + 9], fill=COLORS[i % len(COLORS)])
    draw.text((x + 14, y), name, fill=_TEXT, font=_font())
  return np.asarray(img)


def displacement(shifts: dict[str, np.ndarray], grid: int, mask: np.ndarray, order: str,
                 cell: int = 22) -> np.ndarray:
  """uint8 (H, W, 3): per shift tensor a grid x grid patch grid, the masked patches
  (`mask` (grid*grid,) bool) grey, an arrow from each one's centre by the shift (patch
  units; `order` "col_row" for APE, "row_col" for RPE)."""
  names = list(shifts)
  cols = min(len(names), 4) or 1
  rows = max(1, math.ceil(len(names) / cols))
  pad, side, head = 16, grid * cell, 28
  img = Image.new("RGB", (cols * (side + 2 * pad), rows * (side + 2 * pad + head)), _BG)
  draw = ImageDraw.Draw(img)
  for i, name in enumerate(names):
    s = np.asarray(shifts[name], np.float64).reshape(-1)[:2]
    dcol, drow = (s[0], s[1]) if order == "col_row" else (s[1], s[0])
    ox = (i % cols) * (side + 2 * pad) + pad
    oy = (i // cols) * (side + 2 * pad + head) + pad + head
    draw.text((ox, oy - head), _short(name), fill=_TEXT, font=_font())
    draw.text((ox, oy - head / 2), f"row {drow:+.2f}, col {dcol:+.2f}", fill=_TEXT,
              font=_font())
    for p in range(grid * grid):
      r, c = divmod(p, grid)
      box = [ox + c * cell, oy + r * cell, ox + (c + 1) * cell - 1, oy + (r + 1) * cell - 1]
      draw.rectangle(box, fill=(200, 200, 200) if mask[p] else _BG, outline=(170, 170, 170))
    for p in np.flatnonzero(mask):
      r, c = divmod(int(p), grid)
      x0, y0 = ox + (c + 0.5) * cell, oy + (r + 0.5) * cell
      x1, y1 = x0 + dcol * cell, y0 + drow * cell
      draw.line([(x0, y0), (x1, y1)], fill=COLORS[3], width=2)
      draw.ellipse([x1 - 2, y1 - 2, x1 + 2, y1 + 2], fill=COLORS[3])
  return np.asarray(img)


def _short(name: str) -> str:
  """'blocks_2/attn/rpe_k/adv_shift' -> 'encoder block 2'; 'adv_token' -> 'encoder input'."""
  head = name.split("/")[0]
  for prefix, label in (("decoder_blocks_", "decoder block "), ("blocks_", "encoder block ")):
    if head.startswith(prefix):
      return label + head[len(prefix):]
  return "encoder input" if name == "adv_token" else name


def coordinate_shifts(adversary, pe: str) -> dict[str, np.ndarray]:
  """{tensor: (2,) shift} of a coordinate adversary (per block, unrolled names)."""
  flat = adv_lib.named_leaves(adv_lib.layout.to_unrolled(jax.device_get(adversary)))
  key = "adv_token" if pe == "ape" else "adv_shift"
  return {k: np.asarray(v) for k, v in flat.items() if k.endswith(key) and np.size(v) == 2}


def picture(records: list[dict], adversary, config, mask: np.ndarray) -> np.ndarray:
  """The trajectory, with the displacement grids below it for a coordinate adversary."""
  top = trajectory(records)
  if config.adversary.kind != "coordinate":
    return top
  grid = config.image_size // config.model.patch_size
  shifts = coordinate_shifts(adversary, config.model.pe)
  if not shifts:
    return top
  bottom = displacement(shifts, grid, mask, "col_row" if config.model.pe == "ape" else "row_col")
  width = max(top.shape[1], bottom.shape[1])
  canvas = np.full((top.shape[0] + bottom.shape[0], width, 3), 255, np.uint8)
  canvas[:top.shape[0], :top.shape[1]] = top
  canvas[top.shape[0]:, :bottom.shape[1]] = bottom
  return canvas


class AdversaryPlot:
  """The evaluator "adversary_plot": WORKDIR/adversary.png (and the image in TensorBoard)
  every eval.recon_every_steps and at the end, from metrics.jsonl's records up to the step
  and the current adversary.  Nothing for a run without an adversary."""
  name = "adversary_plot"
  key = ""

  def __init__(self, config, workdir, every_steps: int, read_records):
    self.config, self.workdir, self.read_records = config, workdir, read_records
    self.every_steps, self.at_end = every_steps, True
    grid = config.image_size // config.model.patch_size
    rng = np.random.default_rng(config.seed)  # one fixed sample mask, the run's ratio
    keep = int(grid * grid * (1 - config.mask_ratio))
    self.mask = np.ones(grid * grid, bool)
    self.mask[rng.permutation(grid * grid)[:keep]] = False

  def run(self, state, step: int) -> dict:
    image = picture(self.read_records(step), state.adversary, self.config, self.mask)
    if jax.process_index() == 0:
      reconstruction.save_png(image, storage.resolve(self.workdir) / "adversary.png")
    return {"adversary": image}
