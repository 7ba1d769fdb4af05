#!/bin/bash
# Multi-node training on SLURM: one `accelerate launch` per node, each starting one rank per GPU.
#
#   sbatch --nodes=4 launch/slurm.sh configs/pretrain/tiny_teacher.yaml train.lr=3e-4
#   ACCELERATE_CONFIG=launch/accelerate/fsdp.yaml sbatch --nodes=2 launch/slurm.sh CONFIG [overrides]
#
# Submit from the repository root with the environment activated: sbatch starts the job in the
# submit directory and srun passes the environment on, so relative paths (CONFIG, the accelerate
# config, the DeepSpeed JSON it names) and the venv resolve on every node.
#
# Environment knobs:
#   ACCELERATE_CONFIG  accelerate config (default launch/accelerate/multi_gpu.yaml; fsdp.yaml,
#                      zero2.yaml, zero3.yaml work the same way)
#   GPUS_PER_NODE      ranks per node (default: SLURM_GPUS_ON_NODE, else 8)
#   MAIN_PORT          rendezvous port on the first node (default 29500)
#
#SBATCH --job-name=leaplm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
#SBATCH --requeue
#SBATCH --signal=TERM@120
# Preemption and the time limit: SLURM sends SIGTERM (here also 120 s before the limit) to each
# node's accelerate, torchrun forwards it to the ranks, and they finish the step in flight, write a
# checkpoint and exit (leaplm/train/trainer.py). A requeued job starts this script again, and
# train.resume_from=latest (the first override, so yours win) continues from that checkpoint.
# One task per node on purpose: accelerate (torchrun) starts the per-GPU ranks itself; a task
# per GPU would start GPUS_PER_NODE launchers per node, each trying to start all ranks.

set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch [--nodes=N] launch/slurm.sh CONFIG [section.key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift

cd "${SLURM_SUBMIT_DIR:-.}"
export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/accelerate/multi_gpu.yaml}
export NNODES=${SLURM_NNODES:?SLURM_NNODES is unset: submit this script with sbatch, or run it inside salloc}
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export NUM_PROCESSES=$((NNODES * GPUS_PER_NODE))
# The first node of the allocation hosts rank 0 and the rendezvous. Its hostname must resolve on
# every node; where it does not, set MAIN_IP to its address on the fast interconnect.
export MAIN_IP=${MAIN_IP:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MAIN_PORT=${MAIN_PORT:-29500}

for path in "$CONFIG" "$ACCELERATE_CONFIG"; do
    [[ -f $path ]] || { echo "launch/slurm.sh: $path not found (run sbatch from the repository root)" >&2; exit 2; }
done
echo "leaplm: $NNODES node(s) x $GPUS_PER_NODE GPU(s), rank 0 on $MAIN_IP:$MAIN_PORT, $ACCELERATE_CONFIG"

# Single quotes: SLURM_NODEID must expand inside each node's task (0..N-1), not here on node 0.
# --kill-on-bad-exit stops every node when one fails instead of leaving the rest in a collective.
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch \
    --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NNODES" \
    --num_processes "$NUM_PROCESSES" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_IP" \
    --main_process_port "$MAIN_PORT" \
    -m leaplm.train "$@"' leaplm-node "$CONFIG" train.resume_from=latest "$@"
