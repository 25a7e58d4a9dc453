# Helpers shared by the GPU tools; source it from the repository root:
#   . tools/lib.sh

# dfine_x_folder DIR: the D-FINE-X model folder (seeded weights rebuilt from the
# fixture's manifest, config.json, preprocessor_config.json) in DIR.
dfine_x_folder() {
  mkdir -p "$1" || return 1
  python3 tools/dfine_golden.py "$1/model.safetensors" --materialize tests/fixtures/dfine/x/manifest.json > /dev/null || return 1
  cp tests/fixtures/dfine/x/config.json tests/fixtures/dfine/x/preprocessor_config.json "$1/"
}

# wait_for_port PORT [TRIES]: returns once 127.0.0.1:PORT accepts connections (tries
# 0.2 s apart, 600 by default); fails when it never does.
wait_for_port() {
  local _
  for _ in $(seq 1 "${2:-600}"); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}
