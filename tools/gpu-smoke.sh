#!/usr/bin/env bash
# A short device call: Restormer-base parity (fp32, fp16) against the CPU twin and
# PyTorch at 512x512, an fp16 sweep at batch 1/8/32, and `aperture run --device cuda`
# (captured graphs) on the small fixture against PyTorch's output. About 3 minutes.
#   APERTURE_BIN=.carry/aperture tools/gpu-smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${APERTURE_BIN:-.carry/aperture}
OUT=${OUT:-out}
mkdir -p "$OUT"
W=$(mktemp -d)
export XDG_CACHE_HOME=$W/cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 tools/restormer_ref.py "$W/base" --size 64 > /dev/null
python3 tools/torch_peers.py reference --weights "$W/base" --height 512 --width 512 --out "$W/io.safetensors"
"$BIN" bench --model "$W/base" --check --reference "$W/io.safetensors" --precision fp32,fp16 --batch 1 \
  --iters 3 --no-accuracy 2>&1 | tee "$OUT/parity.log" | tail -25
"$BIN" bench --model "$W/base" --precision fp16 --batch 1,8,32 --iters 20 --out "$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.log" | tail -12
F=tests/fixtures/restormer/withbias
for p in fp32 fp16; do
  "$BIN" run --model $F --input $F/io.safetensors --input-name x --output "$W/y_$p.safetensors" \
    --device cuda --precision $p
  python3 - "$W/y_$p.safetensors" $F/io.safetensors $p <<'PY'
import sys
from safetensors.numpy import load_file
import numpy as np
y = load_file(sys.argv[1])["y"].astype(np.float64); ref = load_file(sys.argv[2])["y"].astype(np.float64)
print(f"run --device cuda --precision {sys.argv[3]}: rel L2 vs PyTorch fp32 = {np.linalg.norm(y - ref) / np.linalg.norm(ref):.3e}")
PY
done
