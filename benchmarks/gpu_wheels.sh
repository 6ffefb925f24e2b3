#!/usr/bin/env bash
# Fetch, here, the wheels that the lent GPU machine lacks for benchmarks/gpu_check.sh.
#
#   bash benchmarks/gpu_wheels.sh [DIR] [--python-version 3.12]    # DIR: default .whl
#
# The GPU machine of the `device` tool reaches no package index. Its image holds Python 3.12
# with a CUDA build of torch, numpy, scipy, matplotlib, scikit-image, tqdm, pyyaml, einops and
# numba (/work/.library/device/KINDS.md), but not the book's runner (papermill, jupytext,
# ipykernel and their dependencies) nor nibabel, nilearn (the phantom's MNI152 maps),
# PyWavelets and ipywidgets, which fuse4seg imports. This downloads exactly those, as wheels
# for CPython 3.12 on manylinux x86-64, at the versions of requirements.lock, without their
# dependencies (each one the image lacks is named below; debugpy is left out: ipykernel runs
# without it, only its debugger is off). About 31 MB; the device's working tree, carried
# folders included, may hold 64 MiB. DIR is git-ignored when it is .whl.
#
# Then, on the GPU machine (the `device` tool's run, carry [".whl"]):
#   bash benchmarks/gpu_check.sh "$OUT" --wheels .whl
# --python-version 3.11 fetches the same set for this machine's Python, to rehearse that run
# in a bare virtual environment (tests/test_gpu_check.py does not need it).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=$ROOT/.whl
PYVER=3.12
while [[ $# -gt 0 ]]; do
    case $1 in
        --python-version) PYVER=$2; shift 2 ;;
        -*) echo "gpu_wheels.sh: unknown option $1" >&2; exit 2 ;;
        *) DIR=$1; shift ;;
    esac
done

# what the image lacks (the book's runner and its dependencies, then fuse4seg's own needs)
NAMES="papermill jupytext nbformat nbclient ipykernel ipython ipython_pygments_lexers
jupyter_client jupyter_core traitlets pyzmq tornado comm matplotlib-inline nest-asyncio2 jedi
parso prompt_toolkit pexpect ptyprocess stack-data asttokens executing pure_eval wcwidth
fastjsonschema jsonschema jsonschema-specifications referencing rpds-py tenacity entrypoints
mdit-py-plugins platformdirs importlib_resources
nibabel nilearn PyWavelets ipywidgets widgetsnbextension jupyterlab_widgets"

LOCK=$ROOT/requirements.lock
PINS=()
for name in $NAMES; do
    # requirements.lock spells a name with '-', '_' or '.' as pip printed it; compare normalised
    pin=$(awk -v want="$name" 'BEGIN { gsub(/[-_.]+/, "-", want); want = tolower(want) }
        /==/ { n = $0; sub(/==.*/, "", n); gsub(/[-_.]+/, "-", n);
               if (tolower(n) == want) { print $0; exit } }' "$LOCK")
    [[ -n $pin ]] || { echo "gpu_wheels.sh: $name is not in $LOCK" >&2; exit 1; }
    PINS+=("$pin")
done

mkdir -p "$DIR"
PY=${PYTHON:-python3}
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" "${PINS[@]}"
count=$(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l)
echo "gpu_wheels.sh: ${#PINS[@]} packages for Python $PYVER; $count wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
