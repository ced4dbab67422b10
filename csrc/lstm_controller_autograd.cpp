// Autograd of tsc::lstm_controller in C++ (the Autograd dispatch key), for every device.
//
// The op runs once per training step with every lstm stage's eight parameters (32 tensors for a
// four-stage ResNet): a Python autograd formula (torch.library.register_autograd) flattens and
// unflattens that list on every call. For CIFAR ResNet-56 that glue cost more than the kernels:
// weight_mean + lstm_controller forward under autograd took 374 µs with it, 198 µs with this file.
// The formula is tsc_kernels/ops/lstm_controller.py's (docs/ops.md): the backward op does BPTT
// over every stage at once from the saved activations; `saved` is internal state, not
// differentiable. register_fake stays on the Python side.
#include <tuple>
#include <vector>

#include "autograd_util.h"

namespace tsc {
namespace {

using Forward = std::tuple<at::Tensor, at::Tensor>;
using Backward = std::tuple<at::Tensor, std::vector<at::Tensor>>;

Forward call_forward(const at::Tensor& wbar, at::IntArrayRef blocks, at::TensorList params) {
  static const auto op = typed_op<Forward(const at::Tensor&, at::IntArrayRef, at::TensorList)>("tsc::lstm_controller");
  return op.call(wbar, blocks, params);
}

Backward call_backward(const at::Tensor& grad, const at::Tensor& dt, const at::Tensor& wbar, at::IntArrayRef blocks,
                       at::TensorList params, const at::Tensor& saved) {
  static const auto op = typed_op<Backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                           at::TensorList, const at::Tensor&)>("tsc::lstm_controller_backward");
  return op.call(grad, dt, wbar, blocks, params, saved);
}

class LstmControllerFunction : public torch::autograd::Function<LstmControllerFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& wbar, at::IntArrayRef blocks,
                               at::TensorList params) {
    auto [dt, saved] = below_autograd([&] { return call_forward(wbar, blocks, params); });
    ctx->mark_non_differentiable({saved});
    // grad of `saved` is never used: do not materialise zeros for it (nor for an unused Δt)
    ctx->set_materialize_grads(false);
    ctx->saved_data["blocks"] = blocks.vec();
    std::vector<at::Tensor> keep{wbar, dt, saved};
    keep.insert(keep.end(), params.begin(), params.end());
    ctx->save_for_backward(keep);
    return {dt, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &wbar = s[0], &dt = s[1], &saved = s[2];
    const std::vector<at::Tensor> params(s.begin() + 3, s.end());
    // slots: wbar, blocks (not differentiable: undefined), then every parameter
    variable_list out(2 + params.size());
    const at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(dt);
    auto [dwbar, dparams] = call_backward(grad, dt, wbar, ctx->saved_data["blocks"].toIntVector(), params, saved);
    out[0] = dwbar;
    for (size_t k = 0; k < dparams.size(); ++k) out[2 + k] = dparams[k];
    return out;
  }
};

Forward lstm_controller_autograd(const at::Tensor& wbar, at::IntArrayRef blocks, at::TensorList params) {
  const variable_list out = LstmControllerFunction::apply(wbar, blocks, params);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, Autograd, m) { m.impl("lstm_controller", &lstm_controller_autograd); }

}  // namespace tsc
