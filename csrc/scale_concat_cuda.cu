// CUDA kernels of scale_concat `out = cat([x, f * dt[c]], dim=1)` (docs/ops.md, scale_concat),
// registered for the CUDA dispatch key. Indexing and arithmetic come from scale_concat_math.h,
// the functions the CPU kernels run, so the CPU tests cover them.
//
// Forward: one grid-stride pass over out (each element copied from x or scaled from f).
// Backward (df, ddt): per-chunk partial sums of ddt, then a small kernel adding the chunks in
// order (two launches, deterministic). Channel-first tensors: block (c, chunk) walks the planes of
// channel c in its chunk of samples. Channels-last: tiles of (32 channels x 8 rows) over chunks of
// rows, so a warp reads 32 consecutive channels of a row (coalesced).
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
constexpr int kTileC = 32, kTileRows = 8, kChunks = 64;

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

// grid = (k, chunks): block (c, chunk) owns channel c of samples [chunk * per, (chunk + 1) * per).
template <typename scalar_t, typename acc_t>
__global__ void scale_concat_backward_planes_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ f,
                                                    const acc_t* __restrict__ dt, scalar_t* __restrict__ df,
                                                    acc_t* __restrict__ partial, ScaleConcatShape s, int64_t per) {
  __shared__ acc_t shared[kThreads / 32];
  const int64_t c = blockIdx.x;
  const acc_t d = dt[c];
  acc_t sum = 0;
  const int64_t o1 = min(s.outer, (blockIdx.y + 1) * per);
  for (int64_t o = blockIdx.y * per; o < o1; ++o) {
    const int64_t gbase = scale_concat_grad_index(o, c, 0, s), fbase = (o * s.k + c) * s.inner;
    for (int64_t sp = threadIdx.x; sp < s.inner; sp += blockDim.x) {
      const acc_t gi = static_cast<acc_t>(g[gbase + sp]);
      df[fbase + sp] = static_cast<scalar_t>(scale_concat_df(gi, d));
      sum += scale_concat_ddt_term(gi, static_cast<acc_t>(f[fbase + sp]));
    }
  }
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) partial[blockIdx.y * s.k + c] = sum;
}

// grid = (ceil(k / 32), chunks), block = (32, 8): partial[chunk, c] over the chunk's rows (inner == 1).
template <typename scalar_t, typename acc_t>
__global__ void scale_concat_backward_rows_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ f,
                                                  const acc_t* __restrict__ dt, scalar_t* __restrict__ df,
                                                  acc_t* __restrict__ partial, ScaleConcatShape s, int64_t per) {
  __shared__ acc_t shared[kTileRows][kTileC];
  const int64_t c = blockIdx.x * (int64_t)kTileC + threadIdx.x;
  const int64_t r0 = blockIdx.y * per, r1 = min(s.outer, r0 + per);
  acc_t sum = 0;
  if (c < s.k) {
    const acc_t d = dt[c];
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kTileRows) {
      const acc_t gi = static_cast<acc_t>(g[scale_concat_grad_index(r, c, 0, s)]);
      df[r * s.k + c] = static_cast<scalar_t>(scale_concat_df(gi, d));
      sum += scale_concat_ddt_term(gi, static_cast<acc_t>(f[r * s.k + c]));
    }
  }
  shared[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < s.k) {
    for (int j = 1; j < kTileRows; ++j) sum += shared[j][threadIdx.x];
    partial[blockIdx.y * s.k + c] = sum;
  }
}

template <typename acc_t>
__global__ void scale_concat_sum_chunks_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ ddt, int64_t chunks, int64_t k) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= k) return;
  acc_t sum = 0;
  for (int64_t j = 0; j < chunks; ++j) sum += partial[j * k + c];
  ddt[c] = sum;
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
  // Rows (samples for planes, pixels for channels-last) per chunk: at most kChunks chunks (grid y).
  const int64_t per = std::max<int64_t>(s.inner > 1 ? 1 : kTileRows, (s.outer + kChunks - 1) / kChunks);
  const int64_t chunks = (s.outer + per - 1) / per;
  at::Tensor partial = at::empty({chunks, s.k}, a.dt.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.f.scalar_type(), "tsc_scale_concat_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = a.g.const_data_ptr<scalar_t>();
    const scalar_t* fp = a.f.const_data_ptr<scalar_t>();
    const acc_t* dtp = a.dt.const_data_ptr<acc_t>();
    scalar_t* dfp = a.df.mutable_data_ptr<scalar_t>();
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    if (s.inner > 1) {
      // grid.x = k (up to 2^31 - 1), grid.y = chunks <= kChunks
      scale_concat_backward_planes_kernel<scalar_t, acc_t><<<dim3(s.k, chunks), kThreads, 0, stream>>>(gp, fp, dtp, dfp, pp, s, per);
    } else {
      scale_concat_backward_rows_kernel<scalar_t, acc_t><<<dim3((s.k + kTileC - 1) / kTileC, chunks), dim3(kTileC, kTileRows), 0, stream>>>(
          gp, fp, dtp, dfp, pp, s, per);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scale_concat_sum_chunks_kernel<acc_t><<<(s.k + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        pp, a.ddt.mutable_data_ptr<acc_t>(), chunks, s.k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {a.df, a.ddt};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, CUDA, m) {
  m.impl("scale_concat", &scale_concat_cuda);
  m.impl("scale_concat_backward", &scale_concat_backward_cuda);
}

}  // namespace tsc
