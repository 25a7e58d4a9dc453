#!/usr/bin/env bash
# The image endpoint on the GPU, one device call: `aperture serve` with D-FINE-X (fp16,
# max_batch_size 32, dynamic batching) answers `POST /v1/models/m/detect` with JPEG
# bodies from `aperture loadgen --image` at several concurrencies (decode on the server's
# thread pool, resize + rescale on the GPU, requests merged into batches). While it runs,
# the server's NVML metrics (port 18002) are read next to `nvidia-smi`'s figures.
# Logs and CSVs under $OUT/images.
#
#   APERTURE_BIN=.carry/aperture tools/served_images.sh
#
# Environment: CONCURRENCY (default "1,8,32,64"), WINDOW_MS (default 4000).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${APERTURE_BIN:-.carry/aperture}
OUT=${OUT:-out}/images
mkdir -p "$OUT"
W=$(mktemp -d)
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$W/cache}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
WINDOW=${WINDOW_MS:-4000}
# shellcheck source=tools/lib.sh
. tools/lib.sh
dfine_x_folder "$W/dfine" || exit 1
# A 640x480 photo-like JPEG (smooth gradients and noise), the size of a COCO image.
python3 - "$W/photo.jpg" <<'PY' || exit 1
import sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(7)
y, x = np.mgrid[0:480, 0:640]
img = np.stack([x * 255 / 640, y * 255 / 480, (x + y) * 255 / 1120], -1)
img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
Image.fromarray(img).save(sys.argv[1], quality=90)
PY

RUST_LOG=${RUST_LOG:-aperture_server::image=debug} "$BIN" serve --model "$W/dfine" --architecture dfine --name m --host 127.0.0.1 --http-port 18000 \
  --grpc-port 0 --metrics-port 18002 --max-batch-size 32 --device cuda --precision fp16 \
  > "$OUT/serve.log" 2>&1 &
pid=$!
wait_for_ready 18000
# Sample NVML through the server and nvidia-smi side by side while the load runs.
(
  for _ in $(seq 1 20); do
    sleep 1
    m=$(curl -s http://127.0.0.1:18002/metrics | grep -E '^nv_gpu_(utilization|memory_used_bytes|power_usage)' | tr '\n' ' ')
    s=$(nvidia-smi --query-gpu=utilization.gpu,memory.used,power.draw --format=csv,noheader,nounits)
    echo "server: $m | nvidia-smi (util %, MiB, W): $s"
  done
) > "$OUT/nvml.log" 2>&1 &
sampler=$!
"$BIN" loadgen -m m -u 127.0.0.1:18000 --image "$W/photo.jpg" --task detect \
  --concurrency-range "${CONCURRENCY:-1,8,32,64}" --warmup-ms "$WINDOW" --measurement-interval "$WINDOW" \
  --csv "$OUT/loadgen.csv" > "$OUT/loadgen.log" 2>&1
cat "$OUT/loadgen.log"
wait "$sampler" 2>/dev/null
curl -s http://127.0.0.1:18002/metrics | grep -E '^nv_inference_(exec_count|count)|batch_size' > "$OUT/metrics.txt"
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
head -5 "$OUT/nvml.log"
python3 - "$OUT/serve.log" <<'PY'
import re, statistics, sys
plain = (re.sub(r"\x1b\[[0-9;]*m", "", l) for l in open(sys.argv[1]))
rows = [dict(re.findall(r"(\w+)=(\d+)", l)) for l in plain if "image decoded" in l]
for key in ("decode_us", "preprocess_us"):
    v = [int(r[key]) for r in rows if key in r]
    if v:
        print(f"{key}: median {statistics.median(v):.0f}, p90 {sorted(v)[int(0.9 * len(v))]} over {len(v)} images")
PY
echo "inferences / executions: $(grep -E '^nv_inference_(count|exec_count)' "$OUT/metrics.txt" | tr '\n' ' ')"
