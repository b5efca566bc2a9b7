#!/usr/bin/env bash
# DDP with torchrun, no accelerate config: one process per GPU of this machine.
#   examples/distributed/torchrun.sh CONFIG DIR [NPROC]
# Run the data stage once first (one process): `mixcpt data CONFIG --output DIR`.
set -euo pipefail
config=$1 out=$2 nproc=${3:-$(nvidia-smi -L | wc -l)}
mixcpt data "$config" --output "$out"
torchrun --standalone --nproc_per_node "$nproc" -m mixcpt.cli cpt "$config" --output "$out"
