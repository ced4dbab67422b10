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

// The backward node: one backward op returns (dy, dx, ddt, dweight, dbias), dy being the incoming
// gradient itself without the fused ReLU. Its edges: y, x, dt, weight, bias (the running
// statistics are never differentiated).
struct BatchNormResidualUpdateBackward : public Node {
  SavedVariable x_, dt_, weight_, bias_, save_mean_, save_invstd_, relu_out_;
  bool training_ = true;

  std::string name() const override { return "BatchNormResidualUpdateBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&x_, &dt_, &weight_, &bias_, &save_mean_, &save_invstd_, &relu_out_}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor x = x_.unpack(), relu_out = relu_out_.unpack(getptr());
    at::Tensor grad = grads[0];
    if (!grad.defined()) grad = at::zeros_like(relu_out.defined() ? relu_out : x);
    auto [dy, dx, ddt, dw, db] =
        call_backward(grad, x, dt_.unpack(), from_saved(weight_.unpack()), from_saved(bias_.unpack()),
                      save_mean_.unpack(), save_invstd_.unpack(), from_saved(relu_out), training_);
    return {relu_out.defined() ? dy : grad, dx, ddt, dw, db};
  }
};

Forward batch_norm_residual_update_autograd(const at::Tensor& y, const at::Tensor& x, const at::Tensor& dt,
                                            const OptTensor& running_mean, const OptTensor& running_var,
                                            const OptTensor& weight, const OptTensor& bias, bool training,
                                            double momentum, double eps, bool relu) {
  check_backward_only("tsc::batch_norm_residual_update", y, x, dt, weight, bias);
  // Below Autograd only (ADInplaceOrView stays): the op mutates the running statistics
  auto [out, save_mean, save_invstd] = below_autograd<at::AutoDispatchBelowAutograd>(
      [&] { return call_forward(y, x, dt, running_mean, running_var, weight, bias, training, momentum, eps, relu); });
  if (torch::autograd::compute_requires_grad(y, x, dt, weight, bias)) {
    auto node = make_node<BatchNormResidualUpdateBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(y, x, dt, weight, bias));
    torch::autograd::set_history(out, node);  // save_mean / save_invstd: non-differentiable
    node->x_ = SavedVariable(x, false);
    node->dt_ = SavedVariable(dt, false);
    node->weight_ = SavedVariable(to_saved(weight), false);
    node->bias_ = SavedVariable(to_saved(bias), false);
    node->save_mean_ = SavedVariable(save_mean, false);
    node->save_invstd_ = SavedVariable(save_invstd, false);
    if (relu) node->relu_out_ = SavedVariable(out, true);
    node->training_ = training;
  }
  return {out, save_mean, save_invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, Autograd, m) { m.impl("batch_norm_residual_update", &batch_norm_residual_update_autograd); }

}  // namespace tsc
