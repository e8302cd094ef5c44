#!/bin/bash
# Train with MPI ranks on one machine (or under an MPI-aware scheduler):
#   bash launch/mpiexec.sh 4 options.yaml runs/my-run
# Each rank takes its share of the cores (threads = cores / ranks on the node) and, on
# GPU machines, the GPU of its local rank. The mpich wheel installed with hpctrain
# provides mpiexec; a system MPI works too if mpi4py was built against it.
set -euo pipefail
RANKS=${1:?usage: bash launch/mpiexec.sh RANKS options.yaml RUN_DIR}
OPTIONS=${2:?usage: bash launch/mpiexec.sh RANKS options.yaml RUN_DIR}
RUN_DIR=${3:?usage: bash launch/mpiexec.sh RANKS options.yaml RUN_DIR}
exec mpiexec -n "$RANKS" python -m hpctrain train "$OPTIONS" --output-dir "$RUN_DIR" \
  --continue auto
