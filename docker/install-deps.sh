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

# The base's torch family, pinned at the installed versions as each distribution's metadata gives
# them: the very versions pip's resolver compares with, however torch was installed. Not `pip
# freeze`: for a torch installed from a wheel file or by conda it prints `torch @ file:///...`.
python - > "$work/base-constraints.txt" <<'EOF'
from importlib.metadata import PackageNotFoundError, version

for name in ("torch", "torchvision", "torchaudio", "triton"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
EOF
if ! grep -q '^torch==' "$work/base-constraints.txt"; then
    echo "install-deps.sh: no torch installed in this Python ($(command -v python));" \
        "the base image must provide it" >&2
    exit 2
fi
python "$here/pyproject_requirements.py" "$pyproject" > "$work/requirements.txt"

python -m pip install -r "$work/requirements.txt" -c "$work/base-constraints.txt" "$@"
