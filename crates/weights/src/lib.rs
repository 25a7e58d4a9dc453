//! Reading tensors from safetensors files, PyTorch checkpoints and HF snapshot folders.
