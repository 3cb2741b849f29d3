#!/usr/bin/env bash
# Per-task wrapper: launch/slurm_gpu.sh runs `srun ... bash launch/slurm_task.sh COMMAND...`,
# so this runs once per SLURM task, on its node.  It chooses the GPUs the task's process
# uses, then execs COMMAND.
#
# JAX's SLURM auto-detection assumes one process per GPU: it restricts each process to GPU
# number SLURM_LOCALID (jax.distributed.initialize sets local_device_ids=[SLURM_LOCALID]).
# JAX_LOCAL_DEVICE_IDS, read by jax.distributed.initialize before that, overrides it:
#   PROCESS_PER=node  the one task per node uses all its GPUs: JAX_LOCAL_DEVICE_IDS=0,...,n-1
#   PROCESS_PER=gpu   task i uses one GPU:
#     - SLURM bound one GPU to the task (--gpus-per-task=1): JAX_LOCAL_DEVICE_IDS=0;
#     - the task sees all the node's GPUs (--gres=gpu:8): JAX_LOCAL_DEVICE_IDS=i, and every GPU
#       stays visible to CUDA, so NCCL can use NVLink/P2P between the node's processes (it
#       cannot when each process sees only its own GPU: NVIDIA/nccl#1066);
#     - ISOLATE_GPUS=1 instead narrows CUDA_VISIBLE_DEVICES to the i-th GPU (JAX_LOCAL_DEVICE_IDS=0).
#   PROCESS_PER=cpu   no GPU: any number of tasks per node, each on its CPU devices; nothing
#                     is chosen here.
# A JAX_LOCAL_DEVICE_IDS already set in the environment is kept.
set -euo pipefail

if (( $# == 0 )); then
  echo "usage: launch/slurm_task.sh COMMAND [ARGS...]   (run by launch/slurm_gpu.sh under srun)" >&2
  exit 2
fi

local_id=${SLURM_LOCALID:-0}
visible=()
if [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != NoDevFiles ]]; then
  IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
fi

count_gpus() {  # GPUs this task can see; 0 if unknown
  if (( ${#visible[@]} > 0 )); then
    echo "${#visible[@]}"
  elif [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif command -v nvidia-smi >/dev/null; then
    nvidia-smi -L | grep -c '^GPU' || true
  else
    echo 0
  fi
}

use_devices() {  # $1: comma-separated device ordinals for JAX, unless already chosen
  export JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-$1}
}

if [[ ${PROCESS_PER:-node} == cpu ]]; then
  exec "$@"
fi
n=$(count_gpus)
case ${PROCESS_PER:-node} in
  node)
    if (( local_id != 0 )); then
      echo "error: $(hostname) runs more than one task (SLURM_LOCALID=${local_id}) with PROCESS_PER=node;" \
           "submit with --ntasks-per-node=1, or use --per-gpu" >&2
      exit 2
    fi
    if (( n > 0 )); then
      use_devices "$(seq -s, 0 $(( n - 1 )))"
    else
      echo "warning: $(hostname): no GPU found (CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE, nvidia-smi)" >&2
    fi
    ;;
  gpu)
    if (( ${#visible[@]} == 1 )); then
      use_devices 0
    else
      if (( n > 0 && local_id >= n )); then
        echo "error: $(hostname): task SLURM_LOCALID=${local_id} but only ${n} GPUs on the node;" \
             "use --ntasks-per-node <= GPUs per node" >&2
        exit 2
      fi
      if [[ ${ISOLATE_GPUS:-0} == 1 ]]; then
        if (( ${#visible[@]} > 0 )); then
          export CUDA_VISIBLE_DEVICES=${visible[local_id]}
        else
          export CUDA_VISIBLE_DEVICES=$local_id
        fi
        use_devices 0
      else
        use_devices "$local_id"
      fi
    fi
    ;;
  *)
    echo "error: PROCESS_PER=${PROCESS_PER@Q}; use node, gpu or cpu" >&2
    exit 2
    ;;
esac

exec "$@"
