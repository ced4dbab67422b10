// Scalar math of the weight-mean projection (docs/tsc.md), shared verbatim by the CPU kernels
// (weight_mean_cpu.cpp) and the CUDA kernels (weight_mean_cuda.cu), so the CPU tests cover the
// arithmetic the GPU runs.
//
// T is the accumulation type: fp32, or fp64 for fp64 inputs (gradcheck).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace tsc {

// Weight-mean projection: w̄[o, k] = sum_i W[o, i, k] / C_in, and its gradient dW[o, i, k] =
// dw̄[o, k] / C_in (division, as torch's mean and mean_backward do, not a reciprocal multiply).
template <typename T>
TSC_HD T mean_from_sum(T sum, int64_t count) {
  return sum / static_cast<T>(count);
}

}  // namespace tsc
