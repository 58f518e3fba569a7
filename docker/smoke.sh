#!/usr/bin/env bash
# Smoke test of the trainer image, run by hand before a long run (not in CI: it takes minutes and
# gigabytes). It builds docker/Dockerfile on the given base, trains the CPU demo in the image as
# the runtime user, stops it with `docker stop` mid-run, checks the checkpoint that the stop saved,
# then resumes from it to the end. No GPU needed: the demo runs DALI's CPU pipeline.
#
#   docker/smoke.sh BASE_IMAGE
#   NETWORK=host docker/smoke.sh pytorch/pytorch:2.14.0-cuda12.6-cudnn9-runtime@sha256:<digest>
#
# Environment (all optional):
#   TAG           image to build (default dist-free:smoke); it is kept afterwards
#   NETWORK       --network for `docker build` and `docker run` (default: Docker's own)
#   DEMO_DATA     an existing demo data set (`python -m dist_free.data demo DIR`); by default one
#                 is written with $PYTHON, which needs the dev extra (scikit-learn, Pillow)
#   PYTHON        interpreter for that (default python3)
#   NPROC         ranks (default 2)
#   STOP_TIMEOUT  seconds `docker stop` waits before SIGKILL (default 60, as docker/compose.yaml
#                 and the README give the container)
#   START_TIMEOUT seconds to wait for the second epoch to start (default 900)
#
# Prints PASS or FAIL for each step with its time in seconds, and stops at the first FAIL.
# Exit status: 0 all passed, 1 a step failed, 2 bad arguments or no Docker.
set -euo pipefail

RUNTIME_UID=10001   # docker/Dockerfile's USER
DEMO_CONFIG=/opt/dist-free/configs/demo.yaml
prog="$(basename "$0")"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

die() {
    echo "$prog: $*" >&2
    exit 2
}

positive_int() {   # positive_int NAME VALUE: exit 2 unless VALUE is a positive integer
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive whole number, not '$2'"
}

if [[ $# -eq 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then
    usage
    exit 0
fi
[[ $# -eq 1 && -n "$1" && "$1" != -* ]] || {
    echo "usage: $prog BASE_IMAGE   (see $prog --help)" >&2
    exit 2
}
base="$1"
TAG="${TAG:-dist-free:smoke}"
NETWORK="${NETWORK:-}"
DEMO_DATA="${DEMO_DATA:-}"
PYTHON="${PYTHON:-python3}"
NPROC="${NPROC:-2}"
STOP_TIMEOUT="${STOP_TIMEOUT:-60}"
START_TIMEOUT="${START_TIMEOUT:-900}"
positive_int NPROC "$NPROC"
positive_int STOP_TIMEOUT "$STOP_TIMEOUT"
positive_int START_TIMEOUT "$START_TIMEOUT"
[[ "$TAG" =~ ^[a-z0-9][a-z0-9._/:-]*$ ]] || die "TAG is not an image name: '$TAG'"
[[ -z "$NETWORK" || "$NETWORK" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] ||
    die "NETWORK is not a network name: '$NETWORK'"
if [[ -n "$DEMO_DATA" ]]; then
    [[ -d "$DEMO_DATA/train" && -d "$DEMO_DATA/val" ]] ||
        die "DEMO_DATA needs train/ and val/ folders: '$DEMO_DATA'"
    DEMO_DATA="$(cd "$DEMO_DATA" && pwd)"
fi
command -v docker > /dev/null || die "docker not found on PATH"
docker version > /dev/null 2>&1 || die "cannot reach the Docker daemon (docker version failed)"

network=()
if [[ -n "$NETWORK" ]]; then network=(--network "$NETWORK"); fi
# The demo, with a stop check (one metric read) after every step instead of every 10th.
train=(--standalone "--nproc_per_node=$NPROC" -m dist_free.train --config "$DEMO_CONFIG"
       data.root=/data run.dir=/runs run.log_every=1)
work="$(mktemp -d)"
name="dist-free-smoke-$$"
volume="dist-free-smoke-runs-$$"
cleanup() {
    docker rm -f "$name" > /dev/null 2>&1 || true
    docker volume rm "$volume" > /dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

# ---- steps: each sets `note` (shown after PASS) or `why` (shown after FAIL) ----------------

note="" why=""

step() {   # step TITLE FUNCTION: run it and print PASS/FAIL with its time; exit 1 on FAIL
    local title="$1" started=$SECONDS
    note="" why=""
    if "$2"; then
        printf 'PASS  %-38s %4d s  %s\n' "$title" $((SECONDS - started)) "$note"
    else
        printf 'FAIL  %-38s %4d s  %s\n' "$title" $((SECONDS - started)) "$why"
        exit 1
    fi
}

show_tail() {   # the end of a log, indented, on stderr
    echo "---- last lines of $1:" >&2
    tail -n "${2:-25}" "$1" | sed 's/^/    /' >&2
}

build_image() {
    local commit
    commit="$(git -C "$repo" rev-parse HEAD 2> /dev/null || echo unknown)"
    if ! docker build "${network[@]}" --build-arg BASE_IMAGE="$base" \
            --build-arg GIT_COMMIT="$commit" -t "$TAG" -f "$repo/docker/Dockerfile" "$repo" \
            > "$work/build.log" 2>&1; then
        show_tail "$work/build.log" 40
        why="docker build failed (its output above)"
        return 1
    fi
    note="$TAG from $base"
}

make_demo_data() {
    if [[ -n "$DEMO_DATA" ]]; then
        note="DEMO_DATA=$DEMO_DATA"
        return 0
    fi
    DEMO_DATA="$work/demo_data"
    if ! (cd "$repo" && "$PYTHON" -m dist_free.data demo "$DEMO_DATA") > "$work/demo.log" 2>&1; then
        show_tail "$work/demo.log"
        why="'$PYTHON -m dist_free.data demo' failed: it needs the dev extra (pip install -e '.[dev]'), or set DEMO_DATA"
        return 1
    fi
    chmod -R a+rX "$DEMO_DATA"   # read by UID $RUNTIME_UID in the container
    note="written with $PYTHON"
}

run_container() {   # run_container [docker run options...]: the trainer on the demo and the volume
    docker run "${network[@]}" --name "$name" --shm-size=2g --stop-timeout="$STOP_TIMEOUT" \
        -v "$DEMO_DATA:/data:ro" -v "$volume:/runs" "$@" "$TAG" "${train[@]}"
}

start_training() {
    docker volume create "$volume" > /dev/null
    run_container -d > /dev/null || { why="docker run failed"; return 1; }
    # The second epoch's first progress line: the first epoch's checkpoint is on disk, and the
    # stop below lands in the middle of a run that has state to lose.
    local deadline=$((SECONDS + START_TIMEOUT))
    until docker logs "$name" 2>&1 | grep -q ' epoch 2/[0-9]* '; do
        if [[ "$(docker inspect -f '{{.State.Running}}' "$name")" != true ]]; then
            docker logs "$name" > "$work/train.log" 2>&1
            show_tail "$work/train.log"
            why="the container exited before the second epoch"
            return 1
        fi
        if ((SECONDS > deadline)); then
            why="no second epoch within START_TIMEOUT=$START_TIMEOUT s"
            return 1
        fi
        sleep 1
    done
    note="$NPROC ranks, in epoch 2"
}

check_user() {
    # Every process in the container (tini, torchrun, the ranks), as the kernel sees it.
    local uids
    uids="$(docker exec "$name" python -c 'import os
print(" ".join(sorted({str(os.stat(f"/proc/{p}").st_uid) for p in os.listdir("/proc") if p.isdigit()})))')" ||
        { why="docker exec failed"; return 1; }
    [[ "$uids" == "$RUNTIME_UID" ]] || { why="process UIDs: $uids, not only $RUNTIME_UID"; return 1; }
    note="every process runs as UID $uids"
}

stop_training() {
    local started=$SECONDS code oom took
    docker stop -t "$STOP_TIMEOUT" "$name" > /dev/null || { why="docker stop failed"; return 1; }
    took=$((SECONDS - started))
    docker logs "$name" > "$work/train.log" 2>&1
    code="$(docker inspect -f '{{.State.ExitCode}}' "$name")"
    oom="$(docker inspect -f '{{.State.OOMKilled}}' "$name")"
    docker rm "$name" > /dev/null
    stop_line="$(grep -E 'stopped on SIGTERM (at epoch [0-9]+ batch [0-9]+|during the epoch [0-9]+ evaluation)' \
        "$work/train.log" | tail -n 1)" || true
    if [[ -z "$stop_line" ]]; then
        show_tail "$work/train.log"
        why="no 'stopped on SIGTERM' line from the trainer (exit $code after $took s)"
        return 1
    fi
    # 137: SIGKILL at the end of the stop timeout. torchrun itself exits 1 after forwarding a
    # SIGTERM (it re-raises the signal as SignalException once its workers have stopped).
    if [[ "$code" == 137 || "$oom" == true ]] || ((took >= STOP_TIMEOUT)); then
        why="killed: exit $code after $took s (OOMKilled=$oom)"
        return 1
    fi
    if [[ "$code" != 0 ]] && ! { [[ "$code" == 1 ]] && grep -q 'SignalException' "$work/train.log"; }; then
        show_tail "$work/train.log"
        why="exit $code after $took s"
        return 1
    fi
    note="stopped in $took s, exit $code; ${stop_line#* WARNING }"
}

saved_checkpoint() {   # JSON of last.pt's position, loaded in the image as the trainer loads it
    docker run --rm "${network[@]}" -v "$volume:/runs:ro" --entrypoint python "$TAG" -c '
import json
from dist_free import checkpoint
s = checkpoint.load("/runs/demo/checkpoints/last.pt")
print(json.dumps({k: s[k] for k in ("epoch", "batch_in_epoch", "eval_pending", "global_step")}))'
}

check_checkpoint() {
    local saved epoch batch expected
    saved="$(saved_checkpoint 2> "$work/load.log")" || {
        show_tail "$work/load.log"
        why="last.pt missing or unreadable"
        return 1
    }
    epoch="$(grep -oE 'epoch [0-9]+' <<< "$stop_line" | grep -oE '[0-9]+')"
    if [[ "$stop_line" == *" batch "* ]]; then
        batch="$(grep -oE 'batch [0-9]+' <<< "$stop_line" | grep -oE '[0-9]+')"
        expected="\"epoch\": $epoch, \"batch_in_epoch\": $batch, \"eval_pending\": false"
    else   # stopped during an evaluation: the epoch is saved, its evaluation is redone
        expected="\"epoch\": $epoch, \"batch_in_epoch\": 0, \"eval_pending\": true"
    fi
    [[ "$saved" == "{$expected, "* ]] || {
        why="last.pt holds $saved, the stop said: $stop_line"
        return 1
    }
    note="last.pt: $saved"
}

resume_training() {
    if ! run_container --rm > "$work/resume.log" 2>&1; then
        show_tail "$work/resume.log"
        why="the resumed run failed"
        return 1
    fi
    grep -q 'resumed from /runs/demo/checkpoints/last.pt' "$work/resume.log" ||
        { why="the second start did not resume from last.pt"; return 1; }
    grep -q ' done: ' "$work/resume.log" || { why="no 'done:' line"; return 1; }
    local epochs saved
    epochs="$(grep -oE 'training: [0-9]+ epochs' "$work/resume.log" | grep -oE '[0-9]+')"
    saved="$(saved_checkpoint)" || { why="last.pt unreadable after the run"; return 1; }
    [[ "$saved" == "{\"epoch\": $epochs, "* ]] ||
        { why="last.pt after the run: $saved, not epoch $epochs"; return 1; }
    note="$(grep -E ' epoch [0-9]+ eval: ' "$work/resume.log" | tail -n 1 | sed 's/.* INFO //')"
    note="${note%%; best.pt*}"
}

echo "$prog: base $base, image $TAG, work folder $work"
total=$SECONDS
step "build the image" build_image
step "demo data" make_demo_data
step "train the demo (to epoch 2)" start_training
step "runtime user" check_user
step "docker stop mid-run" stop_training
step "checkpoint saved by the stop" check_checkpoint
step "resume from it to the end" resume_training
echo "PASS  all steps in $((SECONDS - total)) s"
