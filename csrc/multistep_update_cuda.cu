// CUDA kernels of the linear multi-step update (docs/ops.md, multistep_update), CUDA dispatch key.
// The arithmetic is multistep_update_math.h's, the same functions the CPU kernels run.
//
// Forward: one grid-stride pass (reads u, u_prev, f; writes out). k, dt and keep are read on the
// device (k is a 0-d device tensor: no host sync).
// Backward: one launch with a block per (sample, 32 channels): it writes du, du_prev, df and the
// (N, C) partial sums of g'(u_prev - u) and g'f (each summed by one block in a fixed order), then a
// one-block finalize launch reduces the tables into dk, ddt and dkeep in a fixed order: deterministic.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include "cuda_elementwise.cuh"
#include "multistep_layout.h"
#include "multistep_update_math.h"

namespace tsc {
namespace {

constexpr int kThreads = 256;
constexpr int kTileC = 32, kTileS = 8;  // backward block: 32 channels x 8 positions

template <typename T>
const T* optional_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <int W, typename index_t, typename scalar_t, typename acc_t>
__global__ void multistep_forward_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ up,
                                         const scalar_t* __restrict__ f, const acc_t* __restrict__ kp,
                                         const acc_t* __restrict__ dt, const acc_t* __restrict__ keep,
                                         scalar_t* __restrict__ out, index_t numel, ChannelIndex<index_t> ci, bool relu) {
  const acc_t k = *kp;
  for_each_pack<W>(numel, [&]<int P>(index_t i) {
    const Pack<scalar_t, P> uv = load_pack<P>(u + i), pv = load_pack<P>(up + i), fv = load_pack<P>(f + i);
    Pack<scalar_t, P> o;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const acc_t scale = multistep_scale(dt, keep, ci.sample(i + j), ci.channel(i + j));
      const acc_t r = multistep_forward(static_cast<acc_t>(uv.v[j]), static_cast<acc_t>(pv.v[j]), static_cast<acc_t>(fv.v[j]), k, scale);
      o.v[j] = static_cast<scalar_t>(relu ? relu_forward(r) : r);
    }
    store_pack<P>(out + i, o);
  });
}

// grid = (N, ceil(C / 32)), block = (32, 8): channel tile x positions of one sample.
// Channel-first (sc = S, ss = 1) or channels-last (sc = 1, ss = C) offsets within the sample.
template <typename scalar_t, typename acc_t>
__global__ void multistep_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ u,
                                          const scalar_t* __restrict__ up, const scalar_t* __restrict__ f,
                                          const scalar_t* __restrict__ relu_out, const acc_t* __restrict__ kp,
                                          const acc_t* __restrict__ dt, const acc_t* __restrict__ keep,
                                          scalar_t* __restrict__ du, scalar_t* __restrict__ dup, scalar_t* __restrict__ df,
                                          acc_t* __restrict__ pk, acc_t* __restrict__ pf, int64_t C, int64_t S,
                                          int64_t sc, int64_t ss) {
  __shared__ acc_t shared_k[kTileS][kTileC];
  __shared__ acc_t shared_f[kTileS][kTileC];
  const int64_t n = blockIdx.x;
  const int64_t c = blockIdx.y * (int64_t)kTileC + threadIdx.x;
  acc_t sk = 0, sf = 0;
  if (c < C) {
    const acc_t k = *kp;
    const acc_t scale = multistep_scale(dt, keep, n, c);
    const int64_t base = n * C * S + c * sc;
    for (int64_t s = threadIdx.y; s < S; s += kTileS) {
      const int64_t i = base + s * ss;
      acc_t gi = static_cast<acc_t>(g[i]);
      if (relu_out) gi = relu_backward(gi, static_cast<acc_t>(relu_out[i]));
      const auto r = multistep_backward(gi, static_cast<acc_t>(u[i]), static_cast<acc_t>(up[i]), static_cast<acc_t>(f[i]), k, scale);
      du[i] = static_cast<scalar_t>(r.du);
      dup[i] = static_cast<scalar_t>(r.du_prev);
      df[i] = static_cast<scalar_t>(r.df);
      sk += r.dk_term;
      sf += r.gf_term;
    }
  }
  shared_k[threadIdx.y][threadIdx.x] = sk;
  shared_f[threadIdx.y][threadIdx.x] = sf;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int j = 1; j < kTileS; ++j) {
      sk += shared_k[j][threadIdx.x];
      sf += shared_f[j][threadIdx.x];
    }
    pk[n * C + c] = sk;
    pf[n * C + c] = sf;
  }
}

// One block: dk = Σ pk (strided per thread, then a fixed tree), ddt[c] and dkeep[n] one thread each.
template <typename acc_t>
__global__ void multistep_finalize_kernel(const acc_t* __restrict__ pk, const acc_t* __restrict__ pf,
                                          const acc_t* __restrict__ dt, const acc_t* __restrict__ keep,
                                          acc_t* __restrict__ dk, acc_t* __restrict__ ddt, acc_t* __restrict__ dkeep,
                                          int64_t N, int64_t C) {
  __shared__ acc_t shared[kThreads];
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < N * C; i += blockDim.x) s += pk[i];
  shared[threadIdx.x] = s;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) *dk = shared[0];
  if (ddt)
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      acc_t sum = 0;
      for (int64_t n = 0; n < N; ++n) sum += (keep ? keep[n] : acc_t(1)) * pf[n * C + c];
      ddt[c] = sum;
    }
  if (dkeep)
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
      acc_t sum = 0;
      for (int64_t c = 0; c < C; ++c) sum += (dt ? dt[c] : acc_t(1)) * pf[n * C + c];
      dkeep[n] = sum;
    }
}

at::Tensor multistep_update_cuda(const at::Tensor& u_in, const at::Tensor& u_prev_in, const at::Tensor& f_in, const at::Tensor& k_in,
                                 const std::optional<at::Tensor>& dt_in, const std::optional<at::Tensor>& keep_in, bool relu) {
  const c10::cuda::CUDAGuard guard(u_in.device());
  MultistepForwardArgs a = prepare_multistep_forward(u_in, u_prev_in, f_in, k_in, dt_in, keep_in);
  const MultistepView v = a.view;
  if (a.u.numel() == 0) return a.out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.u.scalar_type(), "tsc_multistep_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *up = a.u.const_data_ptr<scalar_t>(), *pp = a.u_prev.const_data_ptr<scalar_t>(), *fp = a.f.const_data_ptr<scalar_t>();
    scalar_t* op = a.out.mutable_data_ptr<scalar_t>();
    const int64_t numel = a.u.numel();
    dispatch_elementwise<scalar_t>(numel, {up, pp, fp, op}, [&]<int W, typename index_t>() {
      multistep_forward_kernel<W, index_t, scalar_t, acc_t><<<elementwise_grid(numel / W + 1, kThreads), kThreads, 0, stream>>>(
          up, pp, fp, a.k.const_data_ptr<acc_t>(), optional_ptr<acc_t>(a.dt), optional_ptr<acc_t>(a.keep), op,
          static_cast<index_t>(numel), ChannelIndex<index_t>(v.channels_last ? 1 : v.S, v.C, v.C * v.S), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return a.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multistep_update_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& u_in, const at::Tensor& u_prev_in, const at::Tensor& f_in, const at::Tensor& k_in,
    const std::optional<at::Tensor>& dt_in, const std::optional<at::Tensor>& keep_in, const std::optional<at::Tensor>& relu_out) {
  const c10::cuda::CUDAGuard guard(u_in.device());
  MultistepBackwardArgs a = prepare_multistep_backward(grad_in, u_in, u_prev_in, f_in, k_in, dt_in, keep_in, relu_out);
  const MultistepView v = a.view;
  TORCH_CHECK((v.C + kTileC - 1) / kTileC <= 65535, "tsc::multistep_update_backward (CUDA): at most 65535*32 channels, got ", v.C);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.u.scalar_type(), "tsc_multistep_update_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor tables = at::empty({2, v.N * v.C}, a.k.options());
    if (a.u.numel() > 0) {
      const dim3 grid(v.N, (v.C + kTileC - 1) / kTileC);
      multistep_backward_kernel<scalar_t, acc_t><<<grid, dim3(kTileC, kTileS), 0, stream>>>(
          a.g.const_data_ptr<scalar_t>(), a.u.const_data_ptr<scalar_t>(), a.u_prev.const_data_ptr<scalar_t>(),
          a.f.const_data_ptr<scalar_t>(), a.relu ? a.relu_out.const_data_ptr<scalar_t>() : nullptr, a.k.const_data_ptr<acc_t>(),
          optional_ptr<acc_t>(a.dt), optional_ptr<acc_t>(a.keep), a.du.mutable_data_ptr<scalar_t>(),
          a.du_prev.mutable_data_ptr<scalar_t>(), a.df.mutable_data_ptr<scalar_t>(), tables[0].mutable_data_ptr<acc_t>(),
          tables[1].mutable_data_ptr<acc_t>(), v.C, v.S, v.channels_last ? 1 : v.S, v.channels_last ? v.C : 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      tables.zero_();
    }
    multistep_finalize_kernel<acc_t><<<1, kThreads, 0, stream>>>(
        tables[0].const_data_ptr<acc_t>(), tables[1].const_data_ptr<acc_t>(), optional_ptr<acc_t>(a.dt), optional_ptr<acc_t>(a.keep),
        a.dk.mutable_data_ptr<acc_t>(), a.dt.defined() ? a.ddt.mutable_data_ptr<acc_t>() : nullptr,
        a.keep.defined() ? a.dkeep.mutable_data_ptr<acc_t>() : nullptr, v.N, v.C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {a.du, a.du_prev, a.df, a.dk, a.ddt, a.dkeep};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, CUDA, m) {
  m.impl("multistep_update", &multistep_update_cuda);
  m.impl("multistep_update_backward", &multistep_update_backward_cuda);
}

}  // namespace tsc
