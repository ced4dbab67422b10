// CUDA kernels of the fused residual update (docs/ops.md), registered for the CUDA dispatch key.
// The arithmetic is tsc::residual_forward / relu_forward / relu_backward from residual_math.h,
// the same functions the CPU kernels run, so the CPU tests cover it.
//
// Forward: one grid-stride pass (reads y, f; writes out) in 16-byte packs with 32-bit index math
// where possible (cuda_elementwise.cuh).
// Backward: one per-channel reduction grid planned by launch_geometry.h's plan_channel_reduction
// (the grid tsc::cuda_launch_plan reports, residual_update_plan.cpp): about 1024 blocks of chunks
// of a channel's values, samples and positions flattened (channel-first: 256 threads along the
// values, all busy on a 7x7 map; channels-last: 32 adjacent channels x 8 rows). Each block writes
// dy / df and a partial sum of ddt[c]; with more than one chunk fold_chunks_kernel adds the chunks,
// a warp per channel in a fixed order: deterministic, shape-only split.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include "cuda_elementwise.cuh"
#include "cuda_grid.cuh"
#include "residual_layout.h"
#include "residual_math.h"

namespace tsc {
namespace {

constexpr int kThreads = 256;

template <int W, typename index_t, typename scalar_t, typename acc_t>
__global__ void residual_forward_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ f,
                                        const acc_t* __restrict__ dt, scalar_t* __restrict__ out,
                                        index_t numel, ChannelIndex<index_t> ci, bool relu) {
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
// chunk j (values m0 <= m < m1, m = sample-or-row * inner + position) of its channel(s), writes dy
// (with the ReLU) and df, and partial[j * C + c] (partial is ddt itself when there is one chunk).
template <typename scalar_t, typename acc_t>
__global__ void residual_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ f,
                                         const scalar_t* __restrict__ relu_out, const acc_t* __restrict__ dt,
                                         scalar_t* __restrict__ dy, scalar_t* __restrict__ df, acc_t* __restrict__ partial,
                                         int64_t C, int64_t inner, int64_t M, int64_t chunk) {
  __shared__ acc_t shared[kThreads];
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t m0 = blockIdx.y * chunk, m1 = min(M, m0 + chunk);
  acc_t sum = 0;
  if (c < C) {
    const acc_t d = dt[c];
    for_channel_values(m0 + threadIdx.y, m1, blockDim.y, inner, [&](int64_t o, int64_t s) {
      const int64_t i = (o * C + c) * inner + s;
      acc_t gi = static_cast<acc_t>(g[i]);
      if (relu_out) {
        gi = relu_backward(gi, static_cast<acc_t>(relu_out[i]));
        dy[i] = static_cast<scalar_t>(gi);
      }
      df[i] = static_cast<scalar_t>(gi * d);
      sum += gi * static_cast<acc_t>(f[i]);
    });
  }
  shared[threadIdx.y * blockDim.x + threadIdx.x] = sum;
  tree_reduce(shared, [](acc_t& a, const acc_t& b) { a += b; });
  if (threadIdx.y == 0 && c < C) partial[blockIdx.y * C + c] = shared[threadIdx.x];
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
          yp, fp, dt.const_data_ptr<acc_t>(), op, static_cast<index_t>(y.numel()), ChannelIndex<index_t>(v.inner, v.channels, v.inner * v.channels), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_update_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& f_in, const at::Tensor& dt_in, const std::optional<at::Tensor>& relu_out) {
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
    const ChannelReduction plan = plan_channel_reduction(v);
    at::Tensor partial = plan.chunks == 1 ? ddt : at::empty({plan.chunks, v.channels}, dt.options());
    residual_backward_kernel<scalar_t, acc_t><<<reduction_grid(plan), reduction_block(plan), 0, stream>>>(
        g.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(), outp, dt.const_data_ptr<acc_t>(), dyp,
        df.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(), v.channels, v.inner, v.outer * v.inner, plan.chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
