#!/usr/bin/env bash
# Served vs in-process on one GPU, one device call: for each model and batch size,
# `aperture bench` (CUDA-graph replays timed with events) and `aperture serve`
# (max_batch_size = that batch, so requests are never merged) under `aperture loadgen`
# (two clients, binary tensors over HTTP on loopback). One line per (model, batch) with
# the ratio; logs and CSVs under $OUT/served.
#
#   APERTURE_BIN=.carry/aperture tools/served_vs_bench.sh
#
# Environment: BATCHES (default "1 8 32"), PRECISION (default fp16), WINDOW_MS (4000, per
# 8 images of batch: enough whole batches in each window), INSTANCES (model instances, 1),
# CLIENTS (concurrent loadgen clients, 2), MODELS (default "restormer dfine"),
# SHARED_MEMORY (none, or system: input tensors in registered POSIX shared memory).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${APERTURE_BIN:-.carry/aperture}
OUT=${OUT:-out}/served
mkdir -p "$OUT"
W=$(mktemp -d)
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$W/cache}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
P=${PRECISION:-fp16}
WINDOW=${WINDOW_MS:-4000}
INSTANCES=${INSTANCES:-1}
CLIENTS=${CLIENTS:-2}
SHM=${SHARED_MEMORY:-none}
MODELS=${MODELS:-restormer dfine}
python3 tools/restormer_ref.py "$W/restormer" --size 64 > /dev/null || exit 1
# shellcheck source=tools/lib.sh
. tools/lib.sh
dfine_x_folder "$W/dfine" || exit 1

for spec in "restormer 3,512,512 786432" "dfine 3,640,640 1228800"; do
  read -r name shape pixels <<< "$spec"
  [[ " $MODELS " == *" $name "* ]] || continue
  for b in ${BATCHES:-1 8 32}; do
    tag="$name-$P-b$b-i$INSTANCES-c$CLIENTS"
    window=$(( WINDOW * ((b + 7) / 8) ))
    "$BIN" bench --model "$W/$name" --precision "$P" --batch "$b" --iters 20 --no-accuracy --json \
      > "$OUT/$tag-bench.json" 2> "$OUT/$tag-bench.log"
    inproc=$(python3 -c "import json,sys; print('%.1f' % json.load(open(sys.argv[1]))['rows'][0]['images_per_s'])" "$OUT/$tag-bench.json" 2>/dev/null || echo 0)
    body=$(( b * pixels * 4 / 1048576 + 2 ))
    "$BIN" serve --model "$W/$name" --architecture "$name" --name m --host 127.0.0.1 --http-port 18000 \
      --grpc-port 0 --metrics-port 18002 --max-batch-size "$b" --max-body-mb $(( body > 64 ? body : 64 )) --input-size "$shape" \
      --device cuda --precision "$P" --instances "$INSTANCES" > "$OUT/$tag-serve.log" 2>&1 &
    pid=$!
    wait_for_ready 18000
    "$BIN" loadgen -m m -u 127.0.0.1:18000 --concurrency-range "$CLIENTS" --shared-memory "$SHM" -b "$b" --shape "$shape" \
      --warmup-ms "$window" --measurement-interval "$window" --csv "$OUT/$tag-loadgen.csv" > "$OUT/$tag-loadgen.log" 2>&1
    served=$(python3 -c "import csv,sys; r=list(csv.DictReader(open(sys.argv[1]))); print('%.1f' % float(r[0]['Inferences/Second']))" "$OUT/$tag-loadgen.csv" 2>/dev/null || echo 0)
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    ratio=$(python3 -c "import sys; a, s = map(float, sys.argv[1:]); print('%.2f' % (s / a) if a > 0 else '-')" "$inproc" "$served")
    echo "$name $P batch $b: in-process (aperture bench) $inproc images/s, served (loadgen, $CLIENTS clients, $INSTANCES instance(s), shared memory $SHM) $served images/s, served/in-process $ratio"
  done
done
