// Launch planning of the ODE stage combination's CUDA kernels (host code, no CUDA headers): the
// launcher (ode_combine_cuda.cu) and the planner (ode_combine_plan.cpp, tsc::cuda_launch_plan) call
// these same functions.
#pragma once

#include <algorithm>
#include <cstdint>

#include "launch_geometry.h"

namespace tsc {
namespace ode_plan {

constexpr int64_t kThreads = 256, kMaxBackwardBlocks = 1024;

// Blocks of the backward pass: one per 4 * 256 elements, at most 1024. It depends on numel only
// (not on the GPU), so dc's partition, hence its bits, are the same on every GPU.
inline int64_t backward_blocks(int64_t numel) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxBackwardBlocks, ceil_div(numel, 4 * kThreads)));
}

// Elements per item of the backward pass: bf16 / half pairs (4-byte loads, 128-byte warp requests),
// else one. The blocks above stay 4 elements per thread (two pairs): the grid is unchanged.
constexpr int64_t pack(int64_t element_size) { return reduction_pack(element_size); }

}  // namespace ode_plan
}  // namespace tsc
