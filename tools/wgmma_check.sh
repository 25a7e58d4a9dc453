#!/usr/bin/env bash
# The opt-in wgmma paths in one device call (H100/H200; see docs/cuda.md, "Hopper"):
#   1. the CUDA self-test with every convolution case on the warp-specialised kernels and
#      1x1 products on wgmma tiles (APERTURE_WGMMA=ws-force APERTURE_WGMMA_1X1=1), fp16
#      and bf16, on Restormer-base weights at 256x256;
#   2. `aperture check-dfine` with both (APERTURE_WGMMA=ws APERTURE_WGMMA_1X1=1);
#   3. `aperture bench` D-FINE-X fp16, batches 1 and 32, for each setting (default, ws,
#      1x1, both), graph replays, medians in the logs.
# Environment: APERTURE_BIN (default .carry/aperture), OUT (default ./out).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${APERTURE_BIN:-.carry/aperture}
OUT=${OUT:-out}
if [ ! -x "$BIN" ]; then
  echo "no aperture binary at $BIN (build it: cargo build --release -p aperture-cli; set APERTURE_BIN)" >&2
  exit 2
fi
mkdir -p "$OUT"
WORK=$(mktemp -d)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$WORK/cache}
# shellcheck source=tools/lib.sh
. tools/lib.sh
status=0
python3 tools/restormer_ref.py "$WORK/base" --size 64 > "$WORK/weights.log" 2>&1 || { cat "$WORK/weights.log"; exit 1; }
APERTURE_WGMMA=ws-force APERTURE_WGMMA_1X1=1 timeout 400 "$BIN" bench --model "$WORK/base" --check \
  --precision fp16,bf16 --size 256 --batch 1 --iters 3 > "$OUT/selftest-ws.log" 2>&1
echo "self-test, warp-specialised wgmma for every grid, 1x1 on wgmma: rc $?"
grep -E "conv" "$OUT/selftest-ws.log" | grep -v " ok$"
echo "convolution rows passing: $(grep -cE "^conv.* ok$" "$OUT/selftest-ws.log")"
dfine_x_folder "$WORK/x" || exit 1
APERTURE_WGMMA=ws APERTURE_WGMMA_1X1=1 timeout 300 "$BIN" check-dfine --model "$WORK/x" \
  --golden tests/fixtures/dfine/x/golden.safetensors --time-batches 1 --iters 3 > "$OUT/check-dfine.log" 2>&1
rc=$?
echo "check-dfine with both: rc $rc"
grep -E "FAIL|fp16 vs" "$OUT/check-dfine.log" | head -20
[ "$rc" = 0 ] || status=1
for setting in "default:" "ws:APERTURE_WGMMA=ws" "1x1:APERTURE_WGMMA_1X1=1" "both:APERTURE_WGMMA=ws APERTURE_WGMMA_1X1=1"; do
  name=${setting%%:*}
  # shellcheck disable=SC2086
  env ${setting#*:} timeout 150 "$BIN" bench --model "$WORK/x" --device cuda --precision fp16 --batch 1,32 \
    --iters 30 --no-accuracy --out "$OUT/bench-$name.json" > "$OUT/bench-$name.log" 2>&1 || status=1
  echo "$name:"
  grep -E "^aperture" "$OUT/bench-$name.log"
done
exit $status
