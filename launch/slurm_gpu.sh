#!/usr/bin/env bash
# Multi-node GPU pretraining under SLURM: one process per node, all its GPUs local.
#
#   sbatch --nodes=4 --gres=gpu:8 --ntasks-per-node=1 launch/slurm_gpu.sh \
#       configs/vitb_rpe_coord.py runs/vitb_rpe_coord [--config.model.dtype=bfloat16 ...]
#
# JAX's own distributed runtime takes the coordinator, process count and process id from
# SLURM's environment (adpe_jax.parallel.maybe_initialize_distributed calls
# jax.distributed.initialize() when SLURM_NTASKS > 1). batch_size in the config is the
# GLOBAL number of images per optimizer step; the workdir must be on a shared filesystem
# (checkpoints are written collectively; re-submitting the same command resumes).
#SBATCH --job-name=adpe
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
config=${1:?usage: launch/slurm_gpu.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/slurm_gpu.sh CONFIG WORKDIR [overrides...]}
shift 2
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
srun --kill-on-bad-exit=1 "$PY" -m adpe_jax.main --config="$config" --workdir="$workdir" "$@"
