#!/usr/bin/env bash
# Several machines: run this same command on every node. torchrun's c10d rendezvous, hosted by
# the node named in RDZV_ENDPOINT, forms the group; there is no master/worker distinction.
#
#   RDZV_ENDPOINT=node0:29400 NNODES=2 DATA=/datasets/imagenet launch/multinode.sh
#
# Environment (besides CONFIG, NPROC_PER_NODE, DATA, RUN_DIR from launch/common.sh):
#   RDZV_ENDPOINT  host:port of the rendezvous, reachable from every node (required). This port
#                  and the store's MASTER_PORT accept anyone who connects (no authentication):
#                  keep them on the cluster's private network, never on a public interface.
#   NNODES         node count, or MIN:MAX for an elastic job (default 2)
#   RDZV_ID        job id shared by all nodes of one run (default dist-free)
#   MAX_RESTARTS   times torchrun restarts the whole group after a failure; the trainer resumes
#                  from its latest checkpoint each time (default 3)
# Arguments are key=value config overrides, passed to the trainer unchanged.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NNODES="${NNODES:-2}"
RDZV_ID="${RDZV_ID:-dist-free}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
[[ -n "${RDZV_ENDPOINT:-}" ]] || die "set RDZV_ENDPOINT=host:port (the rendezvous node, same on every node)"

exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RDZV_ID" \
    --max_restarts="$MAX_RESTARTS" \
    -m dist_free.train --config "$CONFIG" "${TRAIN_OVERRIDES[@]}" "$@"
