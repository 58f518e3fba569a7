#!/usr/bin/env bash
# One machine, several GPUs (default 4): torchrun's standalone rendezvous on a free local port.
#
#   launch/workstation.sh                                  # ImageNet preset, 4 GPUs
#   DATA=/datasets/imagenet NPROC_PER_NODE=8 launch/workstation.sh optim.epochs=10
#   CONFIG=configs/demo.yaml NPROC_PER_NODE=2 launch/workstation.sh
#
# Environment: CONFIG, NPROC_PER_NODE, DATA, RUN_DIR (see launch/common.sh). Arguments are
# key=value config overrides, passed to the trainer unchanged.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

exec torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC_PER_NODE" \
    -m dist_free.train --config "$CONFIG" "${TRAIN_OVERRIDES[@]}" "$@"
