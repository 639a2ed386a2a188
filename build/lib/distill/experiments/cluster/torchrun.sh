#!/bin/bash
# Distillation with torchrun, on one machine or several (run this on every node).
#   NODES=2 NODE_RANK=0 MASTER=host0:29500 GPUS=8 experiments/cluster/torchrun.sh [CONFIG] [overrides...]
# Lightning reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT);
# trainer.num_nodes x trainer.devices must equal the world size torchrun creates.
# CPU only (e.g. to try it): GPUS=2 DEVICE=cpu experiments/cluster/torchrun.sh CONFIG trainer.accelerator=cpu
set -euo pipefail

CONFIG=${1:-experiments/cluster/conaclip_cluster.yaml}
shift || true
NODES=${NODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
MASTER=${MASTER:-127.0.0.1:29500}
DEVICE=${DEVICE:-cuda}
export TOKENIZERS_PARALLELISM=false
RUN=(torchrun --nnodes="$NODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS"
     --rdzv_backend=c10d --rdzv_endpoint="$MASTER")

# 1) the teacher cache: every process encodes its share of the training images into the
#    shared cache folder, rank 0 merges; a no-op when a matching cache exists
"${RUN[@]}" -m distill cache --device "$DEVICE" "$CONFIG" "$@"
# 2) training; `resume=last` continues a run that was killed
"${RUN[@]}" -m distill fit "$CONFIG" \
  trainer.num_nodes="$NODES" trainer.devices="$GPUS" trainer.strategy=ddp resume=last "$@"
