#!/usr/bin/env bash
# duo_jax on several machines without a scheduler: start this on every machine.
#
#   # on machine 0 (the coordinator, reachable at 10.0.0.1 by the others):
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 launch/multi_node.sh --config=... --workdir=/shared/runs/x
#   # on machine 1:
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=1 launch/multi_node.sh --config=... --workdir=/shared/runs/x
#
# Every process gets the same flags. Each process uses all the accelerators it
# sees (one process per machine, or one per GPU with CUDA_VISIBLE_DEVICES=i),
# reads only its share of each batch, and the batch is split over every
# device of every process. The workdir (and the data) must be a directory
# every machine sees at the same path (NFS, a mounted bucket): the checkpoints
# are written by all processes together. Rerunning the same commands resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
: "${COORDINATOR:?set COORDINATOR=HOST:PORT of process 0}"
: "${NUM_PROCESSES:?set NUM_PROCESSES to the number of processes}"
: "${PROCESS_ID:?set PROCESS_ID to this process index, 0 to NUM_PROCESSES-1}"
exec "$PYTHON" -m duo_jax.main --coordinator_address="$COORDINATOR" --num_processes="$NUM_PROCESSES" \
  --process_id="$PROCESS_ID" "$@"
