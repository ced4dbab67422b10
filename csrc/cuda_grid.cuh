// Launch geometry and the warp and block reductions shared by the CUDA kernels
// (residual_update_cuda.cu, batch_norm_residual_update_cuda.cu, scale_concat_cuda.cu,
// ode_combine_cuda.cu, weight_mean_cuda.cu, lstm_controller_cuda.cu, ...).
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace tsc {

// Enough blocks to cover numel once, capped at 32 per SM (the grid-stride loop does the rest).
// The device properties are cached by ATen: no host-device synchronisation.
inline int elementwise_grid(int64_t numel, int threads) {
  const int64_t blocks = (numel + threads - 1) / threads;
  const int64_t cap = 32LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks, cap)));
}

// Sum of v over the warp, in every lane.
template <typename T>
__device__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return __shfl_sync(0xffffffffu, v, 0);
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024), valid in thread 0. shared
// holds one acc_t per warp; the leading barrier lets a kernel call this repeatedly with the same shared.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[lane] : acc_t(0);
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace tsc
