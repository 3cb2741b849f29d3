#!/usr/bin/env bash
# TPU pod slice pretraining: the same command on every worker of the slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/vitb_rpe_coord.py gs://BUCKET/runs/vitb_rpe_coord \
#       [--config.model.dtype=bfloat16 ...]
#
# Each worker runs one process over its local chips; jax.distributed.initialize() finds
# the slice's topology by itself (TPU_WORKER_HOSTNAMES). The repository must be present
# at the same path on every worker (e.g. `gcloud compute tpus tpu-vm scp --worker=all`),
# with `pip install -e .` done once (plus jax[tpu]). The workdir must be shared (GCS).
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [overrides...]}
zone=${2:?zone}
config=${3:?config}
workdir=${4:?workdir}
shift 4
repo=${REPO_DIR:-adpe_jax}
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd $repo && python3 -m adpe_jax.main --config=$config --workdir=$workdir $*"
