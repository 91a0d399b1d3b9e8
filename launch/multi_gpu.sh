#!/usr/bin/env bash
# duo_jax on every GPU of one machine: one process, the batch split over all the GPUs it sees.
#
#   launch/multi_gpu.sh --config=configs/vgg7_cifar10.py --workdir=runs/vgg7 --config.data.data_dir=DIR
#   CUDA_VISIBLE_DEVICES=0,1,2,3 launch/multi_gpu.sh ...     # a subset of the GPUs
#
# Needs the CUDA build of jax: pip install -e . "jax[cuda13]==0.10.2". The
# global batch (config.batch_size, config.eval_batch_size) must be a multiple
# of the number of GPUs. Rerunning the same command resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

if command -v nvidia-smi >/dev/null; then
  echo "GPUs: $(nvidia-smi -L | wc -l) on this machine, visible: ${CUDA_VISIBLE_DEVICES:-all}" >&2
fi
exec "$PYTHON" -m duo_jax.main "$@"
