// CUDA kernels of the fused residual update (docs/ops.md), registered for the CUDA dispatch key.
// The arithmetic is tsc::residual_forward / relu_forward / relu_backward from residual_math.h,
// the same functions the CPU kernels run, so the CPU tests cover it.
//
// Forward: one grid-stride pass (reads y, f; writes out) in 16-byte packs with 32-bit index math
// where possible (cuda_elementwise.cuh).
// Backward: channel-first tensors: grid (C, sample chunks): block (c, k) reads grad and f of
// channel c's planes in samples chunk k, writes df and a partial sum of ddt[c] (one block per
// channel alone would leave most of a 108-132 SM GPU idle at CIFAR widths, C = 16-64).
// Channels-last tensors: tiles of (32 channels x rows) write per-chunk partial sums. With more than
// one chunk a second small kernel adds the chunks in order: deterministic, shape-only split.
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

// grid = (C, chunks): block (c, k) owns channel c in samples [k * per, (k + 1) * per) and writes
// partial[k * C + c] (partial is ddt itself when there is one chunk).
template <typename scalar_t, typename acc_t>
__global__ void residual_backward_planes_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ f,
                                                const scalar_t* __restrict__ relu_out, const acc_t* __restrict__ dt,
                                                scalar_t* __restrict__ dy, scalar_t* __restrict__ df,
                                                acc_t* __restrict__ partial, int64_t N, int64_t C, int64_t S, int64_t per) {
  __shared__ acc_t shared[kThreads / 32];
  const int64_t c = blockIdx.x;
  const int64_t n0 = blockIdx.y * per, n1 = min(N, n0 + per);
  const acc_t d = dt[c];
  acc_t sum = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t base = (n * C + c) * S;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
      const int64_t i = base + s;
      acc_t gi = static_cast<acc_t>(g[i]);
      if (relu_out) {
        gi = relu_backward(gi, static_cast<acc_t>(relu_out[i]));
        dy[i] = static_cast<scalar_t>(gi);
      }
      df[i] = static_cast<scalar_t>(gi * d);
      sum += gi * static_cast<acc_t>(f[i]);
    }
  }
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) partial[blockIdx.y * C + c] = sum;
}

// Sample chunks of the planes backward: about kTargetBlocks blocks in all, each chunk at least
// kMinChunkElems values, at most 65535 chunks (grid.y); depends on the shape only (deterministic).
// The same rule as triton_kernels/residual_update.py planes_grid.
constexpr int64_t kTargetBlocks = 1024, kMinChunkElems = 16384, kMaxGridY = 65535;
int64_t samples_per_chunk(int64_t N, int64_t C, int64_t S) {
  const int64_t by_work = std::max<int64_t>(1, N * S / kMinChunkElems);
  const int64_t chunks = std::max<int64_t>(1, std::min({N, kMaxGridY, by_work, (kTargetBlocks + C - 1) / C}));
  return (N + chunks - 1) / chunks;
}

constexpr int kTileC = 32, kTileRows = 8, kRowChunks = 64;

// grid = (ceil(C / 32), chunks), block = (32, 8): partial[chunk, c] = sum over the chunk's rows.
template <typename scalar_t, typename acc_t>
__global__ void residual_backward_rows_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ f,
                                              const scalar_t* __restrict__ relu_out, const acc_t* __restrict__ dt,
                                              scalar_t* __restrict__ dy, scalar_t* __restrict__ df,
                                              acc_t* __restrict__ partial,
                                              int64_t R, int64_t C, int64_t rows_per_chunk) {
  __shared__ acc_t shared[kTileRows][kTileC];
  const int64_t c = blockIdx.x * (int64_t)kTileC + threadIdx.x;
  const int64_t r0 = blockIdx.y * rows_per_chunk, r1 = min(R, r0 + rows_per_chunk);
  acc_t sum = 0;
  if (c < C) {
    const acc_t d = dt[c];
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kTileRows) {
      const int64_t i = r * C + c;
      acc_t gi = static_cast<acc_t>(g[i]);
      if (relu_out) {
        gi = relu_backward(gi, static_cast<acc_t>(relu_out[i]));
        dy[i] = static_cast<scalar_t>(gi);
      }
      df[i] = static_cast<scalar_t>(gi * d);
      sum += gi * static_cast<acc_t>(f[i]);
    }
  }
  shared[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int k = 1; k < kTileRows; ++k) sum += shared[k][threadIdx.x];
    partial[blockIdx.y * C + c] = sum;
  }
}

template <typename acc_t>
__global__ void sum_chunks_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ ddt, int64_t chunks, int64_t C) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc_t sum = 0;
  for (int64_t k = 0; k < chunks; ++k) sum += partial[k * C + c];
  ddt[c] = sum;
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
    if (v.inner > 1) {
      const int64_t per = samples_per_chunk(v.outer, v.channels, v.inner);
      const int64_t chunks = (v.outer + per - 1) / per;
      at::Tensor partial = chunks == 1 ? ddt : at::empty({chunks, v.channels}, dt.options());
      residual_backward_planes_kernel<scalar_t, acc_t><<<dim3(v.channels, chunks), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(), outp, dt.const_data_ptr<acc_t>(), dyp,
          df.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(), v.outer, v.channels, v.inner, per);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (chunks > 1) {
        sum_chunks_kernel<acc_t><<<(v.channels + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
            partial.const_data_ptr<acc_t>(), ddt.mutable_data_ptr<acc_t>(), chunks, v.channels);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else {
      const int64_t rows_per_chunk = std::max<int64_t>(kTileRows, (v.outer + kRowChunks - 1) / kRowChunks);
      const int64_t chunks = (v.outer + rows_per_chunk - 1) / rows_per_chunk;
      at::Tensor partial = at::empty({chunks, v.channels}, dt.options());
      const dim3 grid((v.channels + kTileC - 1) / kTileC, chunks);
      residual_backward_rows_kernel<scalar_t, acc_t><<<grid, dim3(kTileC, kTileRows), 0, stream>>>(
          g.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(), outp, dt.const_data_ptr<acc_t>(), dyp,
          df.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(), v.outer, v.channels, rows_per_chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_chunks_kernel<acc_t><<<(v.channels + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), ddt.mutable_data_ptr<acc_t>(), chunks, v.channels);
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
