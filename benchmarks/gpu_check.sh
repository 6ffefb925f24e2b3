#!/usr/bin/env bash
# The prepared GPU check of issue 9 (part 5): one script, under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh OUT                      # on a lent GPU: everything below
#   bash benchmarks/gpu_check.sh OUT --device cpu --size 32 --batch 2 --inner-steps 1 \
#       --profile smoke --models profile --variants eager --repeats 1   # the CPU smoke test
#
# 1. bench_train_step.py at the paper's size (240², B 8, K 5, the paper's models): eager fp32,
#    bf16 AMP, AMP + channels_last, torch.compile (its compile time apart, "first calls"), with
#    the model FLOPs, the MFU against the card's bf16 peak and the projected hours of the
#    paper's schedule -> OUT/bench_train_step.md
# 2. chapters 2-4 of the book (jupytext -> papermill) on the phantom with `device`, `profile`
#    (default: the `default` profile) and overrides for the paper's model sizes and a few
#    epochs, so the CUDA path of the book runs end to end -> OUT/chapters/*.ipynb
# Everything, the log included (OUT/gpu_check.log), is written under OUT. Run from anywhere;
# PYTHON (default: python3) is the interpreter with fuse4seg, papermill and jupytext.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
[[ $# -ge 1 && $1 != -* ]] || { usage >&2; exit 2; }
OUT=$1
shift
DEVICE=cuda SIZE=240 BATCH=8 K=5 PROFILE=default MODELS=paper REPEATS=5
VARIANTS=eager,amp,amp_cl,compile WARM_EPOCHS=1 ROLL_EPOCHS=1 CHAPTERS="02 03 04"
BENCH_TIMEOUT=${BENCH_TIMEOUT:-240} CHAPTER_TIMEOUT=${CHAPTER_TIMEOUT:-80}
while [[ $# -gt 0 ]]; do
    case $1 in
        --device) DEVICE=$2 ;;
        --size) SIZE=$2 ;;
        --batch) BATCH=$2 ;;
        --inner-steps) K=$2 ;;
        --profile) PROFILE=$2 ;;          # the chapters' profile
        --models) MODELS=$2 ;;            # paper (the paper's sizes) | profile (the profile's)
        --variants) VARIANTS=$2 ;;
        --repeats) REPEATS=$2 ;;
        --epochs) WARM_EPOCHS=$2; ROLL_EPOCHS=$2 ;;
        --chapters) CHAPTERS=$2 ;;
        *) echo "gpu_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift 2
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT/chapters" "$OUT/work"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
exec > >(tee -a "$LOG") 2>&1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT/inductor_cache}
START=$SECONDS

echo "# gpu_check.sh $(date -u +%FT%TZ): device $DEVICE, bench ${SIZE}x${SIZE} B $BATCH K $K,"\
     "chapters $CHAPTERS (profile $PROFILE, models $MODELS), commit"\
     "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
{ nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"; lscpu 2>/dev/null | head -20; \
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
    > "$OUT/machine.txt"

echo "## 1. bench_train_step.py (limit ${BENCH_TIMEOUT} s)"
BENCH_MODELS=()
[[ $MODELS == paper ]] && BENCH_MODELS=(--profile paper) || BENCH_MODELS=(--profile "$PROFILE")
timeout "$BENCH_TIMEOUT" "$PY" "$ROOT/benchmarks/bench_train_step.py" --device "$DEVICE" \
    --size "$SIZE" --batch "$BATCH" --inner-steps "$K" "${BENCH_MODELS[@]}" \
    --variants "$VARIANTS" --repeats "$REPEATS" | tee "$OUT/bench_train_step.md" \
    || echo "bench_train_step.py failed or timed out (status $?)"
echo "bench: $((SECONDS - START)) s"

echo "## 2. chapters $CHAPTERS on the phantom (limit ${CHAPTER_TIMEOUT} s each)"
OVERRIDES="{train.warmup_epochs: $WARM_EPOCHS, train.rollout_epochs: $ROLL_EPOCHS"
if [[ $MODELS == paper ]]; then
    OVERRIDES="$OVERRIDES, model.fusion: fuse4seg_paper, model.segmentation: convnext_unet_paper"
fi
OVERRIDES="$OVERRIDES}"
echo "overrides: $OVERRIDES"
FAILED=0
for n in $CHAPTERS; do
    src=$(ls "$ROOT"/book/"$n"_*.md)
    name=$(basename "$src" .md)
    t0=$SECONDS
    "$PY" -m jupytext --quiet --to ipynb -o "$OUT/work/$name.ipynb" "$src"
    if timeout "$CHAPTER_TIMEOUT" "$PY" -m papermill --no-progress-bar -k python3 \
        --cwd "$OUT/work" "$OUT/work/$name.ipynb" "$OUT/chapters/$name.ipynb" \
        -p profile "$PROFILE" -p device "$DEVICE" -p data_dir "$OUT/work/phantom" \
        -p runs_dir "$OUT/work/runs" -p cache_dir "$OUT/work/cache" \
        -y "overrides: $OVERRIDES"; then
        echo "chapter $name: ok in $((SECONDS - t0)) s"
    else
        echo "chapter $name: FAILED (status $?) after $((SECONDS - t0)) s" \
             "(see $OUT/chapters/$name.ipynb)"
        FAILED=1
    fi
done
echo "# gpu_check.sh done in $((SECONDS - START)) s; outputs in $OUT"
exit $FAILED
