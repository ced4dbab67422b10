// Per-element math of the linear multi-step update (docs/ops.md, multistep_update)
//   out = relu?((1 - k) * u + k * u_prev + scale * f),   scale = keep[n] * dt[c]
// shared verbatim by the CPU and CUDA kernels, so the CPU tests cover the arithmetic the GPU runs.
// Everything is evaluated in the accumulation type (fp32 for fp32/fp16/bf16, fp64 for fp64).
#pragma once

#include "elementwise_math.h"  // TSC_HD, relu_forward, relu_backward

namespace tsc {

// Per-(sample, channel) factor of f: keep[n] * dt[c]; a missing (null) tensor counts as 1.
template <typename T>
TSC_HD T multistep_scale(const T* dt, const T* keep, int64_t n, int64_t c) {
  const T d = dt ? dt[c] : T(1);
  return keep ? keep[n] * d : d;
}

template <typename T>
TSC_HD T multistep_forward(T u, T u_prev, T f, T k, T scale) {
  return (T(1) - k) * u + k * u_prev + scale * f;
}

// Gradient of one element, g = the incoming gradient already masked by the fused ReLU:
// du = (1 - k) g, du_prev = k g, df = scale g; and the two products the reductions sum:
// g (u_prev - u) (for dk) and g f (for ddt and dkeep).
template <typename T>
struct MultistepGrad {
  T du, du_prev, df, dk_term, gf_term;
};

template <typename T>
TSC_HD MultistepGrad<T> multistep_backward(T g, T u, T u_prev, T f, T k, T scale) {
  return {(T(1) - k) * g, k * g, scale * g, g * (u_prev - u), g * f};
}

}  // namespace tsc
