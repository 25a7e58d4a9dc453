#!/usr/bin/env bash
# D-FINE on the GPU in one device call: rebuilds the X-shaped weights from the fixture's
# manifest, runs `aperture check-dfine` (every operation and the whole model against the
# CPU backend and transformers' golden, fp32/bf16/fp16, eager timings, a per-operation
# profile), `aperture bench` (CUDA-graph sweep fp32/fp16/bf16 x batch 1/8/32 in the
# Restormer results' JSON layout, then per-operation profiles of fp16 batch 1 and 32),
# a `detect --device cuda` smoke test, then the PyTorch peers (precision study,
# activation ranges, eager and torch.compile timings). Logs and JSON go to $OUT;
# bench/results/<gpu>-dfine.{json,md} combine them (tools/dfine_report.py).
#
#   tools/dfine_gpu_check.sh
#
# Environment: APERTURE_BIN (default .carry/dfine/aperture), OUT (default ./out),
# CHECK_ARGS (extra check-dfine arguments), BENCH_ARGS (extra bench arguments, e.g.
# "--iters 20"), BENCH=0 to skip the bench, PEERS=0 to skip PyTorch, PEER_ARGS
# (default "--compile"), PEER_TIMEOUT seconds (default 300).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${APERTURE_BIN:-.carry/dfine/aperture}
OUT=${OUT:-out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$WORK/cache}
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

step "X-shaped weights"
# shellcheck source=tools/lib.sh
. tools/lib.sh
dfine_x_folder "$WORK/x" || exit 1

step "check-dfine"
# shellcheck disable=SC2086
"$BIN" check-dfine --model "$WORK/x" --golden tests/fixtures/dfine/x/golden.safetensors \
  --json "$OUT/dfine-check.json" ${CHECK_ARGS:-} 2>&1 | tee "$OUT/dfine-check.log"
CHECK=${PIPESTATUS[0]}

BENCH_RC=0
if [ "${BENCH:-1}" != 0 ]; then
  step "aperture bench (CUDA graphs; rel L2 vs the CPU backend fp32)"
  # shellcheck disable=SC2086
  "$BIN" bench --model "$WORK/x" --device cuda --precision fp32,fp16,bf16 --batch 1,8,32 \
    --out "$OUT/dfine-bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/dfine-bench.log"
  BENCH_RC=${PIPESTATUS[0]}
  step "aperture bench --profile (fp16, batch 1 and 32)"
  "$BIN" bench --model "$WORK/x" --device cuda --precision fp16 --batch 1,32 \
    --iters 20 --warmup 3 --no-accuracy --profile 2>&1 | tee "$OUT/dfine-bench-profile.log"
  [ "${PIPESTATUS[0]}" = 0 ] || BENCH_RC=1
  step "aperture bench --postprocess (fp16; sigmoid + top-k + corners inside the graph)"
  "$BIN" bench --model "$WORK/x" --device cuda --precision fp16 --batch 1,8,32 \
    --iters 20 --postprocess 2>&1 | tee "$OUT/dfine-bench-post.log"
  [ "${PIPESTATUS[0]}" = 0 ] || BENCH_RC=1
  step "aperture bench --preprocess 640x480 (8-bit pixels in, detection rows out, one graph)"
  "$BIN" bench --model "$WORK/x" --device cuda --precision fp16 --batch 1,8,32 \
    --iters 20 --no-accuracy --postprocess --preprocess 640x480 2>&1 | tee "$OUT/dfine-bench-pre.log"
  [ "${PIPESTATUS[0]}" = 0 ] || BENCH_RC=1
fi

step "detect --device cuda"
python3 -c "
import numpy as np, zlib, struct
h, w = 480, 640
img = (np.indices((h, w)).sum(0) % 256).astype(np.uint8)
rgb = np.stack([img, img[::-1], 255 - img], -1)
raw = b''.join(b'\x00' + rgb[y].tobytes() for y in range(h))
def chunk(t, d): return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
open('$WORK/img.png', 'wb').write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)) + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))
"
"$BIN" detect "$WORK/img.png" --model "$WORK/x" --device cuda --threshold 0.3 --json "$OUT/detect-cuda.json" 2>&1 | tail -3
"$BIN" detect "$WORK/img.png" --model "$WORK/x" --device cpu --threshold 0.3 --json "$WORK/detect-cpu.json" 2>&1 | tail -3
python3 - "$OUT/detect-cuda.json" "$WORK/detect-cpu.json" <<'PY'
import json, sys
a, b = (json.load(open(p))["images"][0]["detections"] for p in sys.argv[1:3])
# Random weights give many detections of one label with near-equal scores, so pairing by
# sorted (label, score) mismatches boxes; pair each GPU detection with the CPU detection
# of the same label whose box is closest instead.
def nearest(d):
    same = [e for e in b if e["label"] == d["label"]]
    return min(same, key=lambda e: max(abs(x - y) for x, y in zip(d["box"], e["box"])), default=None)
pairs = [(d, nearest(d)) for d in a]
unmatched = sum(e is None for _, e in pairs)
diffs = sorted(max(abs(x - y) for x, y in zip(d["box"], e["box"])) for d, e in pairs if e is not None)
sdiff = max((abs(d["score"] - e["score"]) for d, e in pairs if e is not None), default=0.0)
med = diffs[len(diffs) // 2] if diffs else 0.0
print(f"detect: cuda {len(a)} detections, cpu {len(b)}; {unmatched} without a CPU detection of the same label; "
      f"nearest same-label box: median |diff| {med:.2e} px, max {diffs[-1] if diffs else 0.0:.2e} px; max |score diff| {sdiff:.2e}")
PY

if [ "${PEERS:-1}" != 0 ]; then
  step "PyTorch peers"
  # shellcheck disable=SC2086
  timeout "${PEER_TIMEOUT:-300}" python3 tools/dfine_torch_peers.py "$WORK/x" --out "$OUT/dfine-peers.json" \
    ${PEER_ARGS:---compile} 2>&1 | tee "$OUT/dfine-peers.log"
fi
step "results"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
python3 tools/dfine_report.py "$OUT/dfine-check.json" "$OUT/dfine-peers.json" --device "$GPU_NAME" --out-dir bench/results \
  && cp bench/results/*-dfine.json bench/results/*-dfine.md "$OUT/" 2>/dev/null
step "done (check-dfine exit $CHECK, bench exit $BENCH_RC)"
[ "$CHECK" = 0 ] || exit "$CHECK"
exit "$BENCH_RC"
