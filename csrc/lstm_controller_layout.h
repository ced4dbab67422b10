// Host-side layout logic of the batched LSTM controller, shared by the CPU and CUDA ops (argument
// checks, packing offsets).
//
// Packing (the schema is documented in tsc_kernels/ops/lstm_controller.py):
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
inline ControllerDims controller_dims(const char* op, const at::Tensor& wbar, at::IntArrayRef blocks,
                                      at::TensorList params) {
  const int64_t S = static_cast<int64_t>(blocks.size());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == kParamsPerStage * S, op,
              ": params must hold 8 tensors per stage (", kParamsPerStage * S, " for ", S, " stages), got ",
              params.size());
  TORCH_CHECK(wbar.dim() == 1, op, ": wbar_packed must be 1-D, got ", wbar.sizes());
  TORCH_CHECK(wbar.scalar_type() == at::kFloat || wbar.scalar_type() == at::kDouble, op,
              ": wbar_packed must be float32 or float64, got ", wbar.scalar_type());
  ControllerDims dims;
  for (int64_t s = 0; s < S; ++s) {
    const at::Tensor* p = params.data() + kParamsPerStage * s;
    for (int64_t k = 0; k < kParamsPerStage; ++k) {
      TORCH_CHECK(p[k].scalar_type() == wbar.scalar_type(), op, ": params[", kParamsPerStage * s + k,
                  "] must have wbar_packed's dtype ", wbar.scalar_type(), ", got ", p[k].scalar_type());
      TORCH_CHECK(p[k].device() == wbar.device(), op, ": params[", kParamsPerStage * s + k,
                  "] must be on wbar_packed's device");
    }
    TORCH_CHECK(blocks[s] >= 0, op, ": blocks[", s, "] must be >= 0, got ", blocks[s]);
    TORCH_CHECK(p[kFcInW].dim() == 2 && p[kFcOutW].dim() == 2, op, ": stage ", s,
                ": fc_in.weight and fc_out.weight must be 2-D");
    const int64_t H = p[kFcInW].size(0), D = p[kFcInW].size(1), C = p[kFcOutW].size(0);
    auto expect = [&](int64_t k, std::vector<int64_t> shape) {
      TORCH_CHECK(p[k].sizes() == at::IntArrayRef(shape), op, ": stage ", s, ": params[", kParamsPerStage * s + k,
                  "] must have shape ", shape, ", got ", p[k].sizes());
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
  TORCH_CHECK(wbar.numel() == dims.wbar_numel, op, ": wbar_packed must hold sum(L_s * D_s) = ", dims.wbar_numel,
              " values, got ", wbar.numel());
  return dims;
}

// Every tensor of ts contiguous (the kernels index params as dense row-major arrays).
// The backward's dims, after checking its extra arguments (grad, dt_packed, saved) against the
// forward's: sizes, dtype and device, the same checks on every backend.
inline ControllerDims controller_backward_dims(const char* op, const at::Tensor& grad, const at::Tensor& dt,
                                               const at::Tensor& wbar, at::IntArrayRef blocks, at::TensorList params,
                                               const at::Tensor& saved) {
  const ControllerDims dims = controller_dims(op, wbar, blocks, params);
  TORCH_CHECK(grad.numel() == dims.dt_numel && dt.numel() == dims.dt_numel, op, ": grad and dt must hold ",
              dims.dt_numel, " values");
  TORCH_CHECK(saved.numel() == dims.saved_numel, op, ": saved must hold ", dims.saved_numel, " values, got ",
              saved.numel());
  TORCH_CHECK(grad.scalar_type() == wbar.scalar_type() && dt.scalar_type() == wbar.scalar_type() &&
                  saved.scalar_type() == wbar.scalar_type(),
              op, ": grad, dt and saved must have wbar_packed's dtype");
  TORCH_CHECK(grad.device() == wbar.device(), op, ": grad must be on wbar_packed's device ", wbar.device(), ", got ",
              grad.device());
  TORCH_CHECK(dt.device() == wbar.device(), op, ": dt_packed must be on wbar_packed's device ", wbar.device(), ", got ",
              dt.device());
  TORCH_CHECK(saved.device() == wbar.device(), op, ": saved must be on wbar_packed's device ", wbar.device(), ", got ",
              saved.device());
  return dims;
}

inline std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

}  // namespace tsc
