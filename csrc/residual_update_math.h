// Per-element math of the residual update `out = y + f * dt[c]` (docs/ops.md), shared verbatim by
// the CPU kernels (scalar and at::vec::Vectorized lanes) and the CUDA kernels, so the CPU tests
// cover the arithmetic the GPU runs. Everything is evaluated in the accumulation type acc_t
// (fp32 for fp32/fp16/bf16 inputs, fp64 for fp64).
#pragma once

#include "elementwise_math.h"  // TSC_HD, relu_forward, relu_backward

namespace tsc {

template <typename T>
TSC_HD T residual_forward(T y, T f, T dt) {
  return y + f * dt;
}

}  // namespace tsc
