#!/usr/bin/env bash
# Multi-node GPU pretraining under SLURM.  Submit from the repository root (on a shared
# filesystem, with its .venv), see launch/README.md:
#
#   one process per node, all its GPUs (default):
#     sbatch --nodes=4 --gres=gpu:8 --ntasks-per-node=1 --cpus-per-task=32 launch/slurm_gpu.sh \
#         configs/vitb_rpe.py /shared/runs/vitb_rpe [--config.model.dtype=bfloat16 ...]
#   one process per GPU (--per-gpu, or PROCESS_PER=gpu):
#     sbatch --nodes=4 --gres=gpu:8 --ntasks-per-node=8 --cpus-per-task=4 launch/slurm_gpu.sh \
#         --per-gpu configs/vitb_rpe.py /shared/runs/vitb_rpe [...]
#   (--gpus-per-task=1 instead of --gres=gpu:8 works too, but then each process sees only its
#    own GPU and NCCL cannot use NVLink between the processes of a node: NVIDIA/nccl#1066.)
#   CPUs only (--cpu, or PROCESS_PER=cpu): any number of tasks per node, each on the CPU
#   devices XLA_FLAGS gives it (gloo collectives); no GPU choice, no GPU/NCCL settings.  What
#   the cluster tests run (tests/test_cluster.py, on a one-node SLURM they start themselves):
#     sbatch --ntasks=2 --ntasks-per-node=2 launch/slurm_gpu.sh --cpu configs/vitb_ape.py:smoke DIR
#
# jax.distributed.initialize() takes the coordinator (first node), process count and id
# from SLURM's environment.  launch/slurm_task.sh, run by srun once per task, gives each
# process its GPUs (JAX on SLURM would otherwise give each process only GPU number
# SLURM_LOCALID: with one task per node, one GPU per node).
# config.batch_size is the GLOBAL number of images per optimizer step.  The workdir must be
# on a shared filesystem (or gs://); re-submitting the same command resumes.
#
# Environment (all optional):
#   DRY_RUN=1            print the environment and the srun command instead of running it
#   PROCESS_PER          node | gpu | cpu  [node]
#   ISOLATE_GPUS=1       per GPU: narrow CUDA_VISIBLE_DEVICES to the task's GPU (see slurm_task.sh)
#   REPO_DIR             the checkout [this script's checkout; under sbatch: the submit directory]
#   PYTHON               [REPO_DIR/.venv/bin/python if present, else python3]
#   SRUN_ARGS            extra srun words, e.g. "--mpi=none" or "--container-image=..."
#   XLA_FLAGS, XLA_PYTHON_CLIENT_MEM_FRACTION, JAX_COMPILATION_CACHE_DIR, NCCL_DEBUG: defaults
#                        below; a value set in the environment wins, an empty one turns it off.
#
#SBATCH --job-name=adpe
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=TERM@300
#   (SIGTERM to every task 5 minutes before the time limit: all processes stop at one agreed
#    step, save a checkpoint and exit 0 with status "preempted"; re-submit to continue.)
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/slurm_gpu.sh [--per-node|--per-gpu|--cpu] CONFIG WORKDIR [--config.a.b=value ...]
  e.g. sbatch --nodes=4 --gres=gpu:8 --ntasks-per-node=1 launch/slurm_gpu.sh \
           configs/vitb_rpe.py /shared/runs/vitb_rpe --config.batch_size=4096
  environment: DRY_RUN=1 PROCESS_PER=node|gpu|cpu ISOLATE_GPUS=1 REPO_DIR PYTHON SRUN_ARGS XLA_FLAGS
               XLA_PYTHON_CLIENT_MEM_FRACTION JAX_COMPILATION_CACHE_DIR NCCL_DEBUG
EOF
}

# Arguments first: nothing below runs on a bad command line.
process_per=${PROCESS_PER:-node}
while (( $# )); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --per-node) process_per=node; shift ;;
    --per-gpu) process_per=gpu; shift ;;
    --cpu) process_per=cpu; shift ;;
    -*) echo "error: unknown option ${1}" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done
if (( $# < 2 )); then
  usage >&2
  exit 2
fi
if [[ $process_per != node && $process_per != gpu && $process_per != cpu ]]; then
  echo "error: PROCESS_PER=${process_per@Q}; use node, gpu or cpu" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2

# The checkout.  Under sbatch this file runs from a copy in SLURM's spool directory, so
# its own location is useless there: fall back to the directory sbatch was called from.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${REPO_DIR:-} ]]; then
  repo=$REPO_DIR
elif [[ -f $here/adpe_jax/main.py ]]; then
  repo=$here
else
  repo=${SLURM_SUBMIT_DIR:-$PWD}
fi
if [[ ! -f $repo/adpe_jax/main.py || ! -f $repo/launch/slurm_task.sh ]]; then
  echo "error: ${repo@Q} is not an adpe_jax checkout; submit from the repository root or set REPO_DIR" >&2
  exit 2
fi
cd "$repo"
if [[ -n ${PYTHON:-} ]]; then
  python=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  python=$PWD/.venv/bin/python
else
  python=python3
fi

# --- XLA / JAX ---------------------------------------------------------------------------
# Latency-hiding scheduler: overlaps the gradient all-reduce (and, with mesh.fsdp > 1, the
# parameter all-gathers / reduce-scatters) with compute; the main multi-node GPU flag.
# For FSDP over many nodes, larger collective combining can help, e.g. append
#   --xla_gpu_all_gather_combine_threshold_bytes=134217728
#   --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
# (XLA aborts on flags it does not know: check them against your jaxlib version.)
# (CPU mode: XLA_FLAGS, e.g. --xla_force_host_platform_device_count=N, is left as it is.)
if [[ $process_per == cpu ]]; then
  export JAX_PLATFORMS=${JAX_PLATFORMS-cpu}
else
  export XLA_FLAGS=${XLA_FLAGS-"--xla_gpu_enable_latency_hiding_scheduler=true"}
  # JAX preallocates this fraction of each GPU's memory (default 0.75); training wants more.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION-0.90}
fi
# Persistent compilation cache on the shared filesystem: every process and every re-submit
# (resume, requeue after preemption) reuses the compiled train step instead of recompiling.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR-$repo/.jax_cache}

# --- NCCL ---------------------------------------------------------------------------------
# WARN prints NCCL's own reason when a collective fails (INFO also shows the chosen
# transport: check that it says NET/IB, not NET/Socket, on an InfiniBand cluster).
if [[ $process_per != cpu ]]; then
  export NCCL_DEBUG=${NCCL_DEBUG-WARN}
fi
# Interconnect settings are cluster-specific; NCCL's auto-detection is usually right.
# Set them in the environment before sbatch only where your admins say so, e.g.:
#   NCCL_SOCKET_IFNAME=ib0     the interface for NCCL's bootstrap / socket traffic
#   NCCL_IB_HCA=mlx5           which InfiniBand adapters to use
#   NCCL_NET_GDR_LEVEL=PHB     GPUDirect RDMA distance
# (srun passes the whole environment on to every task.)

# The task wrapper reads this to choose each process's GPUs.
export PROCESS_PER=$process_per
# Some Slurm versions (from 22.05) do not pass sbatch's --cpus-per-task on to srun; without
# it the single task per node may be bound to one core, starving the input pipeline.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
  export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
fi

read -r -a srun_extra <<< "${SRUN_ARGS:-}"
# --kill-on-bad-exit=1: one task failing ends the others at once (rather than after
# distributed.heartbeat_timeout_seconds).  slurm_task.sh picks the task's GPUs, then execs.
cmd=(srun --kill-on-bad-exit=1 "${srun_extra[@]}" bash "$repo/launch/slurm_task.sh"
     "$python" -m adpe_jax.main "--config=${config}" "--workdir=${workdir}" "$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  for name in XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION JAX_COMPILATION_CACHE_DIR NCCL_DEBUG \
              JAX_PLATFORMS PROCESS_PER ISOLATE_GPUS SRUN_CPUS_PER_TASK; do
    if [[ -n ${!name+set} ]]; then
      printf 'export %s=%q\n' "$name" "${!name}"
    fi
  done
  printf 'cd %q\n' "$repo"
  out=$(printf '%q ' "${cmd[@]}")
  printf '%s\n' "${out% }"
  exit 0
fi
if ! command -v srun >/dev/null; then
  echo "error: srun not found; submit this script with sbatch (or run it inside salloc)" >&2
  exit 127
fi
exec "${cmd[@]}"
