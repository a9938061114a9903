#!/bin/bash
# Submits a sharded prepare of one manifest into one store: an array job of SHARDS tasks
# (tools/slurm/prepare_shards.sbatch, shard I/SHARDS each) and the `t3d-data index` job
# (tools/slurm/index_store.sbatch) that runs only after all of them succeeded
# (--dependency=afterok). Run it from the repository root:
#
#   MANIFEST=/data/ct/manifest.jsonl STORE=/shared/t3d/store SHARDS=16 tools/slurm/prepare_store.sh
#
# Other variables (WORKERS, RUN, EXTRA_ARGS) are passed on to the jobs. Extra arguments are
# given to both sbatch calls (e.g. --partition=cpu --account=proj).
set -euo pipefail

: "${MANIFEST:?set MANIFEST=path/to/manifest.jsonl}"
: "${STORE:?set STORE=path/to/store (a folder every node can write)}"
SHARDS=${SHARDS:-16}
here=$(cd "$(dirname "$0")" && pwd)
export MANIFEST STORE SHARDS

array=$(sbatch --parsable --export=ALL --array="0-$((SHARDS - 1))" "$@" "$here/prepare_shards.sbatch")
array=${array%%;*}  # --parsable prints "jobid[;cluster]"
index=$(sbatch --parsable --export=ALL --dependency="afterok:${array}" "$@" "$here/index_store.sbatch")
index=${index%%;*}
echo "prepare: array job ${array} (${SHARDS} shards of ${MANIFEST} into ${STORE}); index job ${index} runs after all of them succeeded"
