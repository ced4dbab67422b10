// What the C++ autograd of the tsc ops (csrc/<op>_autograd.cpp) shares: the typed dispatcher handle
// of the op and of its backward, the forward run below autograd, optional tensors in the saved
// variables (an undefined tensor stands for None), and the making of their backward nodes.
#pragma once

#include <ATen/FuncTorchTLS.h>
#include <torch/all.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

namespace tsc {

using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// The typed handle of a registered op, e.g. typed_op<at::Tensor(const at::Tensor&)>("tsc::x"); the
// callers keep it in a function-local static, so the schema is looked up once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// f() with the Autograd keys (and, by default, ADInplaceOrView) excluded, as a Function's forward
// runs its op: returns f's result.
template <typename Guard = at::AutoDispatchBelowADInplaceOrView, typename F>
auto below_autograd(F&& f) {
  Guard guard;
  return f();
}

// An optional argument as a saved variable (undefined for None), and back.
inline at::Tensor to_saved(const OptTensor& t) { return t.value_or(at::Tensor()); }
inline OptTensor from_saved(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// --- Hand-written autograd nodes -----------------------------------------------------------------
// The ops a training step calls once per block (the fused tails) or once per step (the controller)
// record their backward as a Node of their own, as PyTorch's generated autograd does for its ops
// (torch/csrc/autograd/generated), not through torch::autograd::Function: its CppNode cost the
// host ~16 µs more per fused-tail forward + backward (a node built even without grad, input and
// output metadata vectors, the output wrapping's sets of dirty and non-differentiable tensors, the
// node's demangled type name built on every backward call), 27 times per CIFAR ResNet-56 step.
// Not supported, as with Function's nodes that mark outputs non-differentiable: compiled autograd
// over an eager forward (compile the forward instead: torch.compile traces these ops' formulas).

using torch::autograd::Node;
using torch::autograd::SavedVariable;

// A Node's owning pointer: std::shared_ptr in torch 2.11, c10::intrusive_ptr in 2.14 (both supported).
using NodePtr = decltype(torch::autograd::Edge::function);
template <class N>
auto make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    // torch::autograd::deleteNode (found by argument-dependent lookup: it exists only where the
    // pointer is a shared_ptr) frees a long chain of nodes without deep recursion
    return std::shared_ptr<N>(new N(), [](N* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<N>();
  }
}

// A list of inputs saved for the backward, and unpacked there.
inline std::vector<SavedVariable> save_all(at::TensorList tensors) {
  std::vector<SavedVariable> saved;
  saved.reserve(tensors.size());
  for (const at::Tensor& t : tensors) saved.emplace_back(t, /*is_output=*/false);
  return saved;
}
inline std::vector<at::Tensor> unpack_all(const std::vector<SavedVariable>& saved) {
  std::vector<at::Tensor> tensors;
  tensors.reserve(saved.size());
  for (const SavedVariable& v : saved) tensors.push_back(v.unpack());
  return tensors;
}

inline bool has_fw_grad(const at::Tensor& t) { return torch::autograd::isFwGradDefined(t); }
inline bool has_fw_grad(const OptTensor& t) { return torch::autograd::isFwGradDefined(t); }
inline bool has_fw_grad(at::TensorList ts) {
  return std::any_of(ts.begin(), ts.end(), [](const at::Tensor& t) { return has_fw_grad(t); });
}

// What torch::autograd::Function::apply refuses, refused here too: functorch transforms (vmap,
// grad, jvp) and forward-mode AD, which a Node's backward alone cannot serve. Arguments: tensors,
// optional tensors and tensor lists.
template <class... Inputs>
void check_backward_only(const char* op, const Inputs&... inputs) {
  if (const auto& functorch_tls = at::functorch::functorchTLSAccessor())
    functorch_tls->checkSupportsCppAutogradFunction();
  TORCH_CHECK(!(has_fw_grad(inputs) || ...), op, ": forward-mode AD is not supported");
}

}  // namespace tsc
