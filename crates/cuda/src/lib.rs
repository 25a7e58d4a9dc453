//! The CUDA backend: cudarc, NVRTC kernels, cuBLASLt, CUDA graphs.
