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

class MultistepUpdateFunction : public torch::autograd::Function<MultistepUpdateFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& u, const at::Tensor& u_prev, const at::Tensor& f,
                            const at::Tensor& k, const OptTensor& dt, const OptTensor& keep, bool relu) {
    at::Tensor out = below_autograd([&] { return call_forward(u, u_prev, f, k, dt, keep, relu); });
    ctx->save_for_backward({u, u_prev, f, k, to_saved(dt), to_saved(keep), relu ? out : at::Tensor()});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &dt = s[4], &keep = s[5];
    auto [du, du_prev, df, dk, ddt, dkeep] =
        call_backward(grads[0], s[0], s[1], s[2], s[3], from_saved(dt), from_saved(keep), from_saved(s[6]));
    return {du,          du_prev, df, dk, dt.defined() ? ddt : at::Tensor(), keep.defined() ? dkeep : at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor multistep_update_autograd(const at::Tensor& u, const at::Tensor& u_prev, const at::Tensor& f,
                                     const at::Tensor& k, const OptTensor& dt, const OptTensor& keep, bool relu) {
  return MultistepUpdateFunction::apply(u, u_prev, f, k, dt, keep, relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, Autograd, m) { m.impl("multistep_update", &multistep_update_autograd); }

}  // namespace tsc
