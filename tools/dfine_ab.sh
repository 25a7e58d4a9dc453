#!/usr/bin/env bash
# A/B of one environment switch on D-FINE-X in one device call: `aperture check-dfine`
# with the switch at its last value (every operation, the exact top-k rows and the model
# against the CPU backend and transformers), then `aperture bench` (fp16 graph replays)
# once per value, and a summary of the batch-1 latency and batch-32 throughput per value.
#
#   tools/dfine_ab.sh APERTURE_DEFORMABLE scalar vec
#   tools/dfine_ab.sh APERTURE_SMALL_TAPS 0 1
#
# Environment: APERTURE_BIN (default .carry/aperture), OUT (default ./out), BATCHES
# (default 1,32), ITERS (default 50), CHECK=0 to skip check-dfine.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: $0 VARIABLE VALUE [VALUE ...]" >&2
  exit 2
fi
var=$1
shift
BIN=${APERTURE_BIN:-.carry/aperture}
OUT=${OUT:-out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$WORK/cache}
# shellcheck source=tools/lib.sh
. tools/lib.sh
dfine_x_folder "$WORK/x" || exit 1
status=0
last=${*: -1}
if [ "${CHECK:-1}" != 0 ]; then
  env "$var=$last" "$BIN" check-dfine --model "$WORK/x" --golden tests/fixtures/dfine/x/golden.safetensors \
    --time-batches 1 --iters 3 > "$OUT/check-dfine.log" 2>&1
  rc=$?
  echo "check-dfine with $var=$last: rc $rc"
  grep -E "FAIL" "$OUT/check-dfine.log" | head -20
  [ "$rc" = 0 ] || status=1
fi
for v in "$@"; do
  env "$var=$v" "$BIN" bench --model "$WORK/x" --device cuda --precision fp16 --batch "${BATCHES:-1,32}" \
    --iters "${ITERS:-50}" --out "$OUT/bench-$v.json" > "$OUT/bench-$v.log" 2>&1 || status=1
  echo "$var=$v:"
  grep -E "^aperture" "$OUT/bench-$v.log"
done
exit $status
