// Autograd of tsc::residual_update in C++ (the Autograd dispatch key), for every device.
//
// The op sits once in every residual block, so its per-call overhead adds up: a Python autograd
// formula (torch.library.register_autograd) costs ~60-80 us of interpreter time per forward and
// backward, about as long as the kernel itself on a CIFAR-sized tensor, and on a GPU it would leave
// the kernels waiting for the CPU. Here the formula is the same (docs/ops.md): one backward op
// returning (dy, df, ddt), dy being the incoming gradient itself without the fused ReLU.
// The Python side keeps register_fake for both ops (tsc_kernels/ops/residual_update.py), so
// torch.compile traces this formula like any built-in op's.
#include "autograd_util.h"

namespace tsc {
namespace {

at::Tensor call_forward(const at::Tensor& y, const at::Tensor& f, const at::Tensor& dt, bool relu) {
  static const auto op =
      typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>("tsc::residual_update");
  return op.call(y, f, dt, relu);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Grads call_backward(const at::Tensor& grad, const at::Tensor& f, const at::Tensor& dt, const OptTensor& relu_out) {
  static const auto op = typed_op<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&)>(
      "tsc::residual_update_backward");
  return op.call(grad, f, dt, relu_out);
}

// The backward node: one backward op returns (dy, df, ddt), dy being the incoming gradient itself
// without the fused ReLU, whose mask is read from the output. Its edges: y, f, dt.
struct ResidualUpdateBackward : public Node {
  SavedVariable f_, dt_, relu_out_;

  std::string name() const override { return "ResidualUpdateBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&f_, &dt_, &relu_out_}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor f = f_.unpack(), relu_out = relu_out_.unpack(getptr());
    const at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(f);
    auto [dy, df, ddt] = call_backward(grad, f, dt_.unpack(), from_saved(relu_out));
    return {relu_out.defined() ? dy : grad, df, ddt};
  }
};

at::Tensor residual_update_autograd(const at::Tensor& y, const at::Tensor& f, const at::Tensor& dt, bool relu) {
  check_backward_only("tsc::residual_update", y, f, dt);
  at::Tensor out = below_autograd([&] { return call_forward(y, f, dt, relu); });
  if (torch::autograd::compute_requires_grad(y, f, dt)) {
    auto node = make_node<ResidualUpdateBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(y, f, dt));
    torch::autograd::set_history(out, node);
    node->f_ = SavedVariable(f, false);
    node->dt_ = SavedVariable(dt, false);
    if (relu) node->relu_out_ = SavedVariable(out, true);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, Autograd, m) { m.impl("residual_update", &residual_update_autograd); }

}  // namespace tsc
