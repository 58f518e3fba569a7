# shellcheck shell=bash
# Sourced by the launch scripts: shared defaults, the CONFIG check, and the key=value overrides
# that DATA and RUN_DIR ask for. Not executable on its own. Needs bash >= 4.4 (an empty array
# under `set -u`).
#
# CONFIG          config file (default: the paper's ImageNet preset, m=4, eps=4)
# NPROC_PER_NODE  processes per node, i.e. GPUs per node (default 4)
# DATA            dataset root with train/ and val/; unset keeps the config's data.root
# RUN_DIR         runs root; unset keeps the config's run.dir

DIST_FREE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${CONFIG:-$DIST_FREE_ROOT/configs/imagenet/free_m4_eps4.yaml}"
NPROC_PER_NODE="${NPROC_PER_NODE:-4}"

die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

[[ -f "$CONFIG" ]] || die "CONFIG file not found: $CONFIG"

# Optional overrides go before "$@" so that a key given on the command line still wins.
# shellcheck disable=SC2034  # read by the scripts that source this file
TRAIN_OVERRIDES=()
if [[ -n "${DATA:-}" ]]; then TRAIN_OVERRIDES+=("data.root=$DATA"); fi
if [[ -n "${RUN_DIR:-}" ]]; then TRAIN_OVERRIDES+=("run.dir=$RUN_DIR"); fi
