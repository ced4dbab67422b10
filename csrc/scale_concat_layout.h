// Host-side layout logic of scale_concat (docs/ops.md, scale_concat), shared by the CPU and CUDA ops.
// The output follows x's layout: channels-last when x is channels-last-like (channel_layout.h),
// else contiguous; f is brought to that layout. The backward works in grad's layout.
#pragma once

#include <torch/all.h>

#include <vector>

#include "channel_layout.h"
#include "scale_concat_math.h"

namespace tsc {

// Uninitialised (N, channels, *spatial) tensor like `like` (dtype, device), channels-last or contiguous.
inline at::Tensor empty_in_layout(const at::Tensor& like, int64_t channels, bool channels_last) {
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end());
  shape[1] = channels;
  if (!channels_last) return at::empty(shape, like.options());
  std::vector<int64_t> last(shape.begin(), shape.end());
  last.erase(last.begin() + 1);
  last.push_back(channels);
  return at::empty(last, like.options()).movedim(-1, 1);
}

// (outer, cx, k, inner) of tensors of N samples with the given channels, in the given layout.
inline ScaleConcatShape scale_concat_shape(const at::Tensor& like, int64_t cx, int64_t k, bool channels_last) {
  int64_t spatial = 1;
  for (int64_t d = 2; d < like.dim(); ++d) spatial *= like.size(d);
  const int64_t n = like.size(0);
  return channels_last ? ScaleConcatShape{n * spatial, cx, k, 1} : ScaleConcatShape{n, cx, k, spatial};
}

inline void check_scale_concat_args(const char* op, const at::Tensor& x, const at::Tensor& f, const at::Tensor& dt,
                                    bool x_is_grad) {
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 5, op, ": tensors must be (N, C, *spatial) with 0-3 spatial dims, got ",
              x.sizes());
  TORCH_CHECK(f.dim() == x.dim() && f.size(0) == x.size(0) && f.sizes().slice(2) == x.sizes().slice(2), op,
              ": f must be (N, k, *spatial) matching ", x.sizes(), " in N and spatial dims, got ", f.sizes());
  TORCH_CHECK(!x_is_grad || x.size(1) >= f.size(1), op, ": grad must have at least f's ", f.size(1), " channels");
  TORCH_CHECK(f.scalar_type() == x.scalar_type(), op, ": f must have the dtype of ", x_is_grad ? "grad" : "x");
  TORCH_CHECK(dt.dim() == 1 && dt.size(0) == f.size(1), op, ": dt must be (k,) with k = ", f.size(1), ", got ",
              dt.sizes());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(dt.scalar_type() == acc, op, ": dt must be ", acc, " for ", x.scalar_type(), " inputs, got ",
              dt.scalar_type());
  TORCH_CHECK(x.device() == f.device() && x.device() == dt.device(), op, ": all tensors must be on one device");
}

// Elements per thread of the CUDA forward (scale_concat_cuda.cu, planned by scale_concat_plan.cpp):
// 16-byte packs (16 / element_size), else 4-byte ones for 2-byte types (bf16 / half pairs), else 1,
// the widest W dividing both x's and f's share of an out row (cx inner and k inner): then x's rows
// and f's rows of out start at multiples of W, so a pack never straddles x and f and its source run
// is W-aligned when the pointers are (the launcher checks them: else W = 1).
inline int64_t scale_concat_pack(const ScaleConcatShape& s, int64_t element_size) {
  for (const int64_t w : {16 / element_size, element_size == 2 ? int64_t{2} : int64_t{1}})
    if (w > 1 && (s.cx * s.inner) % w == 0 && (s.k * s.inner) % w == 0) return w;
  return 1;
}

// f's (outer, k, inner) block as a ChannelView: the view the CUDA ddt reduction is planned on
// (launch_geometry.h plan_channel_reduction).
inline ChannelView scale_concat_f_view(const ScaleConcatShape& s) { return ChannelView{s.outer, s.k, s.inner}; }

struct ScaleConcatForward {
  at::Tensor x, f, dt, out;
  ScaleConcatShape shape;
};

inline ScaleConcatForward prepare_scale_concat_forward(const at::Tensor& x_in, const at::Tensor& f_in,
                                                       const at::Tensor& dt_in) {
  check_scale_concat_args("tsc::scale_concat", x_in, f_in, dt_in, false);
  const bool cl = is_channels_last_like(x_in);
  ScaleConcatForward a{to_layout(x_in, cl), to_layout(f_in, cl), dt_in.contiguous(), {}, {}};
  a.out = empty_in_layout(a.x, x_in.size(1) + f_in.size(1), cl);
  a.shape = scale_concat_shape(a.x, x_in.size(1), f_in.size(1), cl);
  return a;
}

// df in grad's layout; every ddt channel is written by the kernels, so zeros only for empty inputs.
struct ScaleConcatBackward {
  at::Tensor g, f, dt, df, ddt;
  ScaleConcatShape shape;
};

inline ScaleConcatBackward prepare_scale_concat_backward(const at::Tensor& grad_in, const at::Tensor& f_in,
                                                         const at::Tensor& dt_in) {
  check_scale_concat_args("tsc::scale_concat_backward", grad_in, f_in, dt_in, true);
  const bool cl = is_channels_last_like(grad_in);
  ScaleConcatBackward a;
  a.g = to_layout(grad_in, cl);
  a.f = to_layout(f_in, cl);
  a.dt = dt_in.contiguous();
  a.df = empty_in_layout(a.g, f_in.size(1), cl);
  a.ddt = f_in.numel() == 0 ? at::zeros_like(a.dt) : at::empty_like(a.dt);
  a.shape = scale_concat_shape(a.g, grad_in.size(1) - f_in.size(1), f_in.size(1), cl);
  return a;
}

}  // namespace tsc
