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
# Served through padded graphs: a batch of 2 runs in the graph captured for 4
# (max_batch_size 4); only the request's rows come back, equal to PyTorch's output
# (Restormer) and transformers' (D-FINE, tiny config).
served_padded() {  # model arch weights-file input output
  "$BIN" serve --model "$1" --architecture "$2" --name m --host 127.0.0.1 --http-port 18100 \
    --grpc-port 0 --metrics-port 18102 --max-batch-size 4 --device cuda --precision fp32 > "$W/serve-$2.log" 2>&1 &
  local pid=$!
  python3 - "$3" "$4" "$5" <<'PY'
import json, sys, time, urllib.request
import numpy as np
from safetensors.numpy import load_file
io = load_file(sys.argv[1])
x, ref = io[sys.argv[2]].astype(np.float32), io[sys.argv[3]].astype(np.float64)
body = json.dumps({"inputs": [{"name": sys.argv[2], "shape": list(x.shape), "datatype": "FP32",
                               "data": x.ravel().tolist()}]}).encode()
for _ in range(300):
    try:
        req = urllib.request.Request("http://127.0.0.1:18100/v2/models/m/infer", body,
                                     {"Content-Type": "application/json"})
        outs = json.load(urllib.request.urlopen(req, timeout=120))["outputs"]
        break
    except urllib.error.HTTPError as e:
        sys.exit(f"served padded check: HTTP {e.code}: {e.read().decode()[:300]}")
    except OSError:
        time.sleep(0.2)
else:
    sys.exit("served padded check: no answer")
out = next(o for o in outs if o["name"] == sys.argv[3])
y = np.array(out["data"], dtype=np.float64).reshape(out["shape"])
print(f"served {sys.argv[3]} for batch {x.shape[0]} from the batch-4 graph: shape {out['shape']}, "
      f"rel L2 vs PyTorch fp32 = {np.linalg.norm(y - ref) / np.linalg.norm(ref):.3e}")
PY
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
}
served_padded $F restormer $F/io.safetensors x y
D=tests/fixtures/dfine/tiny
served_padded $D dfine $D/golden.safetensors pixel_values logits
