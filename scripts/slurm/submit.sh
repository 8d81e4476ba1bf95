#!/bin/bash
# Submit an eetune sbatch wrapper with resources from environment variables:
#   NODES, GPUS_PER_NODE, PARTITION, TIME, ACCOUNT (each optional: the wrapper's defaults otherwise)
#
#   NODES=4 GPUS_PER_NODE=8 PARTITION=gpu scripts/slurm/submit.sh scripts/slurm/llama2_70b_mlp.sbatch [KEY=VALUE ...]
set -euo pipefail
script=$1
shift
exec sbatch ${NODES:+--nodes="$NODES"} ${GPUS_PER_NODE:+--gpus-per-node="$GPUS_PER_NODE"} \
  ${PARTITION:+--partition="$PARTITION"} ${TIME:+--time="$TIME"} ${ACCOUNT:+--account="$ACCOUNT"} \
  "$script" "$@"
