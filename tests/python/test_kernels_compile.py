"""Every CUDA kernel module compiles for Hopper (sm_90a) with NVRTC 12.9 from NVIDIA's
pip wheels, as the backend builds it at run time on a GPU: a broken kernel fails here,
on a machine without a GPU, instead of in a device call. The sources come from the
`kernel_sources` example (`cargo build --workspace --examples`); tools/kernel_ptx.py
compiles them."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import kernel_ptx  # noqa: E402

DUMP = Path(os.environ.get("APERTURE_KERNEL_SOURCES", REPO / "target" / "debug" / "examples" / "kernel_sources"))

# Entry points that must come out of the Hopper build with code in them (their bodies
# are empty unless the module is built for sm_90a).
HOPPER_ENTRIES = ["conv_wgmma_n64", "conv_wgmma_n128", "conv_wgmma_n192",
                  "sources_wgmma_n64", "sources_wgmma_n128"]
# mma.sync kernels of the 16-bit convolution module that the host loads by name (the
# stem's few-taps product and the opt-in tensor-core depthwise kernels).
MMA_ENTRIES = ["small_taps_mma32", "small_taps_mma64",
               "small_taps_mma_staged32", "small_taps_mma_staged64"] + [
    f"dwm{k}_w{w}" for k in (3, 5) for w in (4, 6, 8)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    if not DUMP.exists():
        pytest.fail(f"{DUMP} missing: run `cargo build --workspace --examples` first")
    out = tmp_path_factory.mktemp("kernels")
    subprocess.run([str(DUMP), str(out)], check=True, stdout=subprocess.DEVNULL)
    return sorted(out.glob("*.cu"))


def test_every_module_compiles_for_hopper(sources):
    names = {p.stem for p in sources}
    assert {"main_f32", "main_f16", "main_bf16", "detection_f16", "conv_f16", "conv_bf16"} <= names
    kernel_ptx.toolkit()  # install once, before the threads
    # NVRTC runs outside the GIL: the modules compile side by side.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = dict(zip(sources, pool.map(
            lambda p: kernel_ptx.compile_source(p.read_bytes(), "sm_90a", ptx=False), sources)))
    for path, (ok, log, _) in results.items():
        assert ok, f"{path.name} does not compile:\n{log[:4000]}"
    for storage in ["f16", "bf16"]:
        ok, log, _ = results[next(p for p in sources if p.stem == f"conv_{storage}")]
        rows = {entry: regs for entry, regs, _, _ in kernel_ptx.resources(log)}
        for entry in HOPPER_ENTRIES:
            # An empty body needs a handful of registers; the real kernels take 90+.
            assert rows.get(entry, 0) >= 64, f"conv_{storage}: {entry} has {rows.get(entry)} registers"
        for entry in MMA_ENTRIES:
            assert entry in rows, f"conv_{storage}: {entry} missing"
