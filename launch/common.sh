# shellcheck shell=bash
# Sourced by the launch scripts: shared defaults, the CONFIG check, and the key=value overrides
# that DATA and RUN_DIR ask for. Not executable on its own. Needs bash >= 4.4 (an empty array
# under `set -u`).
#
# CONFIG          config file (default: the paper's ImageNet preset, m=4, eps=4)
# NPROC_PER_NODE  processes per node, i.e. GPUs per node (default 4)
# DATA            dataset root with train/ and val/; unset keeps the config's data.root
# RUN_DIR         runs root; unset keeps the config's run.dir
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun waits for its workers after forwarding SIGTERM,
#                 before SIGKILL (default 45, see below)

DIST_FREE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${CONFIG:-$DIST_FREE_ROOT/configs/imagenet/free_m4_eps4.yaml}"
NPROC_PER_NODE="${NPROC_PER_NODE:-4}"

die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

[[ -f "$CONFIG" ]] || die "CONFIG file not found: $CONFIG"

# On SIGTERM (preemption, scancel, a pod or container stop) torchrun forwards the signal to its
# workers, waits this many seconds, then SIGKILLs them. The trainer saves and exits well under
# 30 s after SIGTERM; 45 s leaves room for a slow checkpoint disk and ends well before Slurm's
# kill (launch/slurm.sbatch asks for SIGTERM 90 s ahead of the time limit).
# An environment variable rather than --shutdown-timeout: torchrun reads it from torch 2.12 on,
# and older versions, which always wait 30 s, ignore it instead of rejecting an unknown flag.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-45}"
[[ "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" =~ ^[0-9]+$ ]] ||
    die "TORCH_ELASTIC_SHUTDOWN_TIMEOUT: whole seconds, not '$TORCH_ELASTIC_SHUTDOWN_TIMEOUT'"

# Optional overrides go before "$@" so that a key given on the command line still wins.
# shellcheck disable=SC2034  # read by the scripts that source this file
TRAIN_OVERRIDES=()
if [[ -n "${DATA:-}" ]]; then TRAIN_OVERRIDES+=("data.root=$DATA"); fi
if [[ -n "${RUN_DIR:-}" ]]; then TRAIN_OVERRIDES+=("run.dir=$RUN_DIR"); fi
