#!/usr/bin/env bash
# Compress a model across a Slurm cluster: one calibration job saves the Hessians, an array of
# N tasks compresses a contiguous range of layers each, one job merges the layers into the
# checkpoint. Every step needs the same shared filesystem paths (MODEL, WORK).
#
#   MODEL=/shared/models/Llama-2-7b-hf WORK=/shared/pumice/llama7b SHARDS=8 \
#     deploy/slurm/submit.sh
#
# Re-running a failed array task resumes it: finished layers stay in $WORK/layers.
set -euo pipefail
: "${MODEL:?set MODEL to the source model directory}"
: "${WORK:?set WORK to a directory on the shared filesystem}"
SHARDS="${SHARDS:-4}"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$WORK/logs"
export MODEL WORK SHARDS

hess=$(sbatch --parsable --output="$WORK/logs/hessians-%j.out" "$HERE/hessians.sbatch")
array=$(sbatch --parsable --dependency="afterok:$hess" --array="0-$((SHARDS - 1))" \
    --output="$WORK/logs/shard-%A-%a.out" "$HERE/compress-shard.sbatch")
merge=$(sbatch --parsable --dependency="afterok:$array" \
    --output="$WORK/logs/merge-%j.out" "$HERE/merge.sbatch")
echo "submitted: hessians $hess, shards $array (0-$((SHARDS - 1))), merge $merge"
