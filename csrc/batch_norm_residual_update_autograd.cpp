// Autograd of tsc::batch_norm_residual_update in C++ (the Autograd dispatch key), for every device.
//
// The op ends every basic/bottleneck TSC block, so its per-call overhead counts in every training
// step: the Python formula (tsc_kernels/ops/registry.py, _register_autograd_of_mutating_op) costs
// tens of microseconds of interpreter time per forward and per backward. The formula is the same
// as tsc_kernels/ops/batch_norm_residual_update.py's (docs/ops.md): save_mean / save_invstd are
// non-differentiable outputs; one backward op returns (dy, dx, ddt, dweight, dbias), dy being the
// incoming gradient itself without the fused ReLU. The running statistics are mutated below
// autograd (never differentiated), exactly as the Python autograd.Function did. register_fake
// stays on the Python side, so torch.compile traces this formula like a built-in op's.
#include "autograd_util.h"

namespace tsc {
namespace {

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Forward call_forward(const at::Tensor& y, const at::Tensor& x, const at::Tensor& dt, const OptTensor& running_mean,
                     const OptTensor& running_var, const OptTensor& weight, const OptTensor& bias, bool training,
                     double momentum, double eps, bool relu) {
  static const auto op =
      typed_op<Forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                       const OptTensor&, const OptTensor&, bool, double, double, bool)>(
          "tsc::batch_norm_residual_update");
  return op.call(y, x, dt, running_mean, running_var, weight, bias, training, momentum, eps, relu);
}

Backward call_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& dt, const OptTensor& weight,
                       const OptTensor& bias, const at::Tensor& save_mean, const at::Tensor& save_invstd,
                       const OptTensor& relu_out, bool training) {
  static const auto op =
      typed_op<Backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                        const at::Tensor&, const at::Tensor&, const OptTensor&, bool)>(
          "tsc::batch_norm_residual_update_backward");
  return op.call(grad, x, dt, weight, bias, save_mean, save_invstd, relu_out, training);
}

class BatchNormResidualUpdateFunction : public torch::autograd::Function<BatchNormResidualUpdateFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& x, const at::Tensor& dt,
                               const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& weight,
                               const OptTensor& bias, bool training, double momentum, double eps, bool relu) {
    // Below Autograd only (ADInplaceOrView stays), like the Python autograd.Function: the op mutates the running stats
    auto [out, save_mean, save_invstd] = below_autograd<at::AutoDispatchBelowAutograd>(
        [&] { return call_forward(y, x, dt, running_mean, running_var, weight, bias, training, momentum, eps, relu); });
    ctx->set_materialize_grads(false);  // save_mean / save_invstd are internal outputs: no zero grads
    ctx->mark_non_differentiable({save_mean, save_invstd});
    ctx->saved_data["training"] = training;
    ctx->save_for_backward(
        {x, dt, to_saved(weight), to_saved(bias), save_mean, save_invstd, relu ? out : at::Tensor()});
    return {out, save_mean, save_invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &dt = s[1], &weight = s[2], &bias = s[3], &relu_out = s[6];
    at::Tensor grad = grads[0];
    if (!grad.defined()) grad = at::zeros_like(relu_out.defined() ? relu_out : x);
    auto [dy, dx, ddt, dw, db] = call_backward(grad, x, dt, from_saved(weight), from_saved(bias), s[4], s[5],
                                               from_saved(relu_out), ctx->saved_data["training"].toBool());
    const at::Tensor none;
    return {relu_out.defined() ? dy : grad, dx,   ddt,  none, none, weight.defined() ? dw : none,
            bias.defined() ? db : none,     none, none, none, none};
  }
};

Forward batch_norm_residual_update_autograd(const at::Tensor& y, const at::Tensor& x, const at::Tensor& dt,
                                            const OptTensor& running_mean, const OptTensor& running_var,
                                            const OptTensor& weight, const OptTensor& bias, bool training,
                                            double momentum, double eps, bool relu) {
  auto r = BatchNormResidualUpdateFunction::apply(y, x, dt, running_mean, running_var, weight, bias, training, momentum,
                                                  eps, relu);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, Autograd, m) { m.impl("batch_norm_residual_update", &batch_norm_residual_update_autograd); }

}  // namespace tsc
