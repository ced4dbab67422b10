// What weight_mean's C++ autograd (weight_mean_autograd.cpp) calls of the kernels directly, without
// a dispatcher call per weight: adding each weight's w̄ gradient into its conv's dW in place (a
// training step's tsc::_weight_mean_aliased).
#pragma once

#include <torch/all.h>

#include <vector>

namespace tsc {

// g (C_out, C_in, *k), contiguous, on the CPU: g[o, i, k] += scaled[offset + o K + k] (K = prod(k),
// `scaled` 1-D in g's dtype): one weight's w̄ gradient (dw̄ / C_in, packed) added over C_in in place.
void add_wbar_grad_cpu(at::Tensor& g, const at::Tensor& scaled, int64_t offset);

#ifdef TSC_WITH_CUDA
// The same for every gs[j] at offsets[j] of `scaled`, on one CUDA device, in one launch per 48
// weights (weight_mean_cuda.cu): autograd's own accumulation is a TensorIterator launch per weight.
void add_wbar_grads_cuda(const std::vector<at::Tensor>& gs, const at::Tensor& scaled,
                         const std::vector<int64_t>& offsets);
#endif

}  // namespace tsc
