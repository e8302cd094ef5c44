#!/bin/bash

# Parameters
#SBATCH --account=X
#SBATCH --cpus-per-task=8
#SBATCH --error=/RUN/slurm/%j_0_log.err
#SBATCH --gpus-per-node=4
#SBATCH --job-name=hpctrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=/RUN/slurm/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=long
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=720
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /RUN/slurm/%j_%t_log.out --error /RUN/slurm/%j_%t_log.err python3 -u -m submitit.core._submit /RUN/slurm
