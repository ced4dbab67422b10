// CUDA kernels of scale_concat `out = cat([x, f * dt[c]], dim=1)` (docs/ops.md, scale_concat),
// registered for the CUDA dispatch key. Indexing and arithmetic come from scale_concat_math.h,
// the functions the CPU kernels run, so the CPU tests cover them.
//
// Forward: one grid-stride pass over out (each element copied from x or scaled from f), in packs of
// scale_concat_pack elements (16 bytes, or bf16 / half pairs) that never straddle x and f.
// Backward (df, ddt): per-chunk partial sums of ddt over the grid of launch_geometry.h's
// plan_channel_reduction (about 1024 blocks; channel-first: 256 threads along a channel's values,
// samples and positions flattened; channels-last: 32 lanes on adjacent channels x 8 rows, coalesced, or fewer lanes x
// more rows for a narrow row; bf16 / half lanes move pairs: 4-byte loads), then fold_chunks_kernel adds the chunks, a
// warp per channel in a fixed order (deterministic). scale_concat_plan.cpp reports the same grids
// (tsc::cuda_launch_plan).
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
// W: scale_concat_pack (16- or 4-byte packs that never straddle x and f), 1 for a misaligned view.
// A pack's source is found once (two divisions per pack); its f values' channels advance along it.
template <int W, typename index_t, typename scalar_t, typename acc_t>
__global__ void scale_concat_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ f,
                                            const acc_t* __restrict__ dt, scalar_t* __restrict__ out, index_t numel,
                                            at::cuda::detail::IntDivider<index_t> row,
                                            at::cuda::detail::IntDivider<index_t> inner, index_t x_row, index_t f_row) {
  for_each_pack<W>(numel, [&]<int P>(index_t i) {
    index_t src = 0, c = 0;
    if (scale_concat_source(i, row, inner, x_row, f_row, src, c)) {
      store_pack<P>(out + i, load_pack<P>(x + src));
      return;
    }
    const Pack<scalar_t, P> fv = load_pack<P>(f + src);
    Pack<scalar_t, P> o;
    index_t pos = 0;
    if constexpr (P > 1) pos = inner.divmod(src).mod;  // src = o f_row + c inner + pos
#pragma unroll
    for (int j = 0; j < P; ++j) {
      o.v[j] = static_cast<scalar_t>(scale_concat_forward(static_cast<acc_t>(fv.v[j]), dt[c]));
      if constexpr (P > 1) scale_concat_next_position(c, pos, inner.divisor);
    }
    store_pack<P>(out + i, o);
  });
}

// grid (tiles, chunks), block (lanes, value lanes) of plan_channel_reduction over f's (outer, k, inner)
// view: block (tile, j) walks chunk j of its channel(s)' items (walk_reduction_items: bf16 / half
// pairs, 4-byte loads), writes df and partial[j * k + c] (partial is ddt itself when there is one
// chunk). W: channel slots per thread and widest item; Vec: items loaded as W-element vectors.
template <int W, bool Vec, typename scalar_t, typename acc_t>
__global__ void scale_concat_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ f,
                                             const acc_t* __restrict__ dt, scalar_t* __restrict__ df,
                                             acc_t* __restrict__ partial, ScaleConcatShape s, ChannelReduction r) {
  __shared__ Slots<acc_t, W> shared[kThreads];
  const int64_t c = reduction_channel(r, blockIdx.x, threadIdx.x);
  Slots<acc_t, W> sum{};
  if (c < s.k) {
    acc_t d[W];
#pragma unroll
    for (int j = 0; j < W; ++j) d[j] = dt[r.rows && c + j < s.k ? c + j : c];
    auto body = [&]<int P>(int64_t o, int64_t sp) {
      const int64_t i = (o * s.k + c) * s.inner + sp;
      const Pack<scalar_t, P> gv = load_items<P, Vec>(g + scale_concat_grad_index(o, c, sp, s)),
                              fv = load_items<P, Vec>(f + i);
      Pack<scalar_t, P> dfv;
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const acc_t gi = static_cast<acc_t>(gv.v[j]);
        const acc_t term = scale_concat_ddt_term(gi, static_cast<acc_t>(fv.v[j]));
        if (r.rows) {
          dfv.v[j] = static_cast<scalar_t>(scale_concat_df(gi, d[j]));
          sum.v[j] += term;
        } else {
          dfv.v[j] = static_cast<scalar_t>(scale_concat_df(gi, d[0]));
          sum.v[0] += term;
        }
      }
      store_items<P, Vec>(df + i, dfv);
    };
    walk_reduction_items(r, c, blockIdx.y, threadIdx.y,
                         [&](int64_t o, int64_t sp, int64_t n) { reduction_item<W>(o, sp, n, body); });
  }
  shared[threadIdx.y * blockDim.x + threadIdx.x] = sum;
  tree_reduce(shared, [](Slots<acc_t, W>& a, const Slots<acc_t, W>& b) {
#pragma unroll
    for (int j = 0; j < W; ++j) a.v[j] += b.v[j];
  });
  if (threadIdx.y == 0 && c < s.k) {
    const Slots<acc_t, W> total = shared[threadIdx.x];
#pragma unroll
    for (int j = 0; j < W; ++j)
      if (j == 0 || (r.rows && j < r.pack)) partial[blockIdx.y * s.k + c + j] = total.v[j];
  }
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
    const scalar_t *xp = a.x.const_data_ptr<scalar_t>(), *fp = a.f.const_data_ptr<scalar_t>();
    scalar_t* op = a.out.mutable_data_ptr<scalar_t>();
    int64_t pack = scale_concat_pack(sh, sizeof(scalar_t));
    for (const void* p : {static_cast<const void*>(xp), static_cast<const void*>(fp), static_cast<const void*>(op)})
      if (reinterpret_cast<std::uintptr_t>(p) % (pack * sizeof(scalar_t)) != 0) pack = 1;
    dispatch_index(numel, [&]<typename index_t>() {
      using Div = at::cuda::detail::IntDivider<index_t>;
      auto launch = [&]<int W>() {
        scale_concat_forward_kernel<W, index_t, scalar_t, acc_t>
            <<<elementwise_grid(numel / W + 1, kThreads), kThreads, 0, stream>>>(
                xp, fp, a.dt.const_data_ptr<acc_t>(), op, static_cast<index_t>(numel),
                Div(static_cast<index_t>((sh.cx + sh.k) * sh.inner)), Div(static_cast<index_t>(sh.inner)),
                static_cast<index_t>(sh.cx * sh.inner), static_cast<index_t>(sh.k * sh.inner));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      constexpr int kWide = kPack<scalar_t>, kPair = sizeof(scalar_t) == 2 ? 2 : 1;
      if (pack == kWide)
        launch.template operator()<kWide>();
      else if (pack == kPair)
        launch.template operator()<kPair>();
      else
        launch.template operator()<1>();
    });
  });
  return a.out;
}

std::tuple<at::Tensor, at::Tensor> scale_concat_backward_cuda(const at::Tensor& grad_in, const at::Tensor& f_in,
                                                              const at::Tensor& dt_in) {
  const c10::cuda::CUDAGuard guard(f_in.device());
  ScaleConcatBackward a = prepare_scale_concat_backward(grad_in, f_in, dt_in);
  const ScaleConcatShape s = a.shape;
  if (a.f.numel() == 0) return {a.df, a.ddt};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const ChannelReduction plan = plan_channel_reduction(scale_concat_f_view(s), a.f.element_size());
  at::Tensor partial = plan.chunks == 1 ? a.ddt : at::empty({plan.chunks, s.k}, a.dt.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.f.scalar_type(), "tsc_scale_concat_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    const scalar_t *gp = a.g.const_data_ptr<scalar_t>(), *fp = a.f.const_data_ptr<scalar_t>();
    scalar_t* dfp = a.df.mutable_data_ptr<scalar_t>();
    // grad's element of f's (o, c, s) sits (o + 1) cx inner further: pairs stay aligned when cx inner is even
    const bool offsets = s.cx * s.inner % plan.pack == 0;
    dispatch_reduction<scalar_t>(plan, {gp, fp, dfp}, offsets, [&]<int W, bool Vec>() {
      scale_concat_backward_kernel<W, Vec, scalar_t, acc_t><<<reduction_grid(plan), reduction_block(plan), 0, stream>>>(
          gp, fp, a.dt.const_data_ptr<acc_t>(), dfp, pp, s, plan);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (plan.chunks > 1) {
      fold_chunks_kernel<acc_t><<<static_cast<unsigned>(fold_blocks(s.k)), kThreads, 0, stream>>>(
          pp, a.ddt.mutable_data_ptr<acc_t>(), plan.chunks, s.k);
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
