// What weight_mean's C++ autograd (weight_mean_autograd.cpp) calls of the CPU kernels directly,
// without a dispatcher call per weight.
#pragma once

#include <torch/all.h>

namespace tsc {

// g (C_out, C_in, *k), contiguous, on the CPU: g[o, i, k] += scaled[offset + o K + k] (K = prod(k),
// `scaled` 1-D in g's dtype): one weight's w̄ gradient (dw̄ / C_in, packed) added over C_in in place.
void add_wbar_grad_cpu(at::Tensor& g, const at::Tensor& scaled, int64_t offset);

}  // namespace tsc
