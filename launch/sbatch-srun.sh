#!/bin/bash
# Train with plain srun in a SLURM job that checkpoints and requeues itself.
#   sbatch launch/sbatch-srun.sh options.yaml runs/my-run
# Before the time limit (or at preemption) SLURM sends USR1 to the job's tasks; all
# ranks write one checkpoint, rank 0 requeues the job (checkpoint.requeue), and the
# requeued job continues from that checkpoint (--continue auto, same --output-dir).
#SBATCH --job-name=hpctrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail
OPTIONS=${1:?usage: sbatch launch/sbatch-srun.sh options.yaml RUN_DIR}
RUN_DIR=${2:?usage: sbatch launch/sbatch-srun.sh options.yaml RUN_DIR}
# activate the environment hpctrain is installed in, e.g.: source .venv/bin/activate
srun python -m hpctrain train "$OPTIONS" --output-dir "$RUN_DIR" --continue auto \
  --requeue-on-signal
