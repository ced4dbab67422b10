// Autograd of tsc::multistep_update in C++ (the Autograd dispatch key), for every device.
//
// Like residual_update_autograd.cpp, and for the same reason: the op runs once per LM-ResNet block,
// and a Python autograd formula (torch.library.register_autograd) costs more interpreter time per
// call than the kernel takes on a CIFAR-sized tensor. The formula is the one in
// tsc_kernels/ops/multistep_update.py's docstring (docs/ops.md): one backward op returning
// (du, du_prev, df, dk, ddt, dkeep), with the ReLU mask read from the forward output; ddt / dkeep
// are gradients only when dt / keep were given. register_fake stays on the Python side, so
// torch.compile traces this formula like a built-in op's.
#include <torch/all.h>
#include <torch/autograd.h>

namespace tsc {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

at::Tensor call_forward(const at::Tensor& u, const at::Tensor& u_prev, const at::Tensor& f, const at::Tensor& k, const OptTensor& dt,
                        const OptTensor& keep, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tsc::multistep_update", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                         const OptTensor&, bool)>();
  return op.call(u, u_prev, f, k, dt, keep, relu);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads call_backward(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& u_prev, const at::Tensor& f, const at::Tensor& k,
                    const OptTensor& dt, const OptTensor& keep, const OptTensor& relu_out) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tsc::multistep_update_backward", "")
                       .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const OptTensor&, const OptTensor&, const OptTensor&)>();
  return op.call(grad, u, u_prev, f, k, dt, keep, relu_out);
}

OptTensor optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class MultistepUpdateFunction : public torch::autograd::Function<MultistepUpdateFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& u, const at::Tensor& u_prev, const at::Tensor& f,
                            const at::Tensor& k, const OptTensor& dt, const OptTensor& keep, bool relu) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = call_forward(u, u_prev, f, k, dt, keep, relu);
    }
    ctx->save_for_backward({u, u_prev, f, k, dt.value_or(at::Tensor()), keep.value_or(at::Tensor()), relu ? out : at::Tensor()});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &dt = s[4], &keep = s[5];
    auto [du, du_prev, df, dk, ddt, dkeep] = call_backward(grads[0], s[0], s[1], s[2], s[3], optional(dt), optional(keep), optional(s[6]));
    return {du, du_prev, df, dk, dt.defined() ? ddt : at::Tensor(), keep.defined() ? dkeep : at::Tensor(), at::Tensor()};
  }
};

at::Tensor multistep_update_autograd(const at::Tensor& u, const at::Tensor& u_prev, const at::Tensor& f, const at::Tensor& k,
                                     const OptTensor& dt, const OptTensor& keep, bool relu) {
  return MultistepUpdateFunction::apply(u, u_prev, f, k, dt, keep, relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, Autograd, m) {
  m.impl("multistep_update", &multistep_update_autograd);
}

}  // namespace tsc
