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

// Where element e of a contiguous (C_out, C_in, K) weight gradient finds its w̄ gradient in the
// weight's packed (C_out, K) values: dW[o, i, k] += scaled[o K + k] (adding w̄'s gradient into a
// conv's dW: the CPU kernel's leftover values and every value of the CUDA kernel, which runs it
// in 32 bits: a weight's values are fewer than 2^31, and a 64-bit division is a ~40-instruction
// routine per value).
template <typename I>
TSC_HD I wbar_grad_index(I e, I c_in, I K) {
  return e / (c_in * K) * K + e % K;
}

}  // namespace tsc
