#!/usr/bin/env bash
# The fused iRPE attention kernel on a GPU, end to end in under 8 minutes, no network:
#   1. correctness: pallas vs the xla reference on the device, forward and every
#      gradient, T 50/197/257, head_dim 64/80, float32/bfloat16  (rpe_attention.py --check)
#   2. the kernel benchmark: fwd+bwd time and memory, pallas vs xla, at (256, 12, 50, 64)
#      and (64, 12, 197, 64), bf16                                  (rpe_attention.py)
#   3. the ViT-B/16 RPE-coordinate pretraining step, bf16, 64 images x 4 crops per GPU,
#      data parallel over all GPUs (the kernel under shard_map when there are several):
#      img/s and MFU against the card's bf16 peak, xla vs pallas    (rpe_train_step.py)
#   4. attention_impl=auto, resolved inside a step traced on the mesh of all GPUs (as the
#      train step is): must be pallas on compute capability >= 8.0
# then a summary table.  Each stage has its own time limit and its JSON is written row by
# row, so a stage that fails or hangs still leaves what it measured.
#
# Usage (from anywhere):  bash benchmarks/gpu_check.sh
#   OUT=/some/dir   where the logs, JSON and summary go (default: a fresh temp dir)
#   PYTHON=python3  the interpreter (the image's own: jax[cuda], flax, optax, numpy;
#                   tensorflow, tfds, clu and ml_collections are not needed)
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2
unset JAX_PLATFORMS   # the GPU, not a CPU left over from a test environment

echo "gpu_check: output in $OUT"
{
  date -u
  git -C "$ROOT" rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__); print(jax.devices())" 2>&1
} | tee "$OUT/environment.txt"

stage() {  # stage NAME LIMIT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/stages.txt"
}

stage check 150 "$PY" benchmarks/rpe_attention.py --check --json "$OUT/check.json"
stage kernel 120 "$PY" benchmarks/rpe_attention.py --dtype bfloat16 --iters 20 \
  --json "$OUT/kernel.json"
stage train_step 210 "$PY" benchmarks/rpe_train_step.py --dtype bfloat16 --batch 64 \
  --steps 10 --impls xla,pallas --json "$OUT/train_step.json"
stage auto 90 "$PY" -c "
import jax, jax.numpy as jnp
from adpe_jax import parallel
from adpe_jax.kernels import attention
mesh, got = parallel.make_mesh(), []
def traced(x):
  got.append(attention.resolve_impl('auto'))
  return x
jax.jit(parallel.under_mesh(traced, mesh))(jnp.ones(2))
print('auto on', dict(mesh.shape), '->', got[0])
raise SystemExit(0 if got[0] == 'pallas' else 1)"

"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, os, sys
out = sys.argv[1]

def load(name):
  try:
    with open(os.path.join(out, name)) as f:
      return json.load(f)
  except Exception as e:  # noqa: BLE001
    return {"missing": repr(e)}

stages = open(os.path.join(out, "stages.txt")).read().split("\n") if os.path.exists(
    os.path.join(out, "stages.txt")) else []
check, kern, step = load("check.json"), load("kernel.json"), load("train_step.json")
device = check.get("device") or kern.get("device") or step.get("device") or "?"
print(f"\n## gpu_check summary ({device}, jax {check.get('jax') or kern.get('jax') or '?'})\n")
print("| stage | item | result | target |")
print("|---|---|---|---|")
for row in check.get("check", []):
  item = f"T={row['T']} d={row['d']} {row['dtype']} {row['rpe']}"
  res = (f"max rel err {row['max_rel_err']:.1e}" if "max_rel_err" in row
         else "ERROR " + row.get("error", "")[:80])
  print(f"| check | {item} | {'OK' if row['ok'] else 'FAIL'}: {res} | f32 1e-4, bf16 2e-2 |")
if "check" not in check:
  print(f"| check | - | no result ({check.get('missing', 'see check.log')}) | |")
rows = kern.get("bench", [])
for name in ("pretrain", "finetune"):
  by = {r["impl"]: r for r in rows if r.get("name") == name}
  x, p = by.get("xla"), by.get("pallas")
  if x is None and p is None:
    print(f"| kernel | {name} | no result (see kernel.log) | |")
    continue
  def ms(r):
    return "-" if r is None or "ms" not in r else f"{r['ms']:.2f} ms"
  def mib(r):
    return "-" if r is None or not r.get("alloc_bytes") else f"{r['alloc_bytes'] / 2**20:.0f} MiB"
  shape = tuple((x or p).get("shape", []))
  res = f"xla {ms(x)} / {mib(x)}; pallas {ms(p)} / {mib(p)}"
  if p is not None and "speedup_vs_xla" in p:
    mem = p.get("memory_vs_xla")
    res += f"; {p['speedup_vs_xla']:.2f}x faster, memory {'-' if mem is None else f'{mem:.2f}x'}"
  elif p is not None and "error" in p:
    res += "; pallas ERROR " + p["error"][:80]
  print(f"| kernel | {name} {shape} | {res} | >= 2x faster, <= 1x memory |")
for r in step.get("rows", []):
  if "error" in r:
    print(f"| train step | ViT-B RPE-coord {r['impl']} | ERROR {r['error'][:80]} | |")
    continue
  mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
  print(f"| train step | ViT-B RPE-coord bf16 {r['impl']} x {r.get('devices', 1)} | "
        f"{r['img_per_s']:.0f} img/s, "
        f"{r['ms_per_step']:.0f} ms/step, MFU {mfu} | MFU >= 40% |")
if not step.get("rows"):
  print("| train step | - | no result (see train_step.log) | |")
auto = [s for s in stages if s.startswith("auto ")]
print(f"| auto | resolved in a traced step | {auto[0] if auto else 'no result'} | rc=0: pallas |")
print("\nstages: " + "; ".join(s for s in stages if s))
EOF
echo "gpu_check: done; $OUT/summary.md"
