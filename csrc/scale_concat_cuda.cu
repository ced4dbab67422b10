// CUDA kernels of scale_concat `out = cat([x, f * dt[c]], dim=1)` (docs/ops.md, scale_concat),
// registered for the CUDA dispatch key. Indexing and arithmetic come from scale_concat_math.h,
// the functions the CPU kernels run, so the CPU tests cover them.
//
// Forward: one grid-stride pass over out (each element copied from x or scaled from f).
// Backward (df, ddt): per-chunk partial sums of ddt over the grid of launch_geometry.h's
// plan_channel_reduction (about 1024 blocks; channel-first: 256 threads along a channel's values,
// samples and positions flattened; channels-last: 32 adjacent channels x 8 rows, coalesced), then
// fold_chunks_kernel adds the chunks, a warp per channel in a fixed order (deterministic).
// scale_concat_plan.cpp reports the same grids (tsc::cuda_launch_plan).
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include "scale_concat_layout.h"
#include "scale_concat_math.h"
#include "cuda_elementwise.cuh"
#include "cuda_grid.cuh"

namespace tsc {
namespace {

constexpr int kThreads = 256;

// index_t: uint32_t below 2^31 elements (magic-number divisions), else int64_t (dispatch_index).
template <typename index_t, typename scalar_t, typename acc_t>
__global__ void scale_concat_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ f,
                                            const acc_t* __restrict__ dt, scalar_t* __restrict__ out, index_t numel,
                                            at::cuda::detail::IntDivider<index_t> row, at::cuda::detail::IntDivider<index_t> inner,
                                            index_t x_row, index_t f_row) {
  for_each_pack<1>(numel, [&]<int P>(index_t i) {
    index_t src = 0, c = 0;
    if (scale_concat_source(i, row, inner, x_row, f_row, src, c))
      out[i] = x[src];
    else
      out[i] = static_cast<scalar_t>(scale_concat_forward(static_cast<acc_t>(f[src]), dt[c]));
  });
}

// grid (tiles, chunks), block (lanes, value lanes) of plan_channel_reduction over f's (outer, k, inner)
// view: block (tile, j) walks chunk j of its channel(s)' values (m = o * inner + position), writes df
// and partial[j * k + c] (partial is ddt itself when there is one chunk).
template <typename scalar_t, typename acc_t>
__global__ void scale_concat_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ f,
                                             const acc_t* __restrict__ dt, scalar_t* __restrict__ df,
                                             acc_t* __restrict__ partial, ScaleConcatShape s, int64_t chunk) {
  __shared__ acc_t shared[kThreads];
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t M = s.outer * s.inner, m0 = blockIdx.y * chunk, m1 = min(M, m0 + chunk);
  acc_t sum = 0;
  if (c < s.k) {
    const acc_t d = dt[c];
    for_channel_values(m0 + threadIdx.y, m1, blockDim.y, s.inner, [&](int64_t o, int64_t sp) {
      const acc_t gi = static_cast<acc_t>(g[scale_concat_grad_index(o, c, sp, s)]);
      const int64_t i = (o * s.k + c) * s.inner + sp;
      df[i] = static_cast<scalar_t>(scale_concat_df(gi, d));
      sum += scale_concat_ddt_term(gi, static_cast<acc_t>(f[i]));
    });
  }
  shared[threadIdx.y * blockDim.x + threadIdx.x] = sum;
  tree_reduce(shared, [](acc_t& a, const acc_t& b) { a += b; });
  if (threadIdx.y == 0 && c < s.k) partial[blockIdx.y * s.k + c] = shared[threadIdx.x];
}

at::Tensor scale_concat_cuda(const at::Tensor& x_in, const at::Tensor& f_in, const at::Tensor& dt_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  ScaleConcatForward a = prepare_scale_concat_forward(x_in, f_in, dt_in);
  if (a.out.numel() == 0) return a.out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "tsc_scale_concat_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ScaleConcatShape& sh = a.shape;
    const int64_t numel = a.out.numel();
    dispatch_index(numel, [&]<typename index_t>() {
      using Div = at::cuda::detail::IntDivider<index_t>;
      scale_concat_forward_kernel<index_t, scalar_t, acc_t><<<elementwise_grid(numel, kThreads), kThreads, 0, stream>>>(
          a.x.const_data_ptr<scalar_t>(), a.f.const_data_ptr<scalar_t>(), a.dt.const_data_ptr<acc_t>(), a.out.mutable_data_ptr<scalar_t>(),
          static_cast<index_t>(numel), Div(static_cast<index_t>((sh.cx + sh.k) * sh.inner)), Div(static_cast<index_t>(sh.inner)),
          static_cast<index_t>(sh.cx * sh.inner), static_cast<index_t>(sh.k * sh.inner));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return a.out;
}

std::tuple<at::Tensor, at::Tensor> scale_concat_backward_cuda(const at::Tensor& grad_in, const at::Tensor& f_in, const at::Tensor& dt_in) {
  const c10::cuda::CUDAGuard guard(f_in.device());
  ScaleConcatBackward a = prepare_scale_concat_backward(grad_in, f_in, dt_in);
  const ScaleConcatShape s = a.shape;
  if (a.f.numel() == 0) return {a.df, a.ddt};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const ChannelReduction plan = plan_channel_reduction(scale_concat_f_view(s));
  at::Tensor partial = plan.chunks == 1 ? a.ddt : at::empty({plan.chunks, s.k}, a.dt.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.f.scalar_type(), "tsc_scale_concat_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    scale_concat_backward_kernel<scalar_t, acc_t><<<reduction_grid(plan), reduction_block(plan), 0, stream>>>(
        a.g.const_data_ptr<scalar_t>(), a.f.const_data_ptr<scalar_t>(), a.dt.const_data_ptr<acc_t>(), a.df.mutable_data_ptr<scalar_t>(), pp, s,
        plan.chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (plan.chunks > 1) {
      fold_chunks_kernel<acc_t><<<static_cast<unsigned>(fold_blocks(s.k)), kThreads, 0, stream>>>(pp, a.ddt.mutable_data_ptr<acc_t>(),
                                                                                                   plan.chunks, s.k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {a.df, a.ddt};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, CUDA, m) {
  m.impl("scale_concat", &scale_concat_cuda);
  m.impl("scale_concat_backward", &scale_concat_backward_cuda);
}

}  // namespace tsc
