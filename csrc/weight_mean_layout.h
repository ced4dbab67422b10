// Host-side layout logic of the weight-mean projection, shared by the CPU and CUDA ops (argument
// checks, packing offsets, stride views). w̄ is 1-D: weight after weight, each weight's (C_out, K)
// means row-major (the schema is documented in tsc_kernels/ops/weight_mean.py).
#pragma once

#include <torch/all.h>

#include <vector>

#include "host_device.h"

namespace tsc {

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

// A weight as rows of contiguous runs: the CUDA and Triton forward kernels read along them, so a
// warp's loads are adjacent values whatever the kernel size. Row r's `run` values start at
// (r / per_out) so + (r % per_out) sk; value e of a run belongs to output k = e % period, w̄ index
// r period + k of the weight. Two layouts are runs as they are:
//   C_in innermost (si == 1: 1x1 and channels-last weights): a row per (o, k), run C_in, period 1;
//   kernel innermost (NCHW: sk == 1, si == K): a row per o, run C_in K, period K.
// Any other (a strided C_in view) is read from a contiguous copy.
struct RunView {
  int64_t rows, per_out, period, run;
  int64_t so, sk, C_in;
};

inline bool run_view(const WeightView& v, RunView& r) {
  r.so = v.so;
  r.sk = v.sk;
  r.C_in = v.C_in;
  if (v.si == 1 || v.C_in == 1) {  // C_in == 1: the stride of C_in is never used
    r.rows = v.C_out * v.K;
    r.per_out = v.K;
    r.period = 1;
    r.run = v.C_in;
    return true;
  }
  if (v.sk == 1 && v.si == v.K) {
    r.rows = v.C_out;
    r.per_out = 1;
    r.period = v.K;
    r.run = v.C_in * v.K;
    return true;
  }
  return false;
}

// The tensor the forward kernels read for weight w (w, or a contiguous copy when w is not rows of
// runs), with its RunView.
inline at::Tensor weight_runs(const at::Tensor& w, RunView& r) {
  WeightView v;
  if (weight_view(w, v) && run_view(v, r)) return w;
  at::Tensor c = w.contiguous();
  TORCH_INTERNAL_ASSERT(weight_view(c, v) && run_view(v, r));
  return c;
}

// Lane groups of a warp on one row of period P <= 32: 32 / P groups of P lanes. A step reads
// pack (values per lane) x P x groups adjacent values, a multiple of P, so each lane's slots keep
// their output k from step to step; the groups' sums then merge in a fixed tree. P > 32: 0 (lanes
// walk the outputs, one each, along C_in: K adjacent values per C_in step).
TSC_HD int64_t run_lane_groups(int64_t period) { return period <= 32 ? 32 / period : 0; }

// Values per lane per step: one 16-byte load (8 bf16 / fp16, 4 fp32, 2 fp64).
constexpr int64_t run_pack_values(int64_t element_size) { return 16 / element_size; }

inline void check_weights(const char* op, at::TensorList weights) {
  TORCH_CHECK(!weights.empty(), op, ": weights must not be empty");
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK(weights[i].dim() >= 3 && weights[i].dim() <= 5, op, ": weights[", i,
                "] must be a conv weight (C_out, C_in, *k) with 1-3 kernel dims, got ", weights[i].sizes());
    TORCH_CHECK(weights[i].scalar_type() == weights[0].scalar_type(), op, ": weights[", i,
                "] must have weights[0]'s dtype");
    TORCH_CHECK(weights[i].device() == weights[0].device(), op, ": weights[", i, "] must be on weights[0]'s device");
    TORCH_CHECK(at::isFloatingType(weights[i].scalar_type()), op, ": weights must be floating point");
    TORCH_CHECK(weights[i].size(1) >= 1, op, ": weights[", i, "] must have C_in >= 1 (w̄ is a mean over C_in), got ",
                weights[i].sizes());
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

inline at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

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
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.numel() == a.total, op, ": grad must be 1-D with ", a.total,
              " values, got ", grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == acc, op, ": grad must be ", acc, ", got ", grad_in.scalar_type());
  TORCH_CHECK(grad_in.device() == weights[0].device(), op, ": grad must be on the weights' device ",
              weights[0].device(), ", got ", grad_in.device());
  for (size_t j = 0; j < weights.size(); ++j)
    TORCH_CHECK(weights[j].size(1) >= 1, op, ": weights[", j, "] must have C_in >= 1, got ", weights[j].sizes());
  a.grad = grad_in.contiguous();
  a.out = at::empty_like(a.grad);
  return a;
}

}  // namespace tsc
