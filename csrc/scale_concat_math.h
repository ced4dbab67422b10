// Per-element math of scale_concat `out = cat([x, f * dt[c]], dim=1)` (docs/ops.md, scale_concat),
// shared by the CPU and CUDA kernels so the CPU tests cover the arithmetic and indexing the GPU runs.
// Arithmetic in the accumulation type acc_t (fp32 for fp32/fp16/bf16, fp64 for fp64).
//
// Every tensor is read as a contiguous (outer, channels, inner) block (channel_layout.h): for
// NC(spatial)-contiguous tensors outer = N, inner = prod(spatial); for channels-last ones
// outer = N * prod(spatial), inner = 1. out is (outer, Cx + k, inner), x (outer, Cx, inner),
// f (outer, k, inner), so one row `o` of out is x's row o followed by f's row o.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace tsc {

struct ScaleConcatShape {
  int64_t outer, cx, k, inner;
};

template <typename T>
TSC_HD T scale_concat_forward(T f, T dt) {
  return f * dt;
}

// df = g * dt and the term g * f of ddt[c] (g: the gradient of the output's f part).
template <typename T>
TSC_HD T scale_concat_df(T g, T dt) {
  return g * dt;
}

template <typename T>
TSC_HD T scale_concat_ddt_term(T g, T f) {
  return g * f;
}

// Where output element i (flat index into the (outer, Cx + k, inner) block) comes from:
// returns true for x (src = index into x), false for f (src = index into f, channel = its channel).
// `row` divides by (Cx + k) * inner and `inner` by inner: anything with div / divmod (the CUDA
// kernel passes ATen's 32-bit magic-number IntDivider below 2^31 elements, cuda_elementwise.cuh).
template <typename index_t, typename Divider>
TSC_HD bool scale_concat_source(index_t i, const Divider& row, const Divider& inner, index_t x_row, index_t f_row,
                                index_t& src, index_t& channel) {
  const auto q = row.divmod(i);  // (o, r): row o of out, position r in it
  if (q.mod < x_row) {
    src = q.div * x_row + q.mod;
    return true;
  }
  const index_t j = q.mod - x_row;
  channel = inner.div(j);
  src = q.div * f_row + j;
  return false;
}

// The next value of f along a row of f: position pos + 1 of channel c, or position 0 of channel
// c + 1 past the plane's end (the CUDA forward's packs cross planes of odd sizes this way).
template <typename index_t>
TSC_HD void scale_concat_next_position(index_t& c, index_t& pos, index_t inner) {
  if (++pos == inner) {
    pos = 0;
    ++c;
  }
}

// Index of f's element (o, c, s) in the gradient of out (grad has Cx + k channels).
TSC_HD int64_t scale_concat_grad_index(int64_t o, int64_t c, int64_t sp, const ScaleConcatShape& s) {
  return (o * (s.cx + s.k) + s.cx + c) * s.inner + sp;
}

}  // namespace tsc
