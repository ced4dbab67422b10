// Host-side argument handling of tsc::ode_combine, shared by the CPU and CUDA ops.
//
// The op is elementwise with one scalar coefficient per stage, so every tensor is read as a flat
// array in one common layout: z's (channels-last-like z keeps it, see channel_layout.h; anything
// else becomes contiguous). Stages in another layout are copied into it.
#pragma once

#include <torch/all.h>

#include <vector>

#include "ode_combine_math.h"
#include "channel_layout.h"

namespace tsc {

inline void check_ode_combine_args(const char* op, const at::Tensor& z, const at::TensorList stages,
                                   const at::Tensor& coeffs) {
  const int64_t S = static_cast<int64_t>(stages.size());
  TORCH_CHECK(S >= 1 && S <= kOdeMaxStages, op, ": stages must hold 1 to ", kOdeMaxStages, " tensors, got ", S);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(stages[s].sizes() == z.sizes(), op, ": stages[", s, "] must have shape ", z.sizes(), ", got ",
                stages[s].sizes());
    TORCH_CHECK(stages[s].scalar_type() == z.scalar_type(), op, ": stages[", s, "] must have dtype ", z.scalar_type());
    TORCH_CHECK(stages[s].device() == z.device(), op, ": stages[", s, "] must be on ", z.device());
  }
  const auto acc = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.size(0) == S, op, ": coeffs must have shape (", S, ",), got ",
              coeffs.sizes());
  TORCH_CHECK(coeffs.scalar_type() == acc, op, ": coeffs must be ", acc, " for ", z.scalar_type(), " inputs, got ",
              coeffs.scalar_type());
  TORCH_CHECK(coeffs.device() == z.device(), op, ": coeffs must be on ", z.device());
}

struct OdeCombineArgs {
  at::Tensor z;  // forward: z; backward: grad
  std::vector<at::Tensor> stages;
  at::Tensor coeffs;
  bool channels_last;
};

inline OdeCombineArgs prepare_ode_combine(const char* op, const at::Tensor& z, const at::TensorList stages,
                                          const at::Tensor& coeffs) {
  check_ode_combine_args(op, z, stages, coeffs);
  OdeCombineArgs a;
  a.channels_last = is_channels_last_like(z);
  a.z = to_layout(z, a.channels_last);
  for (const auto& k : stages) a.stages.push_back(to_layout(k, a.channels_last));
  a.coeffs = coeffs.contiguous();
  return a;
}

}  // namespace tsc
