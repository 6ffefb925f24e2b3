#!/usr/bin/env bash
# The prepared GPU check of issue 9 (part 5): one script, at most DEADLINE (500 s) on one GPU.
#
#   bash benchmarks/gpu_check.sh OUT --wheels .whl        # on the lent GPU machine
#   bash benchmarks/gpu_check.sh OUT --device cpu --size 32 --batch 2 --inner-steps 1 \
#       --profile smoke --models profile --variants eager --repeats 1   # the CPU smoke test
#
# 1. bench_train_step.py at the paper's size (240², B 8, K 5, the paper's models): eager fp32,
#    bf16 AMP, AMP + channels_last, with the model FLOPs, the MFU against the card's bf16
#    peak and the projected hours of the paper's schedule; then torch.profiler's TRACE ops with
#    the most GPU time in 3 warm-up and 3 outer steps of the amp variant (the trainer's CUDA
#    default), beside the wall time of those steps -> OUT/bench_train_step.md
# 2. chapters 2-4 of the book (book/build.py --no-html: jupytext -> papermill) on the phantom
#    with `device`, `profile` (default: the `default` profile) and --set overrides for the
#    paper's model sizes and one epoch per stage, so the CUDA path of the book runs end to
#    end -> OUT/chapters/*.ipynb
# 3. torch.compile (a second bench call, eager again as its baseline; compile time apart, in
#    "first calls"), last because compiling can take minutes -> OUT/bench_train_step.md
# OUT gets six files (the device tool brings back at most eight): those, gpu_check.log and
# machine.txt. The phantom, the runs and inductor's cache go to a scratch folder (--work DIR
# to keep them; by default a temporary one, removed at the end). The whole script stops by
# DEADLINE seconds (default 500): each stage's limit is cut to what is left.
# Options: --wheels DIR installs the wheels of benchmarks/gpu_wheels.sh first (the GPU machine
# reaches no index); the repository goes on PYTHONPATH, so fuse4seg needs no install.
# --trace N: the ops in stage 1's profile (default 25; 0: no profile).
# PYTHON (default: python3) is the interpreter; FUSE4SEG_COMMIT names the commit where the
# copy has no .git.
set -euo pipefail

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; }
[[ $# -ge 1 && $1 != -* ]] || { usage >&2; exit 2; }
OUT=$1
shift
DEVICE=cuda SIZE=240 BATCH=8 K=5 PROFILE=default MODELS=paper REPEATS=5
VARIANTS=eager,amp,amp_cl,compile WARM_EPOCHS=1 ROLL_EPOCHS=1 CHAPTERS="02 03 04"
WHEELS="" WORK=""
TRACE=25
# the 2026-12-04 run on an H200: stage 1 96 s, stage 2 150 s, stage 3 210 s (compiling 169 s)
DEADLINE=${DEADLINE:-500} BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-240} CHAPTER_TIMEOUT=${CHAPTER_TIMEOUT:-80}
while [[ $# -gt 0 ]]; do
    [[ $# -ge 2 ]] || { echo "gpu_check.sh: $1 needs a value" >&2; exit 2; }
    case $1 in
        --device) DEVICE=$2 ;;
        --size) SIZE=$2 ;;
        --batch) BATCH=$2 ;;
        --inner-steps) K=$2 ;;
        --profile) PROFILE=$2 ;;          # the chapters' profile
        --models) MODELS=$2 ;;            # paper (the paper's sizes) | profile (the profile's)
        --variants) VARIANTS=$2 ;;
        --repeats) REPEATS=$2 ;;
        --trace) TRACE=$2 ;;              # ops in stage 1's profile (0: no profile)
        --epochs) WARM_EPOCHS=$2; ROLL_EPOCHS=$2 ;;
        --chapters) CHAPTERS=$2 ;;
        --wheels) WHEELS=$2 ;;
        --work) WORK=$2 ;;
        *) echo "gpu_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift 2
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT/chapters"
OUT=$(cd "$OUT" && pwd)
if [[ -z $WORK ]]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
LOG=$OUT/gpu_check.log
exec > >(tee -a "$LOG") 2>&1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor_cache}
export PYTHONUNBUFFERED=1
START=$SECONDS
left() {  # the limit of a stage: its own, or what is left of DEADLINE if less (at least 1 s)
    local rest=$((DEADLINE - (SECONDS - START)))
    ((rest < 1)) && rest=1
    echo $(($1 < rest ? $1 : rest))
}

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "${FUSE4SEG_COMMIT:-unknown}")
echo "# gpu_check.sh $(date -u +%FT%TZ): device $DEVICE, bench ${SIZE}x${SIZE} B $BATCH K $K,"\
     "chapters $CHAPTERS (profile $PROFILE, models $MODELS), commit $COMMIT, deadline" \
     "${DEADLINE} s, scratch $WORK"

if [[ -n $WHEELS ]]; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$WORK/site" "$WHEELS"/*.whl
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
    echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS: $((SECONDS - START)) s"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # fuse4seg from this copy, installed or not

{ nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"; lscpu 2>/dev/null | head -20; \
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
    > "$OUT/machine.txt"

BENCH_MODELS=()
[[ $MODELS == paper ]] && BENCH_MODELS=(--profile paper) || BENCH_MODELS=(--profile "$PROFILE")
bench() {  # bench VARIANTS LIMIT [OPTION...]: one bench_train_step.py call, its table appended
    local limit
    limit=$(left "$2")
    echo "## bench_train_step.py --variants $1 ${*:3} (limit $limit s)"
    timeout "$limit" "$PY" "$ROOT/benchmarks/bench_train_step.py" --device "$DEVICE" \
        --size "$SIZE" --batch "$BATCH" --inner-steps "$K" "${BENCH_MODELS[@]}" \
        --variants "$1" --repeats "$REPEATS" "${@:3}" | tee -a "$OUT/bench_train_step.md" \
        || echo "bench_train_step.py --variants $1 failed or timed out (status $?)" \
            | tee -a "$OUT/bench_train_step.md"
    echo | tee -a "$OUT/bench_train_step.md" > /dev/null
}
: > "$OUT/bench_train_step.md"
# compiling can take minutes: its own call and limit (stage 3), so a slow compile loses nothing
PLAIN=() COMPILED=()
IFS=, read -ra ALL <<< "$VARIANTS"
for v in "${ALL[@]}"; do [[ $v == compile* ]] && COMPILED+=("$v") || PLAIN+=("$v"); done
echo "## 1. bench_train_step.py"
TRACED=()  # where the time goes: the amp variant (as CUDA trains) if it runs, else the first
if ((TRACE > 0)); then
    TRACED=(--trace "$TRACE")
    [[ " ${PLAIN[*]} " == *" amp "* ]] && TRACED+=(--trace-variant amp)
fi
if ((${#PLAIN[@]})); then bench "$(IFS=,; echo "${PLAIN[*]}")" "$BENCH_TIMEOUT" "${TRACED[@]}"; fi
echo "bench: $((SECONDS - START)) s"

echo "## 2. chapters $CHAPTERS on the phantom"
# book/build.py runs them as make book does (each chapter gets the parameters it declares)
SETTINGS=(--set "train.warmup_epochs=$WARM_EPOCHS" --set "train.rollout_epochs=$ROLL_EPOCHS")
if [[ $MODELS == paper ]]; then
    SETTINGS+=(--set model.fusion=fuse4seg_paper --set model.segmentation=convnext_unet_paper)
fi
echo "overrides: ${SETTINGS[*]}"
FAILED=0
for n in $CHAPTERS; do
    src=$(ls "$ROOT"/book/"$n"_*.md)
    name=$(basename "$src" .md)
    t0=$SECONDS
    limit=$(left "$CHAPTER_TIMEOUT")
    if timeout "$limit" "$PY" "$ROOT/book/build.py" --profile "$PROFILE" --device "$DEVICE" \
        --only "book/$name" --no-html --out "$WORK/build" --data-dir "$WORK/phantom" \
        --timeout 0 "${SETTINGS[@]}"; then
        echo "chapter $name: ok in $((SECONDS - t0)) s"
    else
        echo "chapter $name: FAILED (status $?) after $((SECONDS - t0)) s of a $limit s limit"
        FAILED=1
    fi
    # the executed notebook, also of a failed chapter (its traceback)
    cp "$WORK/build/executed/book/$name.ipynb" "$OUT/chapters/" 2>/dev/null \
        || echo "chapter $name: no executed notebook"
done
if ((${#COMPILED[@]})); then
    echo "## 3. bench_train_step.py, compiled"
    bench "eager,$(IFS=,; echo "${COMPILED[*]}")" "$COMPILE_TIMEOUT"
fi
echo "# gpu_check.sh done in $((SECONDS - START)) s; outputs in $OUT"
exit $FAILED
