#!/usr/bin/env python3
"""Compile the CUDA backend's kernel modules without a GPU, with NVRTC from NVIDIA's pip
wheels: catch compile errors before spending device time, read registers and spills per
kernel, and check that a refactor left a kernel's PTX unchanged.

    cargo run -p aperture-cuda --example kernel_sources -- /tmp/ks
    python3 tools/kernel_ptx.py build /tmp/ks/conv_f16.cu --ptx /tmp/before.ptx
    ... edit kernels, dump again ...
    python3 tools/kernel_ptx.py build /tmp/ks/conv_f16.cu --ptx /tmp/after.ptx
    python3 tools/kernel_ptx.py compare /tmp/before.ptx /tmp/after.ptx

`build` compiles for sm_90a (`--arch` to change) and prints each entry's registers and
spills (ptxas -v); with `--ptx FILE` it also writes the PTX (compute_90a). `compare`
lists the entries whose PTX differs. The wheels (nvidia-cuda-nvrtc-cu12 and
nvidia-cuda-runtime-cu12 for the headers, 12.9) are installed once into
~/.cache/aperture-nvrtc (or $APERTURE_NVRTC_DIR).
"""

import argparse
import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

VERSION = "12.9.*"


def toolkit() -> Path:
    root = Path(os.environ.get("APERTURE_NVRTC_DIR", Path.home() / ".cache" / "aperture-nvrtc"))
    lib = root / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so.12"
    if not lib.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(root),
             f"nvidia-cuda-nvrtc-cu12=={VERSION}", f"nvidia-cuda-runtime-cu12=={VERSION}"],
            check=True,
        )
    return root


def compile_source(source: bytes, arch: str, ptx: bool):
    """(ok, log, output) for one translation unit; output is PTX or CUBIN bytes."""
    root = toolkit()
    lib = ctypes.CDLL(str(root / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so.12"))
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source, b"module.cu", 0, None, None) != 0:
        raise RuntimeError("nvrtcCreateProgram failed")
    target = arch.replace("sm_", "compute_") if ptx else arch
    opts = [f"--gpu-architecture={target}", "-std=c++17",
            f"-I{root / 'nvidia' / 'cuda_runtime' / 'include'}"]
    if not ptx:
        opts.append("--ptxas-options=-v")
    raw = [o.encode() for o in opts]
    status = lib.nvrtcCompileProgram(prog, len(raw), (ctypes.c_char_p * len(raw))(*raw))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    out = b""
    if status == 0:
        get_size, get = (lib.nvrtcGetPTXSize, lib.nvrtcGetPTX) if ptx else (lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN)
        get_size(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        get(prog, buf)
        out = buf.raw
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return status == 0, log.value.decode(errors="replace"), out


def resources(log: str):
    """(entry, registers, spill stores, spill loads) from ptxas -v lines."""
    rows, entry, spills = [], None, (0, 0)
    for line in log.splitlines():
        m = re.search(r"Function properties for (\w+)", line)
        if m:
            entry = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spills = (int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m and entry:
            rows.append((entry, int(m.group(1)), *spills))
            entry, spills = None, (0, 0)
    return rows


def entries(ptx: str):
    return {m.group(1): m.group(0) for m in re.finditer(r"\.entry (\w+)\((.*?)\n\}\n", ptx, re.S)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile one translation unit, list registers and spills")
    b.add_argument("source", type=Path)
    b.add_argument("--arch", default="sm_90a")
    b.add_argument("--ptx", type=Path, help="also write the PTX here")
    c = sub.add_parser("compare", help="entries whose PTX differs between two files")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()

    if args.cmd == "compare":
        a, b = entries(args.a.read_text()), entries(args.b.read_text())
        differ = 0
        for name in sorted(set(a) | set(b)):
            state = "only in first" if name not in b else "only in second" if name not in a else (
                "same" if a[name] == b[name] else "differs")
            differ += state != "same"
            print(f"{state:15s} {name}")
        print(f"{differ} of {len(set(a) | set(b))} entries differ")
        return 1 if differ else 0

    source = args.source.read_bytes()
    ok, log, _ = compile_source(source, args.arch, ptx=False)
    if not ok:
        print(log)
        return 1
    for entry, regs, stores, loads in resources(log):
        note = f"  SPILLS {stores} B stored, {loads} B loaded" if stores or loads else ""
        print(f"{regs:4d} registers  {entry}{note}")
    if args.ptx:
        ok, log, ptx = compile_source(source, args.arch, ptx=True)
        if not ok:
            print(log)
            return 1
        args.ptx.write_bytes(ptx.rstrip(b"\0"))
        print(f"PTX written to {args.ptx}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
