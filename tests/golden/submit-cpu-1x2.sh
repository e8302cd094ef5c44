#!/bin/bash

# Parameters
#SBATCH --error=/RUN/slurm/%j_0_log.err
#SBATCH --job-name=hpctrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --open-mode=append
#SBATCH --output=/RUN/slurm/%j_0_log.out
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=30
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /RUN/slurm/%j_%t_log.out --error /RUN/slurm/%j_%t_log.err python3 -u -m submitit.core._submit /RUN/slurm
