#!/usr/bin/env bash
# TPU pod slice pretraining: the same command on every worker of an existing slice,
# through `gcloud compute tpus tpu-vm ssh --worker=all`.  See launch/README.md.
#
#   launch/tpu_pod.sh --install TPU_NAME ZONE     # once per slice: copy this checkout, pip install
#   launch/tpu_pod.sh TPU_NAME ZONE configs/vitb_rpe_coord.py gs://BUCKET/runs/vitb_rpe_coord \
#       [--config.model.dtype=bfloat16 ...]       # run (re-run the same command to resume)
#   launch/tpu_pod.sh --stop TPU_NAME ZONE        # SIGTERM on every worker: one agreed step, save, exit
#
# Each worker runs one process over its local chips; jax.distributed.initialize() (no
# arguments) finds the slice's topology by itself.  config.batch_size is the GLOBAL number
# of images per optimizer step.  The workdir must be shared by all workers: gs://...
#
# Every argument reaches the workers' shell quoted (printf %q): overrides may contain spaces
# or quotes.  The workers' login shell must be bash (it is on TPU VM images).
#
# Environment (all optional):
#   DRY_RUN=1                  print the commands (shell-quoted) instead of running them
#   PROJECT                    gcloud --project
#   GCLOUD_SSH_ARGS            extra words for `gcloud ... ssh/scp`, e.g. "--tunnel-through-iap"
#   REPO_DIR                   the checkout on the workers, relative to $HOME or absolute [adpe_jax]
#   REMOTE_PYTHON              the workers' python, a remote shell word (~ allowed) [python3]
#   JAX_COMPILATION_CACHE_DIR  persistent compilation cache [REPO_DIR/.jax_cache on each worker];
#                              gs://BUCKET/jax_cache shares it across workers and re-created slices
#   PASS_ENV                   names of local variables to forward, e.g. "LIBTPU_INIT_ARGS XLA_FLAGS"
#   DETACH=1                   start the run in the background (nohup setsid) on each worker, so it
#                              survives the ssh session; output goes to LOG_FILE [adpe_run.log in $HOME]
#   JAX_VERSION                --install: the jax[tpu] version [the tested jax in .ci/constraints.txt]
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.a.b=value ...]
       launch/tpu_pod.sh --install TPU_NAME ZONE
       launch/tpu_pod.sh --stop TPU_NAME ZONE
  e.g. launch/tpu_pod.sh my-v4-32 us-central2-b configs/vitb_rpe_coord.py gs://BUCKET/runs/vitb_rpe_coord
  environment: DRY_RUN=1 PROJECT GCLOUD_SSH_ARGS REPO_DIR REMOTE_PYTHON JAX_COMPILATION_CACHE_DIR
               PASS_ENV DETACH=1 LOG_FILE JAX_VERSION (see the comments at the top of this file)
EOF
}

# Arguments first: nothing below runs on a bad command line.
mode=run
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --install) mode=install; shift ;;
  --stop) mode=stop; shift ;;
  -*) echo "error: unknown option ${1}" >&2; usage >&2; exit 2 ;;
esac
if [[ $mode == run ]]; then need=4; else need=2; fi
if (( $# < need )); then
  usage >&2
  exit 2
fi
if [[ $mode != run && $# -gt 2 ]]; then
  echo "error: --${mode} takes TPU_NAME ZONE only" >&2; usage >&2; exit 2
fi

tpu=$1
zone=$2
shift 2
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
repo=${REPO_DIR:-adpe_jax}
python=${REMOTE_PYTHON:-python3}

quote() {  # each argument shell-quoted for the remote bash, space-separated
  local out
  out=$(printf '%q ' "$@")
  printf '%s' "${out% }"
}

on_workers() {  # run $1 in bash on every worker (DRY_RUN=1: print it, readable and quoted)
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '# on every worker: %s\n' "$1"
  fi
  run "${ssh[@]}" "--command=${1}"
}

run() {  # DRY_RUN=1: print the command instead of running it
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%s\n' "$(quote "$@")"
  else
    "$@"
  fi
}

if [[ ${DRY_RUN:-0} != 1 ]] && ! command -v gcloud >/dev/null; then
  echo "error: gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk)" >&2
  exit 127
fi

gcloud_flags=("--zone=${zone}" --worker=all)
if [[ -n ${PROJECT:-} ]]; then
  gcloud_flags+=("--project=${PROJECT}")
fi
read -r -a extra <<< "${GCLOUD_SSH_ARGS:-}"
gcloud_flags+=("${extra[@]}")
ssh=(gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_flags[@]}")

case $mode in
  install)
    # Copy this checkout (tracked and untracked, not ignored: no .venv, runs/, caches) to
    # every worker and install it with jax[tpu] at the tested version (.ci/constraints.txt).
    jax_version=${JAX_VERSION:-$(sed -n 's/^jax==\([^[:space:]]*\).*/\1/p' "$root/.ci/constraints.txt")}
    jax_req="jax[tpu]${jax_version:+==${jax_version}}"
    tarball=$(mktemp "${TMPDIR:-/tmp}/adpe_jax_src.XXXXXX")
    trap 'rm -f "$tarball"' EXIT
    if [[ ${DRY_RUN:-0} == 1 ]]; then
      echo "# (cd $(quote "$root") && git ls-files -z -co --exclude-standard | tar --null -T - -czf $(quote "$tarball"))"
    else
      (cd "$root" && git ls-files -z -co --exclude-standard | tar --null -T - -czf "$tarball")
    fi
    run gcloud compute tpus tpu-vm scp "$tarball" "${tpu}:adpe_jax_src.tgz" "${gcloud_flags[@]}"
    remote="mkdir -p $(quote "$repo") && tar -xzf adpe_jax_src.tgz -C $(quote "$repo")"
    remote+=" && rm adpe_jax_src.tgz && cd $(quote "$repo")"
    remote+=" && ${python} -m pip install -q -e '.[gcs]' $(quote "$jax_req")"
    remote+=" && ${python} -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
    on_workers "$remote"
    ;;
  stop)
    # The bracket keeps pkill from matching the remote shell running this very command.
    # shellcheck disable=SC2016  # $(hostname) is meant to expand on the worker, not here
    remote='pkill -TERM -f "[a]dpe_jax[.]main" && echo "$(hostname): sent SIGTERM" || echo "$(hostname): no training process found"'
    on_workers "$remote"
    ;;
  run)
    config=$1
    workdir=$2
    shift 2
    if [[ -n ${JAX_COMPILATION_CACHE_DIR:-} ]]; then
      cache=$(quote "$JAX_COMPILATION_CACHE_DIR")
    else
      # shellcheck disable=SC2016  # $PWD is meant to expand on the worker (inside REPO_DIR)
      cache='"$PWD"/.jax_cache'
    fi
    remote="cd $(quote "$repo") && export JAX_COMPILATION_CACHE_DIR=${cache}"
    for name in ${PASS_ENV:-}; do
      if [[ ! $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
        echo "error: PASS_ENV holds ${name@Q}, not a variable name" >&2; exit 2
      fi
      if [[ -n ${!name+set} ]]; then
        remote+=" && export ${name}=$(quote "${!name}")"
      fi
    done
    cmd="${python} -m adpe_jax.main $(quote "--config=${config}" "--workdir=${workdir}" "$@")"
    if [[ ${DETACH:-0} == 1 ]]; then
      log=${LOG_FILE:-adpe_run.log}
      case $log in
        /*) log=$(quote "$log") ;;
        *) log="\"\$HOME\"/$(quote "$log")" ;;
      esac
      # The whole group is redirected, so nothing holds the ssh session open.
      remote="{ ${remote} && exec nohup setsid ${cmd}; } > ${log} 2>&1 < /dev/null &"
      remote+=" echo \"\$(hostname): started; log: ${log}\""
    else
      remote+=" && exec ${cmd}"
    fi
    on_workers "$remote"
    ;;
esac
