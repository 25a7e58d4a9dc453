# Helpers shared by the GPU tools; source it from the repository root:
#   . tools/lib.sh

# dfine_x_folder DIR: the D-FINE-X model folder (seeded weights rebuilt from the
# fixture's manifest, config.json, preprocessor_config.json) in DIR.
dfine_x_folder() {
  mkdir -p "$1" || return 1
  python3 tools/dfine_golden.py "$1/model.safetensors" --materialize tests/fixtures/dfine/x/manifest.json > /dev/null || return 1
  cp tests/fixtures/dfine/x/config.json tests/fixtures/dfine/x/preprocessor_config.json "$1/"
}

# wait_for_ready PORT [TRIES]: returns once `aperture serve` on 127.0.0.1:PORT answers
# 200 to GET /v2/health/ready (tries 0.2 s apart, 1200 by default: the port opens
# before the models load, and a first GPU start compiles kernels); fails when it never
# does.
wait_for_ready() {
  local _ status
  for _ in $(seq 1 "${2:-1200}"); do
    status=$( (exec 3<>/dev/tcp/127.0.0.1/"$1" &&
      printf 'GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3 &&
      head -c 12 <&3) 2>/dev/null)
    [ "${status#HTTP/1.1 }" = "200" ] && return 0
    sleep 0.2
  done
  return 1
}

# gpu_tool_env WORK: the environment of a device-call script: CUDA libraries on the
# loader path, unbuffered Python, and the NVRTC kernel cache in $XDG_CACHE_HOME (default
# WORK/cache), seeded from .carry/cache.tgz when carried (a tar of a cache folder's
# contents; save it back with `kernel_cache_save OUT`).
gpu_tool_env() {
  export PYTHONUNBUFFERED=1
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$1/cache}
  mkdir -p "$XDG_CACHE_HOME"
  if [ -f .carry/cache.tgz ]; then
    tar xzf .carry/cache.tgz -C "$XDG_CACHE_HOME"
  fi
}

# kernel_cache_save OUT: the kernel cache as OUT/cache.tgz, for the next call to carry.
kernel_cache_save() {
  (cd "$XDG_CACHE_HOME" && tar czf "$1/cache.tgz" .)
}
