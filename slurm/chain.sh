#!/usr/bin/env bash
# Run one continual sequence as a chain of N dependent jobs, for partitions whose time limit is
# shorter than the run (or where jobs may not requeue themselves).
#
#   slurm/chain.sh N [sbatch options ...] -- CONFIG.yaml [key=value ...]
#   slurm/chain.sh 6 --time=4:00:00 --nodes=4 -- configs/paper/x.yaml output_dir=runs/x
#
# Submits slurm/train.sbatch N times, job k+1 with --dependency=afterany:<job k>. Every job runs
# with resume=auto and the same output_dir, so each one continues from the newest checkpoint the
# previous one left. Ten minutes before its time limit a job gets the pre-emption signal,
# checkpoints and exits (REQUEUE=0: the chain, not a requeue, runs the next part). afterany, not
# afterok: a job that stopped at its time limit did not succeed, and the next one must start anyway.
# Jobs left after the sequence is done resume at the end, rewrite the final outputs and exit.
# A run that fails for another reason fails again in each later job (see the logs); cancel the
# rest with `scancel <ids>` (the ids are printed one per line).
set -euo pipefail

usage="usage: slurm/chain.sh N [sbatch options ...] -- CONFIG.yaml [key=value ...]"
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "$usage" >&2
    exit 2
fi
n="$1"
shift
sbatch_args=()
if [[ " $* " == *" -- "* ]]; then
    while [ "$1" != "--" ]; do
        sbatch_args+=("$1")
        shift
    done
    shift
fi
if [ $# -eq 0 ]; then
    echo "$usage" >&2
    exit 2
fi

script="$(dirname "$0")/train.sbatch"
previous=""
for k in $(seq 1 "$n"); do
    dependency=()
    if [ -n "$previous" ]; then dependency=(--dependency="afterany:$previous"); fi
    previous="$(sbatch --parsable --export=ALL,REQUEUE=0 "${dependency[@]}" "${sbatch_args[@]}" "$script" "$@")"
    previous="${previous%%;*}" # --parsable prints "id;cluster" on federated clusters
    echo "chain.sh: job $k of $n: $previous" >&2
    echo "$previous"
done
