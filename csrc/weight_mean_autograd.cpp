// Autograd of tsc::weight_mean in C++ (the Autograd dispatch key), for every device.
//
// The op runs once per training step for every chosen conv weight of the network (32 for
// ResNet-50), and its backward hands each weight a view: a Python autograd formula spends more
// interpreter time splitting, viewing and expanding those than the kernel takes. The formula is
// the one in tsc_kernels/ops/weight_mean.py's docstring (docs/ops.md): one backward op writes
// dw̄ / C_in packed like w̄, and each weight's gradient is its slice viewed as (C_out, 1, *k) and
// expanded over C_in (stride 0), so autograd adds it into the conv's own gradient without a
// full-size dW ever being written. A training step's variant, tsc::_weight_mean_aliased (below),
// adds it into the conv's gradient itself. register_fake stays on the Python side.
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <typeinfo>
#include <vector>

#include "autograd_util.h"
#include "weight_mean_kernels.h"

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

// Values of w's packed w̄ gradient: C_out * prod(k).
int64_t packed_numel(const at::Tensor& w) {
  return w.size(0) * c10::multiply_integers(w.sizes().begin() + 2, w.sizes().end());
}

// Whether the gradients made from `scaled` must be ops. Without create_graph they are plain data:
// each is made as an alias of `scaled`'s storage without a dispatcher call (three ops per weight
// before: narrow, view, expand; 162 of a CIFAR ResNet-56 step's top-level ops). With create_graph
// they stay differentiable ops, and a tracer's tensors (fake, functional, functorch wrappers,
// Python subclasses) and dispatch modes must see every tensor made as an op.
bool grads_as_ops(const at::Tensor& scaled) {
  return at::GradMode::is_enabled() || !plain_tensor(scaled) || c10::impl::TorchDispatchModeTLS::any_modes_set();
}

// w's w̄ gradient (C_out, C_in, *k): the values at `offset` of `scaled` read as (C_out, 1, *k),
// broadcast over C_in.
at::Tensor wbar_grad(const at::Tensor& scaled, int64_t offset, const at::Tensor& w, bool as_ops) {
  if (!as_ops) return expanded_alias(scaled, offset, w.sizes());
  std::vector<int64_t> shape = w.sizes().vec();
  shape[1] = 1;
  return scaled.narrow(0, offset, packed_numel(w)).view(shape).expand(w.sizes());
}

// --- A training step's variant: w̄ and the weights the convs read, one node ---------------------
// Autograd adds each weight's w̄ gradient (dW's stride-0 broadcast over C_in) into the conv's own
// gradient with one TensorIterator add per weight, which on the CPU runs a 9-value row per
// (C_out, C_in) pair of a 3x3 kernel: 410 µs for CIFAR ResNet-56's 54 weights, 2 % of its
// host-bench step, where one pass over the same bytes takes ~60 µs. Here the convs read each weight
// through an alias made by the node of w̄ (same storage and version counter: the convs' saved-tensor
// checks still see an optimizer step between forward and backward), so that node receives each
// conv's dW with dw̄ and adds the broadcast into dW in place (add_wbar_grad_cpu, weight_mean_cpu.cpp;
// on a GPU every weight's in one launch, add_wbar_grads_cuda: autograd's adds are a launch each, 54
// per CIFAR ResNet-56 step, each costing the host a TensorIterator setup and a launch). Eager, CPU
// or CUDA (a CUDA build), plain tensors only (NetworkPlan.run): otherwise the aliases list is empty
// and w̄ is weight_mean's.

// A tensor on w's storage with w's sizes, strides, offset and version counter, no autograd history
// (the caller gives it the node's).
at::Tensor plain_alias(const at::Tensor& w) {
  at::Tensor a = at::detail::make_tensor<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(w.storage()), w.key_set(),
                                                          w.dtype());
  a.unsafeGetTensorImpl()->set_sizes_and_strides(w.sizes(), w.strides(), w.storage_offset());
  torch::autograd::impl::set_version_counter(a, torch::autograd::impl::version_counter(w));
  return a;
}

// Whether w̄'s gradient may be added into the conv's dW `g` of weight w in place: where autograd's
// own accumulation would have (g holds the only reference to its buffer; not with create_graph or a
// tracer's tensors: `as_ops`).
bool owned_grad(const at::Tensor& g, const at::Tensor& scaled, const at::Tensor& w, bool as_ops) {
  return !as_ops && plain_tensor(g) && g.use_count() == 1 && g.storage().use_count() == 1 && g.sizes() == w.sizes() &&
         g.scalar_type() == scaled.scalar_type();
}

// Whether t's device has a kernel adding w̄'s gradients into the convs' (CUDA: in a CUDA build).
bool adds_on_device(const at::Tensor& t) {
#ifdef TSC_WITH_CUDA
  return t.is_cpu() || t.is_cuda();
#else
  return t.is_cpu();
#endif
}

// Whether the kernels add into g in place: an owned, contiguous dW (on a GPU the caller batches
// those: add_wbar_grads_cuda, whose index math is 32-bit).
bool kernel_adds(const at::Tensor& g, bool owned) {
  return owned && adds_on_device(g) && g.is_contiguous() && (g.is_cpu() || g.numel() <= INT32_MAX);
}

// The conv's dW `g` of weight w plus w's w̄ gradient, where the kernels do not add it: in place
// when g is owned, else as the engine adds, g + the stride-0 view.
at::Tensor add_wbar_grad(at::Tensor g, const at::Tensor& scaled, int64_t offset, const at::Tensor& w, bool owned) {
  const at::Tensor grad = wbar_grad(scaled, offset, w, /*as_ops=*/true);
  return owned ? g.add_(grad) : g + grad;
}

// The backward node. Its edges: every weight. Its inputs: w̄'s gradient, and with `aliased`
// (tsc::_weight_mean_aliased) then each alias's, its conv's dW, into which it adds the weight's w̄
// gradient itself. It keeps the weights (the backward op reads their shapes and C_in; the version
// check stays: a weight changed in place before the backward is an error, as for any saved tensor).
struct WeightMeanBackward : public Node {
  std::vector<SavedVariable> weights_;
  bool aliased_ = false;

  std::string name() const override { return aliased_ ? "WeightMeanAliasedBackward" : "WeightMeanBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable& w : weights_) w.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(weights_.size());
    // the conv's dW of weight j (undefined without aliases, or for a conv the loss does not read)
    const auto conv_grad = [&](size_t j) { return aliased_ ? std::move(grads[j + 1]) : at::Tensor(); };
    if (!grads[0].defined()) {  // no gradient reaches w̄: the convs' own
      for (size_t j = 0; j < out.size(); ++j) out[j] = conv_grad(j);
      return out;
    }
    const std::vector<at::Tensor> weights = unpack_all(weights_);
    // cast the packed values once (fp16/bf16 weights), not each expanded dW
    const at::Tensor scaled = call_backward(grads[0], weights).to(weights[0].scalar_type());
    const bool as_ops = grads_as_ops(scaled);
    std::vector<at::Tensor> gpu_grads;  // owned CUDA dWs: one launch adds into all of them
    std::vector<int64_t> gpu_offsets;
    int64_t next = 0;
    for (size_t j = 0; j < weights.size(); ++j) {
      const int64_t offset = next;  // weight j's first packed value
      next += packed_numel(weights[j]);
      at::Tensor g = conv_grad(j);
      if (!task_should_compute_output(j)) continue;
      if (!g.defined()) {  // a conv the loss does not read, or no aliases: w̄'s gradient alone
        out[j] = wbar_grad(scaled, offset, weights[j], as_ops);
        continue;
      }
      const bool owned = owned_grad(g, scaled, weights[j], as_ops);
      if (!kernel_adds(g, owned)) {
        out[j] = add_wbar_grad(std::move(g), scaled, offset, weights[j], owned);
        continue;
      }
      if (g.is_cpu()) {
        add_wbar_grad_cpu(g, scaled, offset);
      } else {
        gpu_grads.push_back(g);
        gpu_offsets.push_back(offset);
      }
      out[j] = std::move(g);
    }
#ifdef TSC_WITH_CUDA
    if (!gpu_grads.empty()) add_wbar_grads_cuda(gpu_grads, scaled, gpu_offsets);
#endif
    return out;
  }
};

// w̄'s node (edges: every weight; the weights saved), made the history of `out`.
auto attach_node(const at::Tensor& out, at::TensorList weights, bool aliased) {
  auto node = make_node<WeightMeanBackward>();
  node->aliased_ = aliased;
  node->set_next_edges(torch::autograd::collect_next_edges(weights));
  torch::autograd::set_history(out, node);
  node->weights_ = save_all(weights);
  return node;
}

at::Tensor weight_mean_autograd(at::TensorList weights) {
  check_backward_only("tsc::weight_mean", weights);
  at::Tensor out = below_autograd([&] { return call_forward(weights); });
  if (torch::autograd::compute_requires_grad(weights)) attach_node(out, weights, /*aliased=*/false);
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> weight_mean_aliased(at::TensorList weights) {
  // every weight trained (a frozen conv keeps reading its weight: an alias would require grad), on
  // a device whose kernels add w̄'s gradients
  const bool plain = !c10::impl::TorchDispatchModeTLS::any_modes_set() && at::GradMode::is_enabled() &&
                     std::all_of(weights.begin(), weights.end(), [](const at::Tensor& w) {
                       return plain_tensor(w) && adds_on_device(w) && w.requires_grad();
                     });
  if (!plain) return {weight_mean_autograd(weights), {}};
  check_backward_only("tsc::weight_mean", weights);
  at::Tensor out = below_autograd([&] { return call_forward(weights); });
  const auto node = attach_node(out, weights, /*aliased=*/true);
  std::vector<at::Tensor> aliases;
  aliases.reserve(weights.size());
  for (const at::Tensor& w : weights) {
    aliases.push_back(plain_alias(w));
    torch::autograd::set_history(aliases.back(), node);
  }
  return {out, aliases};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, Autograd, m) { m.impl("weight_mean", &weight_mean_autograd); }

// Internal (not an op of the op list): eager training steps only (CPU; CUDA in a CUDA build), its
// outputs alias its inputs.
TORCH_LIBRARY_FRAGMENT(tsc, m) {
  m.def("_weight_mean_aliased(Tensor[] weights) -> (Tensor, Tensor[])", &weight_mean_aliased);
}

}  // namespace tsc
