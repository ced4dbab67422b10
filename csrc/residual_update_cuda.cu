// CUDA kernels of the fused residual update (docs/ops.md), registered for the CUDA dispatch key.
// The arithmetic is tsc::residual_forward / relu_forward / relu_backward from residual_update_math.h,
// the same functions the CPU kernels run, so the CPU tests cover it.
//
// Forward: one grid-stride pass (reads y, f; writes out) in 16-byte packs with 32-bit index math
// where possible (cuda_elementwise.cuh).
// Backward: one per-channel reduction grid planned by launch_geometry.h's plan_channel_reduction
// (the grid tsc::cuda_launch_plan reports, residual_update_plan.cpp): about 1024 blocks of chunks
// of a channel's values, samples and positions flattened (channel-first: 256 threads along the
// values, all busy on a 7x7 map; channels-last: 32 lanes on adjacent channels x 8 rows, fewer lanes x more rows for a
// narrow row; planes under 128 bytes (3x3, bf16 7x7): a block on the contiguous run of a group of adjacent channels
// of each sample); bf16 / half lanes move pairs (4-byte loads: 128-byte warp requests). Each block writes dy / df and a
// partial sum of ddt[c]; with more than one chunk fold_chunks_kernel adds the chunks, a warp per channel in a fixed
// order: deterministic, shape-only split.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include "cuda_elementwise.cuh"
#include "cuda_grid.cuh"
#include "residual_update_layout.h"
#include "residual_update_math.h"

namespace tsc {
namespace {

constexpr int kThreads = 256;

template <int W, typename index_t, typename scalar_t, typename acc_t>
__global__ void residual_forward_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ f,
                                        const acc_t* __restrict__ dt, scalar_t* __restrict__ out, index_t numel,
                                        ChannelIndex<index_t> ci, bool relu) {
  for_each_pack<W>(numel, [&]<int P>(index_t i) {
    const Pack<scalar_t, P> yv = load_pack<P>(y + i), fv = load_pack<P>(f + i);
    Pack<scalar_t, P> o;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const acc_t r = residual_forward(static_cast<acc_t>(yv.v[j]), static_cast<acc_t>(fv.v[j]), dt[ci.channel(i + j)]);
      o.v[j] = static_cast<scalar_t>(relu ? relu_forward(r) : r);
    }
    store_pack<P>(out + i, o);
  });
}

// grid (tiles, chunks), block (lanes, value lanes) of plan_channel_reduction: block (tile, j) walks
// chunk j of its channel(s)' items (walk_reduction_items: pairs of bf16 / half values, 4-byte
// loads), writes dy (with the ReLU) and df, and partial[j * C + c] (ddt itself with one chunk).
// Channel groups (short planes): block (tile, j) walks the run of the tile's adjacent channels of samples
// in chunk j (walk_group_items), a column per value in dynamic shared memory, then a thread per channel.
// W: channel slots per thread and widest item; Vec: items loaded as W-element vectors.
template <int W, bool Vec, typename scalar_t, typename acc_t>
__global__ void residual_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ f,
                                         const scalar_t* __restrict__ relu_out, const acc_t* __restrict__ dt,
                                         scalar_t* __restrict__ dy, scalar_t* __restrict__ df,
                                         acc_t* __restrict__ partial, ChannelReduction r) {
  __shared__ Slots<acc_t, W> shared[kThreads];
  const int64_t C = r.channels, inner = r.inner;
  const int64_t c = reduction_channel(r, blockIdx.x, threadIdx.x);
  const bool slots = r.rows || r.group;  // a slot per value of an item (else every value is of channel c)
  Slots<acc_t, W> sum{};
  acc_t d[W];
  auto body = [&]<int P>(int64_t o, int64_t s) {
    const int64_t i = (o * C + c) * inner + s;
    const Pack<scalar_t, P> gv = load_items<P, Vec>(g + i), fv = load_items<P, Vec>(f + i);
    Pack<scalar_t, P> ov, dyv, dfv;
    if (relu_out) ov = load_items<P, Vec>(relu_out + i);
#pragma unroll
    for (int j = 0; j < P; ++j) {
      acc_t gi = static_cast<acc_t>(gv.v[j]);
      if (relu_out) {
        gi = relu_backward(gi, static_cast<acc_t>(ov.v[j]));
        dyv.v[j] = static_cast<scalar_t>(gi);
      }
      const acc_t term = gi * static_cast<acc_t>(fv.v[j]);
      if (slots) {  // constant indices in both branches: the slots stay in registers (no local memory)
        dfv.v[j] = static_cast<scalar_t>(gi * d[j]);
        sum.v[j] += term;
      } else {
        dfv.v[j] = static_cast<scalar_t>(gi * d[0]);
        sum.v[0] += term;
      }
    }
    if (relu_out) store_items<P, Vec>(dy + i, dyv);
    store_items<P, Vec>(df + i, dfv);
  };
  if (r.group) {  // channel groups: each item's values summed over the chunk's samples into its columns
    acc_t* cols = group_columns<acc_t>();
    walk_group_items(r, blockIdx.x, blockIdx.y, threadIdx.x, [&](int64_t s, int64_t n, int64_t o0, int64_t o1) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        d[j] = dt[c + (s + (j < n ? j : 0)) / inner];  // the channel of the item's value j
        sum.v[j] = acc_t(0);
      }
      for (int64_t o = o0; o < o1; ++o) reduction_item<W>(o, s, n, body);
#pragma unroll
      for (int j = 0; j < W; ++j)
        if (j < n) cols[s + j] = sum.v[j];
    });
    fold_group_columns(
        r, cols, [](acc_t& a, const acc_t& b) { a += b; },
        [&](int64_t ch, const acc_t& total) { partial[blockIdx.y * C + ch] = total; });
    return;
  }
  if (c < C) {
#pragma unroll
    for (int j = 0; j < W; ++j) d[j] = dt[r.rows && c + j < C ? c + j : c];
    walk_reduction_items(r, c, blockIdx.y, threadIdx.y,
                         [&](int64_t o, int64_t s, int64_t n) { reduction_item<W>(o, s, n, body); });
  }
  shared[threadIdx.y * blockDim.x + threadIdx.x] = sum;
  tree_reduce(shared, [](Slots<acc_t, W>& a, const Slots<acc_t, W>& b) {
#pragma unroll
    for (int j = 0; j < W; ++j) a.v[j] += b.v[j];
  });
  if (threadIdx.y == 0 && c < C) {
    const Slots<acc_t, W> total = shared[threadIdx.x];
#pragma unroll
    for (int j = 0; j < W; ++j)
      if (j == 0 || (r.rows && j < r.pack)) partial[blockIdx.y * C + c + j] = total.v[j];
  }
}

int grid_for(int64_t numel) { return elementwise_grid(numel, kThreads); }

at::Tensor residual_update_cuda(const at::Tensor& y_in, const at::Tensor& f_in, const at::Tensor& dt_in, bool relu) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  ForwardArgs a = prepare_forward(y_in, f_in, dt_in);
  const at::Tensor &y = a.y, &f = a.f, &dt = a.dt;
  const at::Tensor& out = a.out;
  const ChannelView v = a.view;
  if (y.numel() == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "tsc_residual_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *yp = y.const_data_ptr<scalar_t>(), *fp = f.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    dispatch_elementwise<scalar_t>(y.numel(), {yp, fp, op}, [&]<int W, typename index_t>() {
      residual_forward_kernel<W, index_t, scalar_t, acc_t><<<grid_for(y.numel() / W + 1), kThreads, 0, stream>>>(
          yp, fp, dt.const_data_ptr<acc_t>(), op, static_cast<index_t>(y.numel()),
          ChannelIndex<index_t>(v.inner, v.channels, v.inner * v.channels), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_update_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& f_in, const at::Tensor& dt_in,
    const std::optional<at::Tensor>& relu_out) {
  const c10::cuda::CUDAGuard guard(f_in.device());
  BackwardArgs a = prepare_backward(grad_in, f_in, dt_in, relu_out);
  const at::Tensor &f = a.f, &g = a.g, &dt = a.dt, &out = a.relu_out;
  const at::Tensor &dy = a.dy, &df = a.df, &ddt = a.ddt;
  const ChannelView v = a.view;
  const bool relu = a.relu;
  if (f.numel() == 0) return {dy, df, ddt};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "tsc_residual_update_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* outp = relu ? out.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dyp = relu ? dy.mutable_data_ptr<scalar_t>() : nullptr;
    const ChannelReduction plan = plan_channel_reduction(v, f.element_size(), true);
    const unsigned cols = static_cast<unsigned>(group_shared_bytes(plan, sizeof(acc_t)));
    at::Tensor partial = plan.chunks == 1 ? ddt : at::empty({plan.chunks, v.channels}, dt.options());
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *fp = f.const_data_ptr<scalar_t>();
    scalar_t* dfp = df.mutable_data_ptr<scalar_t>();
    dispatch_reduction<scalar_t>(plan, {gp, fp, outp, dyp, dfp}, true, [&]<int W, bool Vec>() {
      residual_backward_kernel<W, Vec, scalar_t, acc_t><<<reduction_grid(plan), reduction_block(plan), cols, stream>>>(
          gp, fp, outp, dt.const_data_ptr<acc_t>(), dyp, dfp, partial.mutable_data_ptr<acc_t>(), plan);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (plan.chunks > 1) {
      fold_chunks_kernel<acc_t><<<static_cast<unsigned>(fold_blocks(v.channels)), kThreads, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), ddt.mutable_data_ptr<acc_t>(), plan.chunks, v.channels);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dy, df, ddt};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, CUDA, m) {
  m.impl("residual_update", &residual_update_cuda);
  m.impl("residual_update_backward", &residual_update_backward_cuda);
}

}  // namespace tsc
