"""Writes the Restormer parity fixtures under tests/fixtures/restormer/ (run where torch is).

Each case folder holds model.safetensors (fp32 weights), config.json and io.safetensors
(input "x" NCHW float32, reference output "y"), all made by tools/restormer_ref.py's
PyTorch model. The "withbias" case also gets checkpoint.pt, written by torch.save
the way training scripts do: weights nested under "model_state_dict" with the
DataParallel "module." prefix, next to non-tensor entries.

    python3 tools/make_restormer_goldens.py OUT_DIR
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from restormer_ref import Restormer  # noqa: E402

CASES = {
    # name: (config, input batch, input size, seed)
    "withbias": (dict(dim=8, num_blocks=[1, 2, 2, 2], num_refinement_blocks=1, heads=[1, 2, 4, 8],
                      ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias"), 2, 64, 0),
    "biasfree": (dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=2, heads=[1, 2, 2, 4],
                      ffn_expansion_factor=2.0, bias=False, LayerNorm_type="BiasFree"), 1, 64, 1),
    "conv_bias": (dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[2, 2, 4, 4],
                       ffn_expansion_factor=2.66, bias=True, LayerNorm_type="WithBias"), 1, 48, 2),
}


def build(cfg, seed):
    torch.manual_seed(seed)
    m = Restormer(**cfg).eval()
    with torch.no_grad():  # perturb ones/zeros so every parameter matters
        for name, t in m.named_parameters():
            if name.endswith("temperature") or ".body." in name or name.endswith(".bias"):
                t.add_(0.1 * torch.randn_like(t))
    return m


def main():
    out = sys.argv[1]
    for name, (cfg, batch, size, seed) in CASES.items():
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        m = build(cfg, seed)
        x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 100))
        with torch.no_grad():
            y = m(x)
            y64 = m.double()(x.double()).float()
        m = m.float()
        sd = {k: v.contiguous() for k, v in m.state_dict().items()}
        save_file(sd, os.path.join(d, "model.safetensors"))
        save_file({"x": x.contiguous(), "y": y.contiguous(), "y_f64": y64.contiguous()},
                  os.path.join(d, "io.safetensors"))
        json.dump(dict(cfg, architecture="Restormer"), open(os.path.join(d, "config.json"), "w"), indent=1)
        if name == "withbias":
            nested = {"module." + k: v for k, v in sd.items()}
            torch.save({"epoch": 3, "model_state_dict": nested, "best_psnr": 31.5,
                        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4}]}},
                       os.path.join(d, "checkpoint.pt"))
            torch.save({k: v.half() for k, v in sd.items()}, os.path.join(d, "bare_fp16.pt"))
        print(name, sum(t.numel() for t in m.parameters()), "parameters,",
              "rel diff f32 vs f64:", float((y - y64).norm() / y64.norm()))


if __name__ == "__main__":
    main()
