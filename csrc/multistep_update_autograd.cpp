// Autograd of tsc::multistep_update in C++ (the Autograd dispatch key), for every device.
//
// Like residual_update_autograd.cpp, and for the same reason: the op runs once per LM-ResNet block,
// and a Python autograd formula (torch.library.register_autograd) costs more interpreter time per
// call than the kernel takes on a CIFAR-sized tensor. The formula is the one in
// tsc_kernels/ops/multistep_update.py's docstring (docs/ops.md): one backward op returning
// (du, du_prev, df, dk, ddt, dkeep), with the ReLU mask read from the forward output; ddt / dkeep
// are gradients only when dt / keep were given. register_fake stays on the Python side, so
// torch.compile traces this formula like a built-in op's.
#include "autograd_util.h"

namespace tsc {
namespace {

at::Tensor call_forward(const at::Tensor& u, const at::Tensor& u_prev, const at::Tensor& f, const at::Tensor& k,
                        const OptTensor& dt, const OptTensor& keep, bool relu) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const OptTensor&, const OptTensor&, bool)>("tsc::multistep_update");
  return op.call(u, u_prev, f, k, dt, keep, relu);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads call_backward(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& u_prev, const at::Tensor& f,
                    const at::Tensor& k, const OptTensor& dt, const OptTensor& keep, const OptTensor& relu_out) {
  static const auto op =
      typed_op<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const OptTensor&, const OptTensor&, const OptTensor&)>("tsc::multistep_update_backward");
  return op.call(grad, u, u_prev, f, k, dt, keep, relu_out);
}

// The backward node: one backward op returns (du, du_prev, df, dk, ddt, dkeep). Its edges: u,
// u_prev, f, k, dt, keep (an absent dt / keep: no edge, no gradient).
struct MultistepUpdateBackward : public Node {
  SavedVariable u_, u_prev_, f_, k_, dt_, keep_, relu_out_;

  std::string name() const override { return "MultistepUpdateBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&u_, &u_prev_, &f_, &k_, &dt_, &keep_, &relu_out_}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor u = u_.unpack(), dt = dt_.unpack(), keep = keep_.unpack();
    const at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(u);
    auto [du, du_prev, df, dk, ddt, dkeep] =
        call_backward(grad, u, u_prev_.unpack(), f_.unpack(), k_.unpack(), from_saved(dt), from_saved(keep),
                      from_saved(relu_out_.unpack(getptr())));
    return {du, du_prev, df, dk, dt.defined() ? ddt : at::Tensor(), keep.defined() ? dkeep : at::Tensor()};
  }
};

at::Tensor multistep_update_autograd(const at::Tensor& u, const at::Tensor& u_prev, const at::Tensor& f,
                                     const at::Tensor& k, const OptTensor& dt, const OptTensor& keep, bool relu) {
  check_backward_only("tsc::multistep_update", u, u_prev, f, k, dt, keep);
  at::Tensor out = below_autograd([&] { return call_forward(u, u_prev, f, k, dt, keep, relu); });
  if (torch::autograd::compute_requires_grad(u, u_prev, f, k, dt, keep)) {
    auto node = make_node<MultistepUpdateBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(u, u_prev, f, k, dt, keep));
    torch::autograd::set_history(out, node);
    node->u_ = SavedVariable(u, false);
    node->u_prev_ = SavedVariable(u_prev, false);
    node->f_ = SavedVariable(f, false);
    node->k_ = SavedVariable(k, false);
    node->dt_ = SavedVariable(to_saved(dt), false);
    node->keep_ = SavedVariable(to_saved(keep), false);
    if (relu) node->relu_out_ = SavedVariable(out, true);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, Autograd, m) { m.impl("multistep_update", &multistep_update_autograd); }

}  // namespace tsc
