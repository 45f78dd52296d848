#!/usr/bin/env bash
# One command for a fresh machine: a virtual environment (.venv) with the right torch and the service's packages.
#
#   scripts/setup.sh            the service
#   scripts/setup.sh --test     + the test tools: pytest, Playwright, and Debian's chromium and a CJK font (apt)
#   scripts/setup.sh --xformers + xformers (GPU hosts; optional, the service falls back to SDPA without it)
#   scripts/setup.sh --scale    + Ray Serve: --replicas, engines past one GPU (the --test set includes it)
#   scripts/setup.sh --flash4   + FlashAttention 4 (Hopper or newer; optional, the attention probe keeps it where it wins)
#
# torch==$TORCH_VERSION is installed first and on its own: a plain "torch" requirement on a machine without one
# pulls several GB of CUDA packages. With an NVIDIA GPU visible (nvidia-smi), the CUDA build from PyPI; otherwise
# the CPU build (this workplace keeps that wheel locally; elsewhere set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu). Then everything else exactly as requirements/*.lock pins
# it, every file checked against its sha256 (scripts/lock.sh refreshes them); xformers and FlashAttention 4, GPU
# builds tied to the CUDA torch, are pinned in pyproject.toml instead. Environment: VENV, PYTHON, TORCH_VERSION,
# TORCH_INDEX_URL.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
with_test=0
with_xformers=0
with_flash4=0
with_scale=0
for arg in "$@"; do
    case "$arg" in
        --test) with_test=1 ;;
        --xformers) with_xformers=1 ;;
        --flash4) with_flash4=1 ;;
        --scale) with_scale=1 ;;
        *) echo "setup.sh: unknown option $arg (use --test, --xformers, --flash4, --scale)" >&2; exit 2 ;;
    esac
done

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "setup.sh: Python 3.11 or newer is needed ($PYTHON is $("$PYTHON" --version 2>&1))" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# --no-compile: pip byte-compiles its 20,000 files one at a time (over a minute); compileall below does it on
# every core.
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile)
"${pip[@]}" --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup.sh: NVIDIA GPU found: installing the CUDA build torch==$TORCH_VERSION"
    "${pip[@]}" "torch==$TORCH_VERSION"
else
    echo "setup.sh: no NVIDIA GPU: installing the CPU build torch==$TORCH_VERSION"
    "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
fi

lock=requirements/service.lock
[ "$with_scale" = 1 ] && lock=requirements/scale.lock
[ "$with_test" = 1 ] && lock=requirements/test.lock  # the tests cover the replicas too
echo "setup.sh: installing $lock"
"${pip[@]}" --require-hashes --no-deps -r "$lock"
"${pip[@]}" --no-deps --no-build-isolation -e .
gpu_extras=""
[ "$with_xformers" = 1 ] && gpu_extras="xformers"
[ "$with_flash4" = 1 ] && gpu_extras="${gpu_extras:+$gpu_extras,}flash4"
[ -n "$gpu_extras" ] && "${pip[@]}" -e ".[$gpu_extras]"

# Some packages ship files that are not Python 3 (templates, examples); pip skips those too, so failures are not fatal.
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    >/dev/null || true

if [ "$with_test" = 1 ]; then
    missing=()
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    fc-list 2>/dev/null | grep -qi "wenquanyi\|noto sans cjk" || missing+=(fonts-wqy-zenhei)
    if [ ${#missing[@]} -gt 0 ]; then
        sudo=""
        [ "$(id -u)" = 0 ] || sudo="sudo"
        echo "setup.sh: installing ${missing[*]} with apt (browser tests)"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

"$VENV/bin/python" -c 'import torch, diffusers, transformers, gradio; print(
    f"setup.sh: ready: torch {torch.__version__} (cuda: {torch.cuda.is_available()}), diffusers {diffusers.__version__},"
    f" transformers {transformers.__version__}, gradio {gradio.__version__}")'
