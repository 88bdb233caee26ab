#!/usr/bin/env bash
# Many recipe runs in one short GPU session: a PLAN of time_to_accuracy.py runs grouped into lanes; the runs of
# a lane go one after another, the lanes side by side on the one GPU. Small nets and the launch-bound ViT leave
# the GPU idle between kernels, and a second process fills those gaps. What this measures is accuracy after a
# given number of epochs (the same on any device, up to floating-point noise): the lanes share the GPU, so
# their training minutes are not speeds. That is how a CPU recipe's epochs are chosen before the CPU's hour is
# spent on it, and how a long GPU recipe runs beside them.
#
#   benchmarks/gpu_lanes.sh PLAN DATA_DIR OUT_DIR [BUDGET_SECONDS=540]
#
# PLAN: one run per line, "LANE NAME CONFIG [ARGS...]", ARGS passed on to time_to_accuracy.py (after
# --data DATA_DIR --out RUNS); or "LANE NAME !COMMAND..." for a shell command (e.g. the CUDA tests).
# Blank lines and lines starting with # are skipped. Each run has at most what is left of the budget
# (`timeout`); a lane stops when under 20 s are left. Per run, OUT_DIR gets NAME.log and NAME.metrics.csv;
# OUT_DIR/summary.txt gets one line per run: its exit status, wall seconds and the log's last line (the JSON).
# At the end the logs and metrics are packed into OUT_DIR/runs.tar.gz, beside summary.txt.
# Plans measured with it: benchmarks/plans/, results in benchmarks/README.md.
set -u
PLAN=${1:?usage: gpu_lanes.sh PLAN DATA_DIR OUT_DIR [BUDGET_SECONDS]}
DATA=${2:?usage: gpu_lanes.sh PLAN DATA_DIR OUT_DIR [BUDGET_SECONDS]}
OUT=${3:?usage: gpu_lanes.sh PLAN DATA_DIR OUT_DIR [BUDGET_SECONDS]}
BUDGET=${4:-540}
PY=${PYTHON:-python3}
PLAN=$(realpath "$PLAN")
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
RUNS=${RUNS:-$(mktemp -d)}
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CIFARLAB_TEST_DATA=$DATA OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
runs_of() { grep -v '^[[:space:]]*#' "$PLAN" | awk -v lane="$1" 'NF && $1 == lane'; }

# Decode the images once; every run after this reads the decoded cache.
$PY benchmarks/decode_data.py "$DATA" 2>&1 | tail -n 1 | tee "$OUT/data.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/env.log"

lane() {
    local name config args left t0 rc
    while read -r _ name config args; do
        left=$(( BUDGET - $(elapsed) ))
        if (( left < 20 )); then
            echo "$name: not run, ${left} s of the budget left" >>"$OUT/summary.txt"
            continue
        fi
        t0=$(date +%s)
        if [[ $config == !* ]]; then
            timeout "$left" bash -c "${config#!} $args" >"$OUT/$name.log" 2>&1
        else
            # shellcheck disable=SC2086  # ARGS are words by design
            timeout "$left" $PY benchmarks/time_to_accuracy.py "$config" --data "$DATA" --out "$RUNS/$name" $args \
                >"$OUT/$name.log" 2>&1
        fi
        rc=$?
        cp "$RUNS/$name"/*/metrics.csv "$OUT/$name.metrics.csv" 2>/dev/null
        echo "$name: exit $rc, $(( $(date +%s) - t0 )) s, ended at $(elapsed) s | $(tail -n 1 "$OUT/$name.log")" \
            >>"$OUT/summary.txt"
    done < <(runs_of "$1")
}

for l in $(grep -v '^[[:space:]]*#' "$PLAN" | awk 'NF {print $1}' | sort -u); do
    lane "$l" &
done
wait
echo "done at $(elapsed) s" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
# One archive of the logs and metrics: a device tool that returns only a few files still returns them all.
(cd "$OUT" && tar czf runs.tar.gz --exclude runs.tar.gz -- *.log *.csv 2>/dev/null && rm -f -- *.log *.csv)
