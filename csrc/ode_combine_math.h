// Per-element math of the fused ODE stage combination `out = z + sum_i c[i] * k_i` (docs/ode.md),
// shared by the CPU kernels and the CUDA kernels so that the CPU tests cover the GPU arithmetic.
// Everything runs in the accumulation type acc_t (fp32 for fp32/fp16/bf16 inputs, fp64 for fp64).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace tsc {

// Most stages one call combines: RK4 needs 4; the CUDA kernels take the stage pointers by value.
constexpr int kOdeMaxStages = 8;

// One term of the forward sum, added in stage order: acc <- acc + c * k.
template <typename T>
TSC_HD T ode_combine_term(T acc, T k, T c) {
  return acc + c * k;
}

// Backward of one term: dk = c * g (the product g * k is what dc sums).
template <typename T>
TSC_HD T ode_combine_stage_grad(T g, T c) {
  return c * g;
}

}  // namespace tsc
