#!/usr/bin/env bash
# The project's test suite: Rust unit + integration tests, then the Python peer tests
# (pycocotools, Pillow, tritonclient) against the built binary. Runs without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== python test dependencies"
python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

echo "== cargo build (binary and examples used by the python tests)"
cargo build --workspace --bins --examples

echo "== cargo test"
cargo test --workspace

echo "== python peer tests"
export APERTURE_BIN="$PWD/target/debug/aperture"
set +e
python3 -m pytest -q tests/python
status=$?
set -e
# pytest exits 5 when it collects nothing: that is a failure of the suite, not a pass.
exit $status
