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

// The backward node: BPTT over every stage at once from the saved activations. Its edges: w̄,
// then every parameter.
struct LstmControllerBackward : public Node {
  SavedVariable wbar_, dt_, saved_;
  std::vector<SavedVariable> params_;
  std::vector<int64_t> blocks_;

  std::string name() const override { return "LstmControllerBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&wbar_, &dt_, &saved_}) v->reset_data();
    for (SavedVariable& p : params_) p.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor dt = dt_.unpack(getptr());
    const std::vector<at::Tensor> params = unpack_all(params_);
    const at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(dt);
    auto [dwbar, dparams] = call_backward(grad, dt, wbar_.unpack(), blocks_, params, saved_.unpack());
    variable_list out{dwbar};
    out.insert(out.end(), dparams.begin(), dparams.end());
    return out;
  }
};

Forward lstm_controller_autograd(const at::Tensor& wbar, at::IntArrayRef blocks, at::TensorList params) {
  check_backward_only("tsc::lstm_controller", wbar, params);
  auto [dt, saved] = below_autograd([&] { return call_forward(wbar, blocks, params); });
  if (torch::autograd::compute_requires_grad(wbar, params)) {
    auto node = make_node<LstmControllerBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(wbar, params));
    torch::autograd::set_history(dt, node);  // `saved`: internal state, non-differentiable
    node->wbar_ = SavedVariable(wbar, false);
    node->dt_ = SavedVariable(dt, true);
    node->saved_ = SavedVariable(saved, false);
    node->params_ = save_all(params);
    node->blocks_ = blocks.vec();
  }
  return {dt, saved};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, Autograd, m) { m.impl("lstm_controller", &lstm_controller_autograd); }

}  // namespace tsc
