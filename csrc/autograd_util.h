// What the C++ autograd of the tsc ops (csrc/<op>_autograd.cpp) shares: the typed dispatcher handle
// of the op and of its backward, the forward run below autograd, and optional tensors in the saved
// variables (an undefined tensor stands for None).
#pragma once

#include <torch/all.h>
#include <torch/autograd.h>

#include <optional>

namespace tsc {

using torch::autograd::AutogradContext;
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

}  // namespace tsc
