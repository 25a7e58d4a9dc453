#!/usr/bin/env bash
# One device call: parity (GPU vs CPU twin vs PyTorch), the benchmark sweep and the
# PyTorch peers on the same GPU, weights and input. Writes
# bench/results/<gpu>-restormer.{json,md} (and copies them, with full logs, to $OUT).
#
#   tools/gpu-check.sh            # full run (about 9.5 minutes on an H100)
#   QUICK=1 tools/gpu-check.sh    # smaller sweep, for a smoke test
#
# Environment: APERTURE_BIN (default .carry/aperture), OUT (default ./out),
# BATCHES and ITERS (the fp16 sweep), OTHER_PRECISIONS and OTHER_BATCHES (a shorter
# sweep), PROFILE_BATCHES=1,32 for per-operation tables, PEERS=0 to skip PyTorch,
# PEERS_TIMEOUT seconds for them (default 240) or CALL_LIMIT seconds for the whole call
# (the peers then get what is left, less 40 s for the results step). A kernel cache
# carried as .carry/cache.tgz (a tar of $XDG_CACHE_HOME's contents) is unpacked first
# and saved back to $OUT/cache.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${APERTURE_BIN:-.carry/aperture}
OUT=${OUT:-out}
mkdir -p "$OUT" bench/results
WORK=$(mktemp -d)
# shellcheck source=tools/lib.sh
. tools/lib.sh
gpu_tool_env "$WORK"
if [ "${QUICK:-0}" = 1 ]; then
  BATCHES=${BATCHES:-1,8,32}; ITERS=${ITERS:-20}
  OTHER_PRECISIONS=${OTHER_PRECISIONS:-bf16}; OTHER_BATCHES=${OTHER_BATCHES:-1,8}
  PEER_ARGS="--eager-fp32 1 --eager-fp16 1,8 --compile-fp16 1 --iters 10"
else
  BATCHES=${BATCHES:-1,2,4,8,16,32,64}; ITERS=${ITERS:-20}
  OTHER_PRECISIONS=${OTHER_PRECISIONS:-bf16,tf32,fp32}; OTHER_BATCHES=${OTHER_BATCHES:-1,8}
  # torch.compile takes ~40-90 s per batch size: batch 8 was its best in DESIGN.md.
  PEER_ARGS=${PEER_ARGS:-"--eager-fp32 1 --eager-fp16 1,8,32 --compile-fp16 8,1 --iters 20"}
fi
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/NVIDIA //; s/[^A-Za-z0-9]\+/-/g; s/-$//' | tr A-Z a-z)
"$BIN" --version

step "weights and PyTorch references"
python3 tools/restormer_ref.py "$WORK/base" --size 64 > "$WORK/weights.log" 2>&1 || { cat "$WORK/weights.log"; exit 1; }
python3 tools/torch_peers.py reference --weights "$WORK/base" --height 512 --width 512 --out "$WORK/io_512x512.safetensors"
python3 tools/torch_peers.py reference --weights "$WORK/base" --height 520 --width 776 --out "$WORK/io_520x776.safetensors"

step "parity"
"$BIN" bench --model "$WORK/base" --check --reference "$WORK/io_512x512.safetensors" \
  --reference "$WORK/io_520x776.safetensors" --precision fp32,tf32,fp16,bf16 --batch 1 --iters 3 \
  --no-accuracy 2>&1 | tee "$OUT/parity.log"
PARITY=$?

step "benchmark"
"$BIN" bench --model "$WORK/base" --precision fp16 --batch "$BATCHES" --iters "$ITERS" \
  --out "$WORK/aperture.json" 2>&1 | tee "$OUT/bench.log"
if [ -n "${PROFILE_BATCHES:-}" ]; then
  "$BIN" bench --model "$WORK/base" --precision fp16 --batch "$PROFILE_BATCHES" --iters 1 --warmup 1 \
    --no-accuracy --profile 2>&1 | tee "$OUT/profile.log"
fi
if [ -n "$OTHER_PRECISIONS" ]; then
  "$BIN" bench --model "$WORK/base" --precision "$OTHER_PRECISIONS" --batch "$OTHER_BATCHES" --iters "$ITERS" \
    --out "$WORK/aperture-other.json" 2>&1 | tee "$OUT/bench-other.log"
  python3 - "$WORK/aperture.json" "$WORK/aperture-other.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
a["rows"] += b["rows"]
json.dump(a, open(sys.argv[1], "w"), indent=1)
PY
fi

kernel_cache_save "$OUT"

if [ "${PEERS:-1}" = 1 ]; then
  PEERS_TIMEOUT=${PEERS_TIMEOUT:-240}
  if [ -n "${CALL_LIMIT:-}" ]; then
    PEERS_TIMEOUT=$((CALL_LIMIT - SECONDS - 40))
  fi
  step "PyTorch peers (${PEERS_TIMEOUT} s)"
  # shellcheck disable=SC2086
  timeout "$PEERS_TIMEOUT" python3 tools/torch_peers.py bench --weights "$WORK/base" --json "$WORK/torch.json" $PEER_ARGS 2>&1 | tee "$OUT/peers.log"
fi

step "results"
VERSION=$("$BIN" --version | awk '{print $2}')
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
PASSED=$(grep -cE " ok$" "$OUT/parity.log")
# The rows over their bounds, by precision (their names repeat per reference input).
OVER=$(grep -E " FAIL$" "$OUT/parity.log" | awk '{print $NF=="FAIL" ? $(NF-3) : ""}' | sort | uniq -c \
  | awk '{printf "%s%s: %d rows", (NR>1 ? ", " : ""), $2, $1}')
python3 tools/torch_peers.py merge --aperture "$WORK/aperture.json" --torch "$WORK/torch.json" \
  --out-json "bench/results/$GPU-restormer.json" --out-md "bench/results/$GPU-restormer.md" --version "$VERSION" \
  --note "one device call at commit $COMMIT (\`tools/gpu-check.sh\`: parity, benchmark and peers; full logs with the call's output)" \
  --note "parity (\`aperture bench --check --reference\`, 512x512 and 520x776): $PASSED rows within their bounds${OVER:+; over their bounds: $OVER}"
cp "bench/results/$GPU-restormer.json" "bench/results/$GPU-restormer.md" "$OUT/" 2>/dev/null
echo
grep -E "FAIL|^model|^graph" "$OUT/parity.log" | sed 's/^/  /'
echo "parity: $([ $PARITY = 0 ] && echo all passed || echo FAILURES)"
