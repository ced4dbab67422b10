// Per-element math of the residual update `out = y + f * dt[c]` (docs/ops.md), shared verbatim by
// the CPU kernels (scalar and at::vec::Vectorized lanes) and the CUDA kernels, so the CPU tests
// cover the arithmetic the GPU runs. Everything is evaluated in the accumulation type acc_t
// (fp32 for fp32/fp16/bf16 inputs, fp64 for fp64).
#pragma once

#include "tsc_hd.h"

namespace tsc {

template <typename T>
TSC_HD T residual_forward(T y, T f, T dt) {
  return y + f * dt;
}

// ReLU as torch.relu: NaN passes through (NaN < 0 is false).
template <typename T>
TSC_HD T relu_forward(T x) {
  return x < T(0) ? T(0) : x;
}

// Gradient through the fused ReLU, read from its output as torch's threshold_backward does:
// zero where out <= 0, the incoming gradient elsewhere (NaN outputs let the gradient through).
template <typename T>
TSC_HD T relu_backward(T grad, T out) {
  return out <= T(0) ? T(0) : grad;
}

}  // namespace tsc
