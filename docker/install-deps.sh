#!/usr/bin/env bash
# Install the package's runtime dependencies into the current Python, keeping the torch build
# the base image ships.
#
#   docker/install-deps.sh PYPROJECT_TOML [extra pip install args...]
#
# Why a constraints file rather than excluding torch from the list: pyproject still says what the
# package needs (torch>=X), pip checks it against the installed build, and any dependency that
# would move torch, torchvision or triton makes the build fail with a resolver conflict instead of
# silently pulling a multi-GB wheel built for another CUDA.
set -euo pipefail

if [[ $# -lt 1 || ! -f "$1" ]]; then
    echo "install-deps.sh: first argument must be an existing pyproject.toml (got '${1:-}')" >&2
    exit 2
fi
pyproject="$1"
shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m pip freeze | grep -iE '^(torch|torchvision|torchaudio|triton)==' \
    > "$work/base-constraints.txt" || true
if ! grep -qi '^torch==' "$work/base-constraints.txt"; then
    echo "install-deps.sh: no pip-installed torch in this Python; the base image must provide it" >&2
    exit 2
fi
python "$here/pyproject_requirements.py" "$pyproject" > "$work/requirements.txt"

python -m pip install -r "$work/requirements.txt" -c "$work/base-constraints.txt" "$@"
