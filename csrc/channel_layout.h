// The channel layout every per-channel op reads its (N, C, *spatial) tensors in, on the host (the CPU
// and CUDA ops and the launch planners of residual_update, batch_norm_residual_update, scale_concat,
// multistep_update, ode_combine; launch_geometry.h).
//
// Every (N, C, *spatial) tensor these ops accept is read as a contiguous block of shape
// (outer, C, inner): NC(spatial)-contiguous tensors give outer = N, inner = prod(spatial);
// channels-last tensors (channel dim innermost in memory) give outer = N * prod(spatial), inner = 1.
// Kernels then need no strides, and the output keeps the input's memory format.
#pragma once

#include <torch/all.h>

namespace tsc {

struct ChannelView {
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

// True when the channel dim is innermost in memory (NHWC-like) but the tensor is not plain
// contiguous: for C == 1 or no spatial dims both layouts coincide and we take the contiguous one.
inline bool is_channels_last_like(const at::Tensor& t) {
  return t.dim() > 2 && !t.is_contiguous() && t.movedim(1, -1).is_contiguous();
}

// `t` with the requested layout, copying only when it is not already in it.
inline at::Tensor to_layout(const at::Tensor& t, bool channels_last) {
  if (!channels_last || t.dim() <= 2) return t.contiguous();
  if (t.movedim(1, -1).is_contiguous()) return t;
  return t.movedim(1, -1).contiguous().movedim(-1, 1);
}

inline ChannelView channel_view(const at::Tensor& t, bool channels_last) {
  const int64_t n = t.size(0), c = t.size(1);
  const int64_t spatial = c == 0 || n == 0 ? 0 : t.numel() / (n * c);
  return channels_last ? ChannelView{n * spatial, c, 1} : ChannelView{n, c, spatial};
}

}  // namespace tsc
