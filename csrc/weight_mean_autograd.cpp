// Autograd of tsc::weight_mean in C++ (the Autograd dispatch key), for every device.
//
// The op runs once per training step for every chosen conv weight of the network (32 for
// ResNet-50), and its backward hands each weight a view: a Python autograd formula spends more
// interpreter time splitting, viewing and expanding those than the kernel takes. The formula is
// the one in tsc_kernels/ops/weight_mean.py's docstring (docs/ops.md): one backward op writes
// dw̄ / C_in packed like w̄, and each weight's gradient is its slice viewed as (C_out, 1, *k) and
// expanded over C_in (stride 0), so autograd adds it into the conv's own gradient without a
// full-size dW ever being written. register_fake stays on the Python side.
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <typeinfo>
#include <vector>

#include "autograd_util.h"

namespace tsc {
namespace {

at::Tensor call_forward(at::TensorList weights) {
  static const auto op = typed_op<at::Tensor(at::TensorList)>("tsc::weight_mean");
  return op.call(weights);
}

at::Tensor call_backward(const at::Tensor& grad, at::TensorList weights) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, at::TensorList)>("tsc::weight_mean_backward");
  return op.call(grad, weights);
}

// dW of one weight (C_out, C_in, *k): the packed values at `offset` of the contiguous 1-D
// `scaled`, read as (C_out, 1, *k) and expanded over C_in (stride 0), built as ATen builds a view
// (alias_with_sizes_and_strides): a TensorImpl on the same storage, no dispatcher call, no
// autograd view record (the caller is a backward without create_graph: the gradients are data).
// Autograd never writes into it: a stride-0 tensor is never accumulated into in place.
at::Tensor expanded_alias(const at::Tensor& scaled, int64_t offset, c10::IntArrayRef sizes) {
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    strides[d] = d == 1 ? 0 : stride;
    if (d != 1) stride *= sizes[d];
  }
  at::Tensor view = at::detail::make_tensor<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(scaled.storage()),
                                                             scaled.key_set(), scaled.dtype());
  view.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides, scaled.storage_offset() + offset);
  return view;
}

// A dense tensor of the base TensorImpl class (no wrapper or Python subclass) with real storage.
bool plain_tensor(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return typeid(*impl) == typeid(c10::TensorImpl) && !impl->is_python_dispatch() && t.has_storage() &&
         (t.is_cpu() || t.is_cuda());
}

// The backward node. Its edges: every weight. It keeps the weights (the backward op reads their
// shapes and C_in; the version check stays: a weight changed in place before the backward is an
// error, as for any saved tensor).
struct WeightMeanBackward : public Node {
  std::vector<SavedVariable> weights_;

  std::string name() const override { return "WeightMeanBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable& w : weights_) w.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(weights_.size());
    if (!grads[0].defined()) return out;
    const std::vector<at::Tensor> weights = unpack_all(weights_);
    // cast the packed values once (fp16/bf16 weights), not each expanded dW
    const at::Tensor scaled = call_backward(grads[0], weights).to(weights[0].scalar_type());
    // Without create_graph the gradients are plain data: each is made as an alias of `scaled`'s
    // storage without a dispatcher call (three ops per weight before: narrow, view, expand; 162
    // of a CIFAR ResNet-56 step's top-level ops). With create_graph they stay differentiable ops.
    // Only for plain tensors outside any dispatch mode: a tracer's tensors (fake, functional,
    // functorch wrappers, Python subclasses) and modes must see every tensor made as an op.
    const bool as_ops =
        at::GradMode::is_enabled() || !plain_tensor(scaled) || c10::impl::TorchDispatchModeTLS::any_modes_set();
    int64_t offset = 0;
    for (size_t j = 0; j < weights.size(); ++j) {
      const at::Tensor& w = weights[j];
      std::vector<int64_t> shape = w.sizes().vec();
      shape[1] = 1;
      const int64_t n = w.size(0) * c10::multiply_integers(shape.begin() + 2, shape.end());
      if (task_should_compute_output(j))
        out[j] = as_ops ? scaled.narrow(0, offset, n).view(shape).expand(w.sizes())
                        : expanded_alias(scaled, offset, w.sizes());
      offset += n;
    }
    return out;
  }
};

at::Tensor weight_mean_autograd(at::TensorList weights) {
  check_backward_only("tsc::weight_mean", weights);
  at::Tensor out = below_autograd([&] { return call_forward(weights); });
  if (torch::autograd::compute_requires_grad(weights)) {
    auto node = make_node<WeightMeanBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(weights));
    torch::autograd::set_history(out, node);
    node->weights_ = save_all(weights);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, Autograd, m) { m.impl("weight_mean", &weight_mean_autograd); }

}  // namespace tsc
