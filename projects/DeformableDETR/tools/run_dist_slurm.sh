#!/usr/bin/env bash
# Train (or evaluate) Deformable DETR on a slurm cluster through train_net.py and Detectron2's launch.
#
# Usage:
#   [GPUS_PER_NODE=8] [CPUS_PER_TASK=32] [PORT=...] [SRUN_ARGS="..."] [PYTHON=python] [DRY_RUN=1] \
#     projects/DeformableDETR/tools/run_dist_slurm.sh PARTITION JOB_NAME GPUS CONFIG [ARGS...]
#
#   PARTITION  slurm partition (srun -p)
#   JOB_NAME   slurm job name
#   GPUS       total number of GPUs: a multiple of GPUS_PER_NODE, or fewer (one node)
#   CONFIG     config file, e.g. configs/r50.yaml
#   ARGS       more train_net.py options (--resume, --eval-only) and KEY VALUE config overrides
#
# srun starts one task per node; each task runs
#   train_net.py --num-gpus GPUS_PER_NODE --num-machines NODES --machine-rank SLURM_NODEID
#                --dist-url tcp://FIRST_NODE:PORT --config-file CONFIG ARGS...
# where FIRST_NODE is the first host of SLURM_JOB_NODELIST (from `scontrol show hostnames` when
# scontrol is there) and launch starts one process per GPU. SOLVER.IMS_PER_BATCH is the total batch,
# so the same config trains with the same batch on any number of GPUs.
#
# Environment:
#   GPUS_PER_NODE  GPUs per node (default 8, or GPUS when smaller)
#   CPUS_PER_TASK  CPUs per node task (default 4 per GPU), for the data-loader workers
#   PORT           rendezvous port on the first node (default 29500 + SLURM_JOB_ID % 10000, so
#                  that jobs sharing a node do not collide)
#   SRUN_ARGS      more srun options, e.g. "--time=72:00:00 --mem=0"
#   PYTHON         interpreter (default python)
#   DRY_RUN=1      print the command (srun on the submitting host, train_net.py in each task)
#                  instead of running it
# Inside a batch script (sbatch) that already holds the nodes, run the task part directly:
#   srun --ntasks-per-node=1 env DDETR_SLURM_TASK=1 GPUS_PER_NODE=8 \
#     projects/DeformableDETR/tools/run_dist_slurm.sh PARTITION JOB_NAME GPUS CONFIG [ARGS...]

set -euo pipefail

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

if [[ $# -lt 4 ]]; then
    usage
fi
PARTITION=$1
JOB_NAME=$2
GPUS=$3
CONFIG=$4
shift 4

if ! [[ $GPUS =~ ^[1-9][0-9]*$ ]]; then
    echo "run_dist_slurm.sh: GPUS must be a positive integer; got '$GPUS'" >&2
    exit 2
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if ! [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]]; then
    echo "run_dist_slurm.sh: GPUS_PER_NODE must be a positive integer; got '$GPUS_PER_NODE'" >&2
    exit 2
fi
if ((GPUS < GPUS_PER_NODE)); then
    GPUS_PER_NODE=$GPUS
fi
if ((GPUS % GPUS_PER_NODE != 0)); then
    echo "run_dist_slurm.sh: GPUS ($GPUS) must be a multiple of GPUS_PER_NODE ($GPUS_PER_NODE)" >&2
    exit 2
fi
NODES=$((GPUS / GPUS_PER_NODE))
CPUS_PER_TASK=${CPUS_PER_TASK:-$((4 * GPUS_PER_NODE))}
PYTHON=${PYTHON:-python}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
TRAIN_NET=${TRAIN_NET:-$REPO_ROOT/train_net.py}

run() {
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        printf '%q ' "$@"
        printf '\n'
    else
        exec "$@"
    fi
}

# The first host of a slurm node list: "gpu[07-09,12]" -> gpu07, "a1,b[2-3]" -> a1.
first_host() {
    local list=$1
    if command -v scontrol >/dev/null 2>&1; then
        # awk reads everything: no broken pipe for scontrol, whatever the list's length.
        scontrol show hostnames "$list" | awk 'NR == 1'
        return
    fi
    local head=${list%%,*}
    if [[ $list == *"["* && ${list%%\[*} != *,* ]]; then
        local prefix=${list%%\[*}
        local range=${list#*\[}
        range=${range%%[],-]*}
        echo "$prefix$range"
    else
        echo "$head"
    fi
}

if [[ ${DDETR_SLURM_TASK:-0} != 1 ]]; then
    # Submitting host: one task per node; each task runs this script again in task mode.
    export DDETR_SLURM_TASK=1 GPUS_PER_NODE
    # shellcheck disable=SC2086  # SRUN_ARGS is a list of options
    run srun --partition="$PARTITION" --job-name="$JOB_NAME" --nodes="$NODES" \
        --ntasks="$NODES" --ntasks-per-node=1 --gres=gpu:"$GPUS_PER_NODE" \
        --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
        "$REPO_ROOT/projects/DeformableDETR/tools/run_dist_slurm.sh" \
        "$PARTITION" "$JOB_NAME" "$GPUS" "$CONFIG" "$@"
    exit 0
fi

# Task mode: one per node, inside the allocation.
if [[ -z ${SLURM_JOB_NODELIST:-} || -z ${SLURM_NODEID:-${SLURM_PROCID:-}} ]]; then
    echo "run_dist_slurm.sh: SLURM_JOB_NODELIST and SLURM_NODEID (or SLURM_PROCID) must be set:" \
        "task mode runs under srun" >&2
    exit 2
fi
NUM_MACHINES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-$NODES}}
if ((NUM_MACHINES != NODES)); then
    echo "run_dist_slurm.sh: the allocation has $NUM_MACHINES nodes but GPUS=$GPUS with" \
        "GPUS_PER_NODE=$GPUS_PER_NODE needs $NODES" >&2
    exit 2
fi
MACHINE_RANK=${SLURM_NODEID:-$SLURM_PROCID}
MASTER=$(first_host "$SLURM_JOB_NODELIST")
PORT=${PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 10000))}
run "$PYTHON" "$TRAIN_NET" --config-file "$CONFIG" --num-gpus "$GPUS_PER_NODE" \
    --num-machines "$NUM_MACHINES" --machine-rank "$MACHINE_RANK" \
    --dist-url "tcp://$MASTER:$PORT" "$@"
