// Host-side layout logic of the weight-mean projection and the batched LSTM controller, shared by
// the CPU and CUDA ops (argument checks, packing offsets, stride views).
//
// Packing (the schemas are documented in tsc_kernels/ops/weight_mean.py and lstm_controller.py):
// - wbar_packed is 1-D: stage after stage, each stage's (L_s, D_s) block matrix row-major, which
//   is exactly what tsc::weight_mean returns for the network's conv weights in block order;
// - dt_packed is 1-D: stage after stage, each stage's (L_s, C_s) Δt row-major;
// - saved is 1-D: per stage, 7 * L_s * H_s values: x (L, H), activated gates (L, 4H) in the order
//   i, f, g, o, cell states c (L, H), hidden states h (L, H).
// - params holds 8 tensors per stage: fc_in.weight (H, D), fc_in.bias (H), weight_ih (4H, H),
//   weight_hh (4H, H), bias_ih (4H), bias_hh (4H), fc_out.weight (C, H), fc_out.bias (C).
#pragma once

#include <torch/all.h>

#include <vector>

namespace tsc {

constexpr int64_t kParamsPerStage = 8;
enum ParamIndex { kFcInW = 0, kFcInB, kWih, kWhh, kBih, kBhh, kFcOutW, kFcOutB };
constexpr int64_t kSavedPerUnit = 7;  // x, i, f, g, o, c, h per hidden unit and block

struct StageDims {
  int64_t L, D, H, C;
  int64_t wbar_off, dt_off, saved_off;
};

struct ControllerDims {
  std::vector<StageDims> stages;
  int64_t wbar_numel = 0, dt_numel = 0, saved_numel = 0;
};

// Checks the packed arguments against each other and computes every stage's offsets.
inline ControllerDims controller_dims(const char* op, const at::Tensor& wbar, at::IntArrayRef blocks, at::TensorList params) {
  const int64_t S = static_cast<int64_t>(blocks.size());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == kParamsPerStage * S, op, ": params must hold 8 tensors per stage (", kParamsPerStage * S, " for ", S, " stages), got ", params.size());
  TORCH_CHECK(wbar.dim() == 1, op, ": wbar_packed must be 1-D, got ", wbar.sizes());
  TORCH_CHECK(wbar.scalar_type() == at::kFloat || wbar.scalar_type() == at::kDouble, op, ": wbar_packed must be float32 or float64, got ", wbar.scalar_type());
  ControllerDims dims;
  for (int64_t s = 0; s < S; ++s) {
    const at::Tensor* p = params.data() + kParamsPerStage * s;
    for (int64_t k = 0; k < kParamsPerStage; ++k) {
      TORCH_CHECK(p[k].scalar_type() == wbar.scalar_type(), op, ": params[", kParamsPerStage * s + k, "] must have wbar_packed's dtype ", wbar.scalar_type(), ", got ", p[k].scalar_type());
      TORCH_CHECK(p[k].device() == wbar.device(), op, ": params[", kParamsPerStage * s + k, "] must be on wbar_packed's device");
    }
    TORCH_CHECK(blocks[s] >= 0, op, ": blocks[", s, "] must be >= 0, got ", blocks[s]);
    TORCH_CHECK(p[kFcInW].dim() == 2 && p[kFcOutW].dim() == 2, op, ": stage ", s, ": fc_in.weight and fc_out.weight must be 2-D");
    const int64_t H = p[kFcInW].size(0), D = p[kFcInW].size(1), C = p[kFcOutW].size(0);
    auto expect = [&](int64_t k, std::vector<int64_t> shape) {
      TORCH_CHECK(p[k].sizes() == at::IntArrayRef(shape), op, ": stage ", s, ": params[", kParamsPerStage * s + k, "] must have shape ", shape, ", got ", p[k].sizes());
    };
    expect(kFcInB, {H});
    expect(kWih, {4 * H, H});
    expect(kWhh, {4 * H, H});
    expect(kBih, {4 * H});
    expect(kBhh, {4 * H});
    expect(kFcOutW, {C, H});
    expect(kFcOutB, {C});
    const int64_t L = blocks[s];
    dims.stages.push_back({L, D, H, C, dims.wbar_numel, dims.dt_numel, dims.saved_numel});
    dims.wbar_numel += L * D;
    dims.dt_numel += L * C;
    dims.saved_numel += kSavedPerUnit * L * H;
  }
  TORCH_CHECK(wbar.numel() == dims.wbar_numel, op, ": wbar_packed must hold sum(L_s * D_s) = ", dims.wbar_numel, " values, got ", wbar.numel());
  return dims;
}

// A conv weight (C_out, C_in, *k) seen as (C_out, C_in, K) with strides (so, si, sk): possible when
// the kernel dims collapse into one (contiguous and channels-last weights both do).
struct WeightView {
  int64_t C_out, C_in, K;
  int64_t so, si, sk;
};

inline bool weight_view(const at::Tensor& w, WeightView& v) {
  v.C_out = w.size(0);
  v.C_in = w.size(1);
  v.so = w.stride(0);
  v.si = w.stride(1);
  v.K = 1;
  v.sk = 1;
  bool first = true;
  for (int64_t d = w.dim() - 1; d >= 2; --d) {
    if (w.size(d) == 1) continue;  // size-1 dims have no meaningful stride
    if (first) {
      v.sk = w.stride(d);
      first = false;
    } else if (w.stride(d) != v.K * v.sk) {
      return false;
    }
    v.K *= w.size(d);
  }
  return true;
}

inline void check_weights(const char* op, at::TensorList weights) {
  TORCH_CHECK(!weights.empty(), op, ": weights must not be empty");
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK(weights[i].dim() >= 3 && weights[i].dim() <= 5, op, ": weights[", i, "] must be a conv weight (C_out, C_in, *k) with 1-3 kernel dims, got ", weights[i].sizes());
    TORCH_CHECK(weights[i].scalar_type() == weights[0].scalar_type(), op, ": weights[", i, "] must have weights[0]'s dtype");
    TORCH_CHECK(weights[i].device() == weights[0].device(), op, ": weights[", i, "] must be on weights[0]'s device");
    TORCH_CHECK(at::isFloatingType(weights[i].scalar_type()), op, ": weights must be floating point");
  }
}

// w̄ of every weight is written at the running offset sum(C_out * K) of the weights before it.
inline std::vector<int64_t> mean_offsets(at::TensorList weights, int64_t& total) {
  std::vector<int64_t> off(weights.size());
  total = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    off[i] = total;
    total += weights[i].size(0) * c10::multiply_integers(weights[i].sizes().slice(2));
  }
  return off;
}

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// tsc::weight_mean_backward's checked arguments: grad (packed like w̄, contiguous), each weight's
// offset in it, and the output (dw̄ / C_in, packed the same way).
struct WeightMeanGrad {
  at::Tensor grad, out;
  std::vector<int64_t> off;
  int64_t total = 0;
};

inline WeightMeanGrad prepare_weight_mean_backward(const char* op, const at::Tensor& grad_in, at::TensorList weights) {
  check_weights(op, weights);
  WeightMeanGrad a;
  a.off = mean_offsets(weights, a.total);
  const auto acc = accumulation_type(weights[0].scalar_type());
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.numel() == a.total, op, ": grad must be 1-D with ", a.total, " values, got ", grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == acc, op, ": grad must be ", acc, ", got ", grad_in.scalar_type());
  TORCH_CHECK(grad_in.device() == weights[0].device(), op, ": grad must be on the weights' device ", weights[0].device(), ", got ", grad_in.device());
  for (size_t j = 0; j < weights.size(); ++j)
    TORCH_CHECK(weights[j].size(1) >= 1, op, ": weights[", j, "] must have C_in >= 1, got ", weights[j].sizes());
  a.grad = grad_in.contiguous();
  a.out = at::empty_like(a.grad);
  return a;
}

}  // namespace tsc
