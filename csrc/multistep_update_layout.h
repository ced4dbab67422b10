// Host-side argument checks and layout of the multi-step update, shared by the CPU and CUDA ops.
//
// Tensors are (N, C, *spatial), read as one contiguous block per sample: channel-first
// (index (n*C + c)*S + s) or channels-last (index (n*S + s)*C + c), S = prod(spatial), chosen from u
// (channel_layout.h's rule); the output keeps u's layout. Reductions go through a (N, C) table of
// partial sums (sum over s of g (u_prev - u) and of g f), which is then reduced in a fixed order:
// dk = sum of the first table, ddt[c] = sum_n keep[n] P[n, c], dkeep[n] = sum_c dt[c] P[n, c].
#pragma once

#include <torch/all.h>

#include "channel_layout.h"

namespace tsc {

inline void check_multistep_args(const char* op, const at::Tensor& u, const at::Tensor& u_prev, const at::Tensor& f,
                                 const at::Tensor& k, const std::optional<at::Tensor>& dt,
                                 const std::optional<at::Tensor>& keep) {
  TORCH_CHECK(u.dim() >= 2 && u.dim() <= 5, op, ": u must be (N, C, *spatial) with 0-3 spatial dims, got ", u.sizes());
  TORCH_CHECK(u_prev.sizes() == u.sizes() && f.sizes() == u.sizes(), op, ": u_prev and f must have u's shape ",
              u.sizes());
  TORCH_CHECK(u_prev.scalar_type() == u.scalar_type() && f.scalar_type() == u.scalar_type(), op,
              ": u_prev and f must have u's dtype");
  const auto acc = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(k.dim() == 0 && k.scalar_type() == acc, op, ": k must be a 0-d ", acc, " tensor, got ", k.sizes(), " ",
              k.scalar_type());
  TORCH_CHECK(k.device() == u.device() && u_prev.device() == u.device() && f.device() == u.device(), op,
              ": u, u_prev, f and k must be on one device");
  if (dt) {
    TORCH_CHECK(dt->dim() == 1 && dt->size(0) == u.size(1) && dt->scalar_type() == acc && dt->device() == u.device(),
                op, ": dt must be a (C,) ", acc, " tensor on u's device, C = ", u.size(1));
  }
  if (keep) {
    TORCH_CHECK(
        keep->dim() == 1 && keep->size(0) == u.size(0) && keep->scalar_type() == acc && keep->device() == u.device(),
        op, ": keep must be a (N,) ", acc, " tensor on u's device, N = ", u.size(0));
  }
}

struct MultistepView {
  int64_t N, C, S;
  bool channels_last;
};

inline MultistepView multistep_view(const at::Tensor& t, bool cl) {
  const int64_t n = t.size(0), c = t.size(1);
  const int64_t s = n * c == 0 ? 0 : t.numel() / (n * c);
  return {n, c, s, cl && t.dim() > 2};
}

struct MultistepForwardArgs {
  at::Tensor u, u_prev, f, k, dt, keep, out;
  MultistepView view;
};

inline MultistepForwardArgs prepare_multistep_forward(const at::Tensor& u, const at::Tensor& u_prev,
                                                      const at::Tensor& f, const at::Tensor& k,
                                                      const std::optional<at::Tensor>& dt,
                                                      const std::optional<at::Tensor>& keep) {
  check_multistep_args("tsc::multistep_update", u, u_prev, f, k, dt, keep);
  const bool cl = is_channels_last_like(u);
  MultistepForwardArgs a;
  a.u = to_layout(u, cl);
  a.u_prev = to_layout(u_prev, cl);
  a.f = to_layout(f, cl);
  a.k = k;
  if (dt) a.dt = dt->contiguous();
  if (keep) a.keep = keep->contiguous();
  a.out = at::empty_like(a.u);
  a.view = multistep_view(a.u, cl);
  return a;
}

// Outputs (du, du_prev, df, dk, ddt, dkeep); ddt / dkeep are empty (0,) tensors when dt / keep are absent.
struct MultistepBackwardArgs {
  at::Tensor g, u, u_prev, f, k, dt, keep, relu_out, du, du_prev, df, dk, ddt, dkeep;
  MultistepView view;
  bool relu;
};

inline MultistepBackwardArgs prepare_multistep_backward(const at::Tensor& grad, const at::Tensor& u,
                                                        const at::Tensor& u_prev, const at::Tensor& f,
                                                        const at::Tensor& k, const std::optional<at::Tensor>& dt,
                                                        const std::optional<at::Tensor>& keep,
                                                        const std::optional<at::Tensor>& relu_out) {
  check_multistep_args("tsc::multistep_update_backward", u, u_prev, f, k, dt, keep);
  TORCH_CHECK(grad.sizes() == u.sizes() && grad.scalar_type() == u.scalar_type(),
              "tsc::multistep_update_backward: grad must have u's shape and dtype");
  TORCH_CHECK(!relu_out || relu_out->sizes() == u.sizes(),
              "tsc::multistep_update_backward: relu_out must have u's shape");
  // A host pointer handed to a CUDA kernel kills the context: grad and relu_out must be on u's device.
  TORCH_CHECK(grad.device() == u.device(), "tsc::multistep_update_backward: grad must be on u's device, got ",
              grad.device());
  TORCH_CHECK(!relu_out || relu_out->device() == u.device(),
              "tsc::multistep_update_backward: relu_out must be on u's device, got ", relu_out->device());
  const bool cl = is_channels_last_like(u);
  MultistepBackwardArgs a;
  a.g = to_layout(grad, cl);
  a.u = to_layout(u, cl);
  a.u_prev = to_layout(u_prev, cl);
  a.f = to_layout(f, cl);
  a.k = k;
  a.relu = relu_out.has_value();
  if (a.relu) a.relu_out = to_layout(*relu_out, cl);
  if (dt) a.dt = dt->contiguous();
  if (keep) a.keep = keep->contiguous();
  a.du = at::empty_like(a.u);
  a.du_prev = at::empty_like(a.u);
  a.df = at::empty_like(a.u);
  a.dk = at::empty({}, k.options());
  a.ddt = dt ? at::empty_like(a.dt) : at::empty({0}, k.options());
  a.dkeep = keep ? at::empty_like(a.keep) : at::empty({0}, k.options());
  a.view = multistep_view(a.u, cl);
  return a;
}

}  // namespace tsc
