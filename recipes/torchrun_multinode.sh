#!/bin/bash
# Multi-node SSL pretraining with torchrun (clusters without SLURM: Kubernetes, plain VMs).
#
# What it does: torchrun starts one process per GPU on this node and meets the other nodes at
#   the c10d rendezvous on $MASTER_ADDR:$MASTER_PORT (run this same script on every node; the
#   first to arrive hosts it); Lightning picks up torchrun's environment (RANK, LOCAL_RANK,
#   WORLD_SIZE, ...) and trains the recipe with DDP (NCCL on GPUs, gloo on CPUs). On SIGTERM
#   (spot/preemptible VMs, pod eviction) every rank stops at an optimiser-step boundary after
#   writing <run>/checkpoints/last.ckpt (atomically); start the script again and it resumes from
#   it (--ckpt_path last-or-fresh: the first start has no checkpoint and starts fresh, saying
#   so). With --max-restarts, torchrun itself restarts failed workers, which resume the same way.
# Hardware: NNODES nodes x NPROC_PER_NODE GPUs.
# How to run (from the repository root, on each node):
#   export MASTER_ADDR=node0.cluster MASTER_PORT=29500 NNODES=2 NODE_RANK=0   # 1 on node 2
#   RECIPE=recipes/mae_vitb16.yaml STORES='[/data/stores/tcga]' recipes/torchrun_multinode.sh
#   Extra `scratchpath fit` arguments go at the end: recipes/torchrun_multinode.sh --data.batch_size 128
# Variables: RECIPE, STORES (JSON/YAML list of stores), RUN_DIR (run folder on a filesystem all
#   nodes share, default runs/<recipe name>, made absolute from the folder the script starts in),
#   NNODES, NODE_RANK (a hint: the rendezvous assigns ranks), NPROC_PER_NODE (default 8),
#   MASTER_ADDR, MASTER_PORT, RDZV_ID (job id shared by the nodes, default scratchpath).
# Single node: NNODES=1 (MASTER_ADDR defaults to localhost), or simply
#   `scratchpath fit --config RECIPE` (Lightning launches the 8 processes itself).

set -euo pipefail

RECIPE=${RECIPE:-recipes/dino_vits16.yaml}
STORES=${STORES:?set STORES to a list of patch stores, e.g. STORES='[/data/stores/a]'}
RUN_DIR=$(realpath -m "${RUN_DIR:-runs/$(basename "$RECIPE" .yaml)}")
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-scratchpath}

exec torchrun \
    --nnodes "$NNODES" \
    --node-rank "$NODE_RANK" \
    --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id "$RDZV_ID" \
    --max-restarts 3 \
    -m scratchpath fit \
    --config "$RECIPE" \
    --data.stores "$STORES" \
    --trainer.default_root_dir "$RUN_DIR" \
    --trainer.num_nodes "$NNODES" \
    --trainer.devices "$NPROC_PER_NODE" \
    --ckpt_path last-or-fresh \
    "$@"
