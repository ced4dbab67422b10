// Host-side argument checks and layout logic of the fused BatchNorm tail, shared by the CPU and
// CUDA ops. The elementwise passes read every activation as the contiguous (outer, C, inner) block of
// channel_layout.h: the forward in y's layout (x follows it; out has y's layout), the backward in
// x's layout (grad and relu_out follow it; dx has x's layout, dy relu_out's).
#pragma once

#include <torch/all.h>

#include <optional>

#include "residual_update_layout.h"

namespace tsc {

inline at::ScalarType bn_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_bn_channel_tensor(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), "tsc::batch_norm_residual_update: ", name,
              " must be (C,) with C = ", x.size(1), ", got ", t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "tsc::batch_norm_residual_update: ", name,
              " must be a floating tensor");
  TORCH_CHECK(t->device() == x.device(), "tsc::batch_norm_residual_update: ", name, " must be on x's device");
}

// Values per channel (N * spatial).
inline int64_t bn_count(const at::Tensor& x) { return x.size(1) == 0 ? 0 : x.numel() / x.size(1); }

struct BnForwardArgs {
  at::Tensor y, x, dt, out, save_mean, save_invstd;
  ChannelView view;
  int64_t count;
};

inline BnForwardArgs prepare_bn_forward(const at::Tensor& y_in, const at::Tensor& x_in, const at::Tensor& dt_in,
                                        const std::optional<at::Tensor>& running_mean,
                                        const std::optional<at::Tensor>& running_var,
                                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                        bool training) {
  check_residual_args(y_in, x_in, dt_in);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "tsc::batch_norm_residual_update: running_mean and running_var must both be given or both be None");
  TORCH_CHECK(training || running_mean.has_value(),
              "tsc::batch_norm_residual_update: training=False needs running statistics");
  check_bn_channel_tensor(running_mean, "running_mean", y_in);
  check_bn_channel_tensor(running_var, "running_var", y_in);
  TORCH_CHECK(!running_mean.has_value() || running_mean->scalar_type() == running_var->scalar_type(),
              "tsc::batch_norm_residual_update: running_mean and running_var must share a dtype");
  check_bn_channel_tensor(weight, "weight", y_in);
  check_bn_channel_tensor(bias, "bias", y_in);
  const int64_t count = bn_count(y_in);
  TORCH_CHECK(!training || count > 1,
              "tsc::batch_norm_residual_update: training needs more than 1 value per channel, got input ",
              y_in.sizes());
  const bool cl = is_channels_last_like(y_in);
  BnForwardArgs a{to_layout(y_in, cl), to_layout(x_in, cl), dt_in.contiguous(), {}, {}, {}, {}, count};
  a.out = at::empty_like(a.y);
  a.save_mean = at::empty({y_in.size(1)}, dt_in.options());
  a.save_invstd = at::empty({y_in.size(1)}, dt_in.options());
  a.view = channel_view(a.y, cl);
  return a;
}

struct BnBackwardArgs {
  at::Tensor g, x, relu_out, dt, save_mean, save_invstd, dy, dx, ddt, dweight, dbias;
  ChannelView view;
  int64_t count;
  bool relu;
  bool dy_channels_last;  // relu_out's layout, which dy must have (it may differ from x's)
};

inline BnBackwardArgs prepare_bn_backward(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& dt_in,
                                          const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias, const at::Tensor& save_mean,
                                          const at::Tensor& save_invstd, const std::optional<at::Tensor>& relu_out) {
  check_residual_args(x_in, grad_in, dt_in);
  check_bn_channel_tensor(weight, "weight", x_in);
  check_bn_channel_tensor(bias, "bias", x_in);
  for (const auto* t : {&save_mean, &save_invstd}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x_in.size(1) && t->scalar_type() == dt_in.scalar_type() &&
                    t->device() == x_in.device(),
                "tsc::batch_norm_residual_update_backward: save_mean / save_invstd must be (C,) ", dt_in.scalar_type(),
                " on x's device");
  }
  const bool relu = relu_out.has_value();
  TORCH_CHECK(!relu || (relu_out->sizes() == x_in.sizes() && relu_out->scalar_type() == x_in.scalar_type()),
              "tsc::batch_norm_residual_update_backward: relu_out must have x's shape and dtype");
  // A host pointer handed to a CUDA kernel kills the context: every tensor the kernels read is on x's device.
  TORCH_CHECK(!relu || relu_out->device() == x_in.device(),
              "tsc::batch_norm_residual_update_backward: relu_out must be on x's device, got ", relu_out->device());
  const bool cl = is_channels_last_like(x_in);
  BnBackwardArgs a;
  a.x = to_layout(x_in, cl);
  a.g = to_layout(grad_in, cl);
  a.dt = dt_in.contiguous();
  a.save_mean = save_mean.contiguous();
  a.save_invstd = save_invstd.contiguous();
  a.relu = relu;
  a.dy_channels_last = relu && is_channels_last_like(*relu_out);
  if (relu) a.relu_out = to_layout(*relu_out, cl);
  a.dx = at::empty_like(a.x);
  a.dy = relu ? at::empty_like(a.x) : at::empty({0}, a.x.options());
  a.ddt = at::empty_like(a.dt);
  a.dweight = weight.has_value() ? at::empty_like(a.dt) : at::empty({0}, a.dt.options());
  a.dbias = bias.has_value() ? at::empty_like(a.dt) : at::empty({0}, a.dt.options());
  a.view = channel_view(a.x, cl);
  a.count = bn_count(x_in);
  return a;
}

// dy in relu_out's layout (a copy only when relu_out's layout differs from x's).
inline at::Tensor bn_dy_in_layout(const at::Tensor& dy, bool channels_last) {
  return dy.numel() == 0 ? dy : to_layout(dy, channels_last);
}

}  // namespace tsc
