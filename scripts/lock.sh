#!/usr/bin/env bash
# Refresh the lock files in requirements/ from pyproject.toml's ranges, then install what they pin and run the test
# suite against it: an upgrade is a change with its own test run.
#
#   scripts/lock.sh             newest versions within pyproject.toml's ranges, then set-up and the suite
#   scripts/lock.sh --no-test   only the lock files
#
# One lock per install set, with the sha256 of every file: service.lock (the service), scale.lock (+ Ray Serve),
# test.lock (+ the test tools, what CI installs). torch is left out of each: scripts/setup.sh installs it first, the
# CPU or the CUDA build of TORCH_VERSION, and the locks hold its pure-Python dependencies as the CPU build states
# them. Resolved for CPython 3.11 on x86-64 Linux; uv's resolver, pinned here. Environment: VENV, TORCH_FIND_LINKS.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
UV_VERSION=0.13.9
# Where the CPU build of torch is listed: its dependencies are the ones locked (the CUDA build adds its own).
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-https://download.pytorch.org/whl/cpu/torch/}
TORCH_VERSION=$(sed -n 's/^TORCH_VERSION=\${TORCH_VERSION:-\(.*\)}$/\1/p' scripts/setup.sh)
run_tests=1
for arg in "$@"; do
    case "$arg" in
        --no-test) run_tests=0 ;;
        *) echo "lock.sh: unknown option $arg (use --no-test)" >&2; exit 2 ;;
    esac
done

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
compile() {  # compile OUTPUT [EXTRA...]
    local output=$1; shift
    "$VENV/bin/python" -m uv pip compile pyproject.toml "${@/#/--extra=}" --generate-hashes --quiet \
        --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-emit-package torch \
        --find-links "$TORCH_FIND_LINKS" --constraint <(echo "torch==$TORCH_VERSION+cpu") \
        --custom-compile-command "scripts/lock.sh" -o "$output"
}
compile requirements/service.lock
compile requirements/scale.lock scale
compile requirements/test.lock test scale
echo "lock.sh: wrote requirements/service.lock, scale.lock and test.lock (torch $TORCH_VERSION installed apart)"

if [ "$run_tests" = 1 ]; then
    scripts/setup.sh --test
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider
fi
