#!/usr/bin/env bash
# Which launch's cuDNN operation-graph plan makes D-FINE's CUDA-graph replay differ from
# its eager pass, if one does? check-dfine (fp16, batch 1) with APERTURE_CUDNN_GRAPH=${MODE:-on}
# and at most N launches on graph plans (APERTURE_CUDNN_GRAPH_LIMIT), N doubling until the
# "graph vs eager" row fails, then the plans taken (engine numbers) of the failing run.
# Each line also counts the plans taken and those refused at the choice because their
# own replay from a captured graph differed.
# One device call:
#
#   tools/cudnn_graph_bisect.sh
#
# Environment: APERTURE_BIN (default .carry/aperture), OUT (default ./out), MODE
# (on or packed), LIMITS (default "1 2 4 8 16 32 64").
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${APERTURE_BIN:-.carry/aperture}
OUT=${OUT:-out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
# shellcheck source=tools/lib.sh
. tools/lib.sh
gpu_tool_env "$WORK"
dfine_x_folder "$WORK/x" || exit 1
for n in ${LIMITS:-1 2 4 8 16 32 64}; do
  log="$WORK/check-$n.log"
  APERTURE_CUDNN_GRAPH=${MODE:-on} APERTURE_CUDNN_GRAPH_LIMIT=$n RUST_LOG=aperture_cuda::cudnn_conv=debug \
    timeout 150 "$BIN" check-dfine --model "$WORK/x" --golden tests/fixtures/dfine/x/golden.safetensors \
    --precisions fp16 --batches 1 --time-batches 1 --iters 3 > "$log" 2>&1
  row=$(grep -E "graph vs eager" "$log" | tail -1)
  taken=$(grep -c "took graph" "$log")
  refused=$(grep -c "replayed from a CUDA graph: not taken" "$log")
  echo "limit $n: $taken plans taken, $refused refused by the replay check; $row"
  if echo "$row" | grep -q FAIL; then
    cp "$log" "$OUT/check-limit-$n.log"
    grep -E "took graph" "$log" | sed -E 's/.*convolution //' | cut -c1-400
    break
  fi
done
kernel_cache_save "$OUT"
