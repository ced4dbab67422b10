// Launch geometry shared by the elementwise CUDA kernels (residual_update_cuda.cu,
// batch_norm_residual_update_cuda.cu): grid-stride loops over numel elements.
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

}  // namespace tsc
