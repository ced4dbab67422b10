// Host-side argument checks and layout of the residual update, shared by its CPU and CUDA ops and
// its launch planner (and by batch_norm_residual_update_layout.h: check_residual_args).
#pragma once

#include <torch/all.h>

#include "channel_layout.h"

namespace tsc {

inline void check_residual_args(const at::Tensor& y, const at::Tensor& f, const at::Tensor& dt) {
  TORCH_CHECK(y.dim() >= 2 && y.dim() <= 5,
              "tsc::residual_update: y must be (N, C, *spatial) with 0-3 spatial dims, got ", y.sizes());
  TORCH_CHECK(f.sizes() == y.sizes(), "tsc::residual_update: f must have y's shape ", y.sizes(), ", got ", f.sizes());
  TORCH_CHECK(f.scalar_type() == y.scalar_type(), "tsc::residual_update: f must have y's dtype");
  TORCH_CHECK(dt.dim() == 1 && dt.size(0) == y.size(1), "tsc::residual_update: dt must be (C,) with C = ", y.size(1),
              ", got ", dt.sizes());
  const auto acc = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(dt.scalar_type() == acc, "tsc::residual_update: dt must be ", acc, " for ", y.scalar_type(),
              " inputs, got ", dt.scalar_type());
  TORCH_CHECK(y.device() == f.device() && y.device() == dt.device(),
              "tsc::residual_update: y, f and dt must be on one device");
}

// Forward arguments in the layout the kernels read, and the output (same layout as y).
struct ForwardArgs {
  at::Tensor y, f, dt, out;
  ChannelView view;
};

inline ForwardArgs prepare_forward(const at::Tensor& y_in, const at::Tensor& f_in, const at::Tensor& dt_in) {
  check_residual_args(y_in, f_in, dt_in);
  const bool cl = is_channels_last_like(y_in);
  ForwardArgs a{to_layout(y_in, cl), to_layout(f_in, cl), dt_in.contiguous(), {}, {}};
  a.out = at::empty_like(a.y);
  a.view = channel_view(a.y, cl);
  return a;
}

// Backward arguments in f's layout and the outputs (dy, df, ddt) of tsc::residual_update_backward.
// dy is allocated only with the fused ReLU (else it is grad itself: an empty (0,) tensor is returned).
// Every channel's ddt is written by the kernels; only an empty input needs zeros (no fill launch otherwise).
struct BackwardArgs {
  at::Tensor g, f, dt, relu_out, dy, df, ddt;
  ChannelView view;
  bool relu;
};

inline BackwardArgs prepare_backward(const at::Tensor& grad_in, const at::Tensor& f_in, const at::Tensor& dt_in,
                                     const std::optional<at::Tensor>& relu_out) {
  check_residual_args(f_in, grad_in, dt_in);
  const bool relu = relu_out.has_value();
  TORCH_CHECK(!relu || relu_out->sizes() == f_in.sizes(),
              "tsc::residual_update_backward: relu_out must have f's shape");
  TORCH_CHECK(!relu || relu_out->device() == f_in.device(),
              "tsc::residual_update_backward: relu_out must be on f's device ", f_in.device(), ", got ",
              relu_out->device());
  TORCH_CHECK(!relu || relu_out->scalar_type() == f_in.scalar_type(),
              "tsc::residual_update_backward: relu_out must have f's dtype");
  const bool cl = is_channels_last_like(f_in);
  BackwardArgs a;
  a.f = to_layout(f_in, cl);
  a.g = to_layout(grad_in, cl);
  a.dt = dt_in.contiguous();
  a.relu = relu;
  if (relu) a.relu_out = to_layout(*relu_out, cl);
  a.df = at::empty_like(a.f);
  a.dy = relu ? at::empty_like(a.f) : at::empty({0}, a.f.options());
  a.ddt = a.f.numel() == 0 ? at::zeros_like(a.dt) : at::empty_like(a.dt);
  a.view = channel_view(a.f, cl);
  return a;
}

}  // namespace tsc
