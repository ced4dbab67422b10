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

class ResidualUpdateFunction : public torch::autograd::Function<ResidualUpdateFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& f, const at::Tensor& dt,
                            bool relu) {
    at::Tensor out = below_autograd([&] { return call_forward(y, f, dt, relu); });
    ctx->saved_data["relu"] = relu;
    // The ReLU mask is read from the output; f and dt give df and ddt.
    ctx->save_for_backward({f, dt, relu ? out : at::Tensor()});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool relu = ctx->saved_data["relu"].toBool();
    const at::Tensor& grad = grads[0];
    auto [dy, df, ddt] = call_backward(grad, saved[0], saved[1], relu ? OptTensor(saved[2]) : std::nullopt);
    return {relu ? dy : grad, df, ddt, at::Tensor()};
  }
};

at::Tensor residual_update_autograd(const at::Tensor& y, const at::Tensor& f, const at::Tensor& dt, bool relu) {
  return ResidualUpdateFunction::apply(y, f, dt, relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, Autograd, m) { m.impl("residual_update", &residual_update_autograd); }

}  // namespace tsc
