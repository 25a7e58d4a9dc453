#!/usr/bin/env bash
# D-FINE-X against torch.compile in one device call, sized for a 600 s call: aperture's
# CUDA-graph timings (forward, and 8-bit pixels in / detection rows out) at batch 1, 32
# and 64, then torch.compile reduce-overhead fp16 on the same weights, best batch first
# (each batch size compiles anew: ~140 s apiece on an H100, so a short limit still
# yields the batch-64 ratio). The script ends by combining them into
# $OUT/results/<gpu>-dfine.{json,md} (tools/dfine_report.py; copy into bench/results/).
# The steps' JSON land in $OUT as they finish and their logs in one $OUT/run.log, so a
# call cut short keeps what it measured in a handful of files.
#
#   tools/dfine_vs_compile.sh
#
# Environment: APERTURE_BIN (default .carry/aperture), OUT (default ./out), ITERS
# (default 30), PEER_BATCHES (default 64,1,32: the best batch, then batch 1, then 32), PEER_TIMEOUT seconds (default 420), or
# CALL_LIMIT seconds: the peers get what is left of it after aperture's steps (less 20 s).
# COMMIT names the build in the results (default: git describe of the working tree).
# A kernel cache carried as .carry/cache.tgz (a tar of $XDG_CACHE_HOME's contents) is
# unpacked first and saved back to $OUT/cache.tgz, so later calls skip NVRTC.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${APERTURE_BIN:-.carry/aperture}
OUT=${OUT:-out}
ITERS=${ITERS:-30}
if [ ! -x "$BIN" ]; then
  echo "no aperture binary at $BIN (build it: cargo build --release -p aperture-cli; set APERTURE_BIN)" >&2
  exit 2
fi
mkdir -p "$OUT"
WORK=$(mktemp -d)
# shellcheck source=tools/lib.sh
. tools/lib.sh
gpu_tool_env "$WORK"
step() { echo "=== $* ($(date -u +%H:%M:%S))"; }
dfine_x_folder "$WORK/x" || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
status=0

step "aperture forward"
"$BIN" bench --model "$WORK/x" --device cuda --precision fp16 --batch 1,32,64 --iters "$ITERS" \
  --out "$OUT/forward.json" > "$WORK/forward.log" 2>&1 || status=1
cat "$WORK/forward.log" >> "$OUT/run.log"
grep -E "^aperture" "$WORK/forward.log"
step "aperture pixels in, rows out"
"$BIN" bench --model "$WORK/x" --device cuda --precision fp16 --batch 1,32,64 --iters "$ITERS" \
  --no-accuracy --postprocess --preprocess 640x480 --out "$OUT/pixels.json" > "$WORK/pixels.log" 2>&1 || status=1
cat "$WORK/pixels.log" >> "$OUT/run.log"
grep -E "^aperture" "$WORK/pixels.log"
kernel_cache_save "$OUT"

PEER_TIMEOUT=${PEER_TIMEOUT:-420}
if [ -n "${CALL_LIMIT:-}" ]; then
  PEER_TIMEOUT=$((CALL_LIMIT - SECONDS - 20))
fi
step "torch.compile reduce-overhead fp16, batches ${PEER_BATCHES:-64,1,32}, ${PEER_TIMEOUT} s"
timeout "$PEER_TIMEOUT" python3 tools/dfine_torch_peers.py "$WORK/x" --batches "${PEER_BATCHES:-64,1,32}" \
  --iters 20 --compile --compile-modes reduce-overhead --skip-study --skip-eager --out "$OUT/peers.json" \
  > "$WORK/peers.log" 2>&1
echo "peers exit $? (124: stopped by PEER_TIMEOUT; the batches done are in peers.json)"
cat "$WORK/peers.log" >> "$OUT/run.log"
grep -E "torch-compile" "$WORK/peers.log"

step "results"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
# COMMIT overrides: the device copy of a working tree may carry an older .git.
COMMIT=${COMMIT:-$(git describe --always --dirty 2>/dev/null || echo unknown)}
if [ -f "$OUT/forward.json" ] && [ -f "$OUT/peers.json" ]; then
  python3 tools/dfine_report.py "$OUT/forward.json" "$OUT/peers.json" --pre-post "$OUT/pixels.json" \
    --device "$GPU_NAME" --out-dir "$OUT/results" \
    --command "one device call (commit $COMMIT), \`tools/dfine_vs_compile.sh\`: aperture forward and 8-bit pixels to rows at batch 1/32/64, torch.compile reduce-overhead fp16 at ${PEER_BATCHES:-64,1,32} (each compiled afresh)" \
    || status=1
  echo "bench/results files written to $OUT/results (copy them into bench/results/)"
else
  echo "no results file: aperture's or the peers' timings are missing"
  status=1
fi
step "done"
exit $status
