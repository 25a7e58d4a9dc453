"""Per-kernel GPU time of transformers' D-FINE under PyTorch (eager, fp16), for comparing
aperture's per-operation profile with what cuDNN/cuBLAS do on the same shapes.

    python3 tools/dfine_torch_kernels.py MODEL_DIR [--batch 32] [--channels-last] [--top 30]

Prints the kernels by total CUDA time per forward pass (one profiled pass after warm-up)
and the share of convolution kernels.
"""
import argparse
from collections import defaultdict

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    from transformers import DFineForObjectDetection

    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    m = DFineForObjectDetection.from_pretrained(a.model, ignore_mismatched_sizes=True).eval().to(dev).half()
    x = torch.rand(a.batch, 3, 640, 640, device=dev, dtype=torch.float16)
    if a.channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(3):
            m(pixel_values=x)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            m(pixel_values=x)
            torch.cuda.synchronize()
    per = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += e.device_time_total / 1e3 if hasattr(e, "device_time_total") else e.cuda_time_total / 1e3
            per[e.name][1] += 1
    total = sum(v[0] for v in per.values())
    conv = sum(v[0] for k, v in per.items() if any(s in k.lower() for s in ("conv", "xmma", "implicit", "cudnn", "fprop", "wgrad", "dgrad", "sm90")))
    print(f"batch {a.batch} channels_last={a.channels_last}: {total:.2f} ms of kernels per pass, "
          f"convolution-like kernels {conv:.2f} ms")
    for name, (ms, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[: a.top]:
        print(f"{ms:8.3f} ms {n:5d}x  {name[:150]}")


if __name__ == "__main__":
    main()
