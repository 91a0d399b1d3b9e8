#!/usr/bin/env bash
# duo_jax on a Cloud TPU VM: one host (v4-8, v5litepod-8, ...) or a pod slice (v4-32, ...).
#
# From your workstation, with gcloud set to your project:
#   REPO_URL=https://github.com/ORG/duo_jax.git launch/tpu_vm.sh create  NAME ZONE v4-8 [RUNTIME]   # RUNTIME: the TPU software version for that type
#   REPO_URL=https://github.com/ORG/duo_jax.git launch/tpu_vm.sh install NAME ZONE
#   launch/tpu_vm.sh run NAME ZONE --config=configs/resnet18_imagenet.py --workdir=WORKDIR --config.data.data_dir=DIR
#   launch/tpu_vm.sh delete NAME ZONE
#
# `install` and `run` execute the same command on every worker of the TPU VM
# (`gcloud compute tpus tpu-vm ssh --worker=all`). On a pod slice every worker
# runs `python -m duo_jax.main` with DUO_JAX_DISTRIBUTED=auto: jax.distributed
# finds the other workers itself, the batch is split over every TPU core of
# every worker, and each worker reads only its share of the data. WORKDIR (and
# the data) must then be a directory every worker sees at the same path, e.g.
# a Cloud Storage bucket mounted with gcsfuse or a Filestore share; on a single
# host any local directory will do. A run resumes when the same `run` command
# is given again (after a preemption, for instance).
set -euo pipefail

RUNTIME_DEFAULT="tpu-ubuntu2204-base"
CLONE_DIR="${CLONE_DIR:-duo_jax}"   # on the workers, relative to the home directory
JAX_VERSION="${JAX_VERSION:-0.10.2}"

usage() {
  sed -n '2,9p' "$0" >&2
  exit 2
}

[[ $# -ge 3 ]] || usage
action="$1" name="$2" zone="$3"
shift 3

on_all_workers() {  # runs one shell command on every worker of the TPU VM
  gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"
}

case "$action" in
  create)
    [[ $# -ge 1 ]] || usage
    gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$1" \
      --version="${2:-$RUNTIME_DEFAULT}"
    ;;
  install)
    : "${REPO_URL:?set REPO_URL to the git URL of this repository}"
    on_all_workers "set -e; sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv git >/dev/null;
      [ -d $CLONE_DIR ] || git clone -q $(printf %q "$REPO_URL") $CLONE_DIR;
      cd $CLONE_DIR && python3 -m venv .venv && . .venv/bin/activate &&
      pip install -q -e . 'jax[tpu]==$JAX_VERSION'"
    ;;
  run)
    # The same python -m duo_jax.main on every worker, flags passed through quoted. A pod
    # slice (more than one worker in the VM's metadata) starts jax.distributed.
    flags=$(printf ' %q' "$@")
    endpoints="http://metadata.google.internal/computeMetadata/v1/instance/attributes/worker-network-endpoints"
    on_all_workers "cd $CLONE_DIR && . .venv/bin/activate &&
      n=\$(curl -sf -H Metadata-Flavor:Google $endpoints | tr ',' '\\n' | grep -c . || true);
      if [ \"\${n:-1}\" -gt 1 ]; then export DUO_JAX_DISTRIBUTED=auto; fi;
      python -m duo_jax.main$flags"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
    ;;
  *)
    usage
    ;;
esac
