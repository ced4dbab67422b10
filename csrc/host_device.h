// TSC_HD marks the per-element math the CPU and CUDA kernels share (the *_math.h headers):
// __host__ __device__ under nvcc, so the CPU tests run the very arithmetic the GPU runs.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TSC_HD __host__ __device__ __forceinline__
#else
#define TSC_HD inline
#endif
