#!/usr/bin/env bash
# The CUDA checks of one short GPU session, in one go, inside a wall-clock budget:
#   1. the machine (nvidia-smi, torch), 2. decode the data once (cached for the runs below),
#   3. tests/test_cuda.py, 4. resnet18-gpu and 5. vit-gpu with time_to_accuracy.py, each sized to
#   its share of minutes by --epochs-for-minutes, 6. the speedrun if time is left.
# Each stage runs under `timeout` with what is left of the budget, so one that fails or hangs
# costs only its share; logs go to OUT_DIR (one per stage, plus the runs' metrics.csv files).
#
#   [STAGES="env data tests resnet18 vit speedrun"] \
#   benchmarks/cuda_session.sh DATA_DIR OUT_DIR [BUDGET_SECONDS=510] [RESNET_MIN=2.3] [VIT_MIN=2.3]
#
# Results measured with it: benchmarks/README.md "CUDA".
set -u
DATA=${1:?usage: cuda_session.sh DATA_DIR OUT_DIR [BUDGET_SECONDS] [RESNET_MIN] [VIT_MIN]}
OUT=${2:?usage: cuda_session.sh DATA_DIR OUT_DIR [BUDGET_SECONDS] [RESNET_MIN] [VIT_MIN]}
BUDGET=${3:-510}
RESNET_MIN=${4:-2.3}
VIT_MIN=${5:-2.3}
PY=${PYTHON:-python3}
STAGES=${STAGES:-env data tests resnet18 vit speedrun}  # a subset runs only those
RUNS=${RUNS:-$(mktemp -d)}
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CIFARLAB_TEST_DATA=$DATA
mkdir -p "$OUT"
START=$(date +%s)

elapsed() { echo $(( $(date +%s) - START )); }

# stage NAME LIMIT_SECONDS CMD...: run CMD with at most LIMIT seconds (less if the budget is nearly spent)
stage() {
    local name=$1 limit=$2 left rc
    shift 2
    if [[ " $STAGES " != *" $name "* ]]; then
        return
    fi
    left=$(( BUDGET - $(elapsed) ))
    (( limit > left )) && limit=$left
    if (( limit < 15 )); then
        echo "== $name: skipped, ${left} s of the budget left"
        return
    fi
    echo "== $name: start at $(elapsed) s, limit ${limit} s"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc at $(elapsed) s"
    tail -n 4 "$OUT/$name.log"
}

stage env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name())'"
stage data 60 $PY benchmarks/decode_data.py "$DATA"
stage tests 90 $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider
stage resnet18 $(( ${RESNET_MIN%.*} * 60 + 110 )) $PY benchmarks/time_to_accuracy.py configs/resnet18-gpu.yaml \
    --data "$DATA" --target 0.95 --epochs-for-minutes "$RESNET_MIN" --eval-every 10 --out "$RUNS"
stage vit $(( ${VIT_MIN%.*} * 60 + 110 )) $PY benchmarks/time_to_accuracy.py configs/vit-gpu.yaml \
    --data "$DATA" --target 0.90 --epochs-for-minutes "$VIT_MIN" --eval-every 10 --out "$RUNS"
stage speedrun 90 $PY benchmarks/time_to_accuracy.py configs/speedrun.yaml \
    --data "$DATA" --target 0.93 --eval-every 3 --out "$RUNS"
for m in "$RUNS"/*/metrics.csv; do
    [ -f "$m" ] && { echo "# $m"; cat "$m"; }
done >"$OUT/metrics.txt"
echo "== done at $(elapsed) s"
