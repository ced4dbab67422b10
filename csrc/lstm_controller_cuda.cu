// CUDA kernels of the batched TSC_LSTM controller (docs/tsc.md, docs/ops.md), registered for the
// CUDA dispatch key. The per-element arithmetic is lstm_controller_math.h, the same functions the
// CPU kernels run, so the CPU tests cover it.
//
// lstm_controller: one thread block per stage (grid = number of stages), the stage's recurrence
// inside the block with __syncthreads between steps; matrix-vector products use one warp per
// output row (coalesced along the row). Backward: same grid, every gradient element owned by one
// thread (no atomics: deterministic). The per-stage metadata (pointers and sizes) travels BY VALUE,
// up to kMaxStages stages per launch, more stages taking more launches: no host-to-device copy, no
// sync, CUDA-graph capturable (cuda_meta_batch.cuh).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include <algorithm>
#include <vector>

#include "cuda_grid.cuh"
#include "cuda_meta_batch.cuh"
#include "lstm_controller_layout.h"
#include "lstm_controller_math.h"

namespace tsc {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// sum_i a[i] * b[i] by the calling warp (every lane gets the result).
template <typename T>
__device__ T warp_dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  T s = 0;
  for (int64_t i = threadIdx.x % 32; i < n; i += 32) s += a[i] * b[i];
  return warp_sum(s);
}

// A linear layer's weight and bias gradients over the L blocks, by the whole thread block (one
// thread per gradient element, no atomics): dW (O, I) = dout^T in, db (O) = sum_d dout, where
// dout is (L, O) and in is (L, I). The twin of the CPU's shared_linear_grads.
template <typename T>
__device__ void linear_grads(const T* __restrict__ dout, const T* __restrict__ in, int64_t L, int64_t O, int64_t I, T* __restrict__ dw,
                             T* __restrict__ db) {
  for (int64_t e = threadIdx.x; e < O * I; e += blockDim.x) {
    const int64_t o = e / I, i = e % I;
    T s = 0;
    for (int64_t d = 0; d < L; ++d) s += dout[d * O + o] * in[d * I + i];
    dw[e] = s;
  }
  for (int64_t o = threadIdx.x; o < O; o += blockDim.x) {
    T s = 0;
    for (int64_t d = 0; d < L; ++d) s += dout[d * O + o];
    db[o] = s;
  }
}

// One stage's pointers and sizes. Offsets (wbar, dt, saved, workspace) index the packed buffers.
template <typename T>
struct StageMeta {
  const T* p[kParamsPerStage];  // fc_in.weight, fc_in.bias, weight_ih, weight_hh, bias_ih, bias_hh, fc_out.weight, fc_out.bias
  T* g[kParamsPerStage];        // their gradients (backward only)
  int64_t L, D, H, C, wbar_off, dt_off, saved_off, ws_off;
};

constexpr int kMaxStages = 16;  // 16 * 192 B + 24 B < 4 KiB of kernel parameters
template <typename T>
using StageBatch = MetaBatch<StageMeta<T>, kMaxStages>;
static_assert(sizeof(StageBatch<double>) + 64 <= 4096, "kernel parameters must stay under 4 KiB");

// Calls launch(batch) for every slice of at most kMaxStages stages (one thread block per stage).
template <typename T, typename F>
void for_each_stage_batch(const std::vector<StageMeta<T>>& meta, F&& launch) {
  for (size_t s0 = 0; s0 < meta.size(); s0 += kMaxStages) {
    StageBatch<T> b{};
    b.n = static_cast<int64_t>(std::min<size_t>(kMaxStages, meta.size() - s0));
    for (int64_t k = 0; k < b.n; ++k) b.m[k] = meta[s0 + k];
    launch(b);
  }
}

// Backward workspace per stage: gz (L, C), dh (L, H), dpre (L, 4H), dx (L, H), dnext (H), dc (H).
int64_t workspace_numel(const StageDims& s) {
  return s.L * s.C + 6 * s.L * s.H + 2 * s.H;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_controller_kernel(const __grid_constant__ StageBatch<T> batch, const T* __restrict__ wbar_all,
                                                                    T* __restrict__ dt_all, T* __restrict__ saved_all) {
  const StageMeta<T>& m = batch.m[blockIdx.x];
  const int64_t L = m.L, D = m.D, H = m.H, C = m.C;
  const T *win = m.p[kFcInW], *bin = m.p[kFcInB], *wih = m.p[kWih], *whh = m.p[kWhh];
  const T *bih = m.p[kBih], *bhh = m.p[kBhh], *wout = m.p[kFcOutW], *bout = m.p[kFcOutB];
  const T* wbar = wbar_all + m.wbar_off;
  T* dt = dt_all + m.dt_off;
  T* x = saved_all + m.saved_off;
  T* gates = x + L * H;
  T* c = gates + 4 * L * H;
  T* h = c + L * H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // x = relu(fc_in(w̄)) for every block at once.
  for (int64_t r = warp; r < L * H; r += kWarps) {
    const int64_t d = r / H, j = r % H;
    const T s = warp_dot(win + j * D, wbar + d * D, D);
    if (lane == 0) x[r] = relu_forward(s + bin[j]);
  }
  __syncthreads();
  for (int64_t d = 0; d < L; ++d) {
    T* gd = gates + d * 4 * H;
    for (int64_t k = warp; k < 4 * H; k += kWarps) {
      T s = warp_dot(wih + k * H, x + d * H, H);
      if (d > 0) s += warp_dot(whh + k * H, h + (d - 1) * H, H);
      if (lane == 0) gd[k] = s + bih[k] + bhh[k];
    }
    __syncthreads();
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const T c_prev = d > 0 ? c[(d - 1) * H + j] : T(0);
      lstm_cell_forward(gd[j], gd[H + j], gd[2 * H + j], gd[3 * H + j], c_prev, c[d * H + j], h[d * H + j]);
    }
    __syncthreads();
  }
  for (int64_t r = warp; r < L * C; r += kWarps) {
    const int64_t d = r / C, o = r % C;
    const T s = warp_dot(wout + o * H, h + d * H, H);
    if (lane == 0) dt[r] = sigmoid(s + bout[o]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_controller_backward_kernel(
    const __grid_constant__ StageBatch<T> batch, const T* __restrict__ grad_all, const T* __restrict__ dt_all,
    const T* __restrict__ wbar_all, const T* __restrict__ saved_all, T* __restrict__ dwbar_all, T* __restrict__ ws_all) {
  const StageMeta<T>& m = batch.m[blockIdx.x];
  const int64_t L = m.L, D = m.D, H = m.H, C = m.C;
  const T *win = m.p[kFcInW], *wih = m.p[kWih], *whh = m.p[kWhh], *wout = m.p[kFcOutW];
  const T* wbar = wbar_all + m.wbar_off;
  const T* gdt = grad_all + m.dt_off;
  const T* dt = dt_all + m.dt_off;
  const T* x = saved_all + m.saved_off;
  const T* gates = x + L * H;
  const T* c = gates + 4 * L * H;
  const T* h = c + L * H;
  T* dwbar = dwbar_all + m.wbar_off;
  T* gz = ws_all + m.ws_off;
  T* dh = gz + L * C;
  T* dpre = dh + L * H;
  T* dx = dpre + 4 * L * H;
  T* dnext = dx + L * H;
  T* dc = dnext + H;
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  for (int64_t e = tid; e < L * C; e += nt) gz[e] = sigmoid_backward(gdt[e], dt[e]);
  for (int64_t j = tid; j < H; j += nt) dnext[j] = dc[j] = T(0);
  __syncthreads();
  // fc_out: dWout = gz^T h, dbout = sum_d gz, dh = gz Wout (thread per output element, rows of Wout read coalesced).
  linear_grads(gz, h, L, C, H, m.g[kFcOutW], m.g[kFcOutB]);
  for (int64_t e = tid; e < L * H; e += nt) {
    const int64_t d = e / H, j = e % H;
    T s = 0;
    for (int64_t o = 0; o < C; ++o) s += gz[d * C + o] * wout[o * H + j];
    dh[e] = s;
  }
  __syncthreads();
  // BPTT: dnext carries dL/dh_{d-1} through W_hh, dc carries dL/dc_{d-1}.
  for (int64_t d = L - 1; d >= 0; --d) {
    const T* gd = gates + d * 4 * H;
    T* dp = dpre + d * 4 * H;
    for (int64_t j = tid; j < H; j += nt) {
      const T c_prev = d > 0 ? c[(d - 1) * H + j] : T(0);
      dc[j] = lstm_cell_backward(dh[d * H + j] + dnext[j], dc[j], gd[j], gd[H + j], gd[2 * H + j], gd[3 * H + j],
                                 c[d * H + j], c_prev, dp[j], dp[H + j], dp[2 * H + j], dp[3 * H + j]);
    }
    __syncthreads();
    for (int64_t j = tid; j < H; j += nt) {
      T sh = 0, sx = 0;
      for (int64_t k = 0; k < 4 * H; ++k) {
        sh += dp[k] * whh[k * H + j];
        sx += dp[k] * wih[k * H + j];
      }
      dnext[j] = sh;
      dx[d * H + j] = relu_backward(sx, x[d * H + j]);
    }
    __syncthreads();
  }
  // LSTM weights: dWih = dpre^T x, dWhh = dpre[1:]^T h[:-1], both biases = sum_d dpre.
  for (int64_t e = tid; e < 4 * H * H; e += nt) {
    const int64_t k = e / H, j = e % H;
    T si = 0, sh = 0;
    for (int64_t d = 0; d < L; ++d) {
      si += dpre[d * 4 * H + k] * x[d * H + j];
      if (d > 0) sh += dpre[d * 4 * H + k] * h[(d - 1) * H + j];
    }
    m.g[kWih][e] = si;
    m.g[kWhh][e] = sh;
  }
  for (int64_t k = tid; k < 4 * H; k += nt) {
    T s = 0;
    for (int64_t d = 0; d < L; ++d) s += dpre[d * 4 * H + k];
    m.g[kBih][k] = s;
    m.g[kBhh][k] = s;
  }
  // fc_in: dWin = dx^T w̄, dbin = sum_d dx, dw̄ = dx Win.
  linear_grads(dx, wbar, L, H, D, m.g[kFcInW], m.g[kFcInB]);
  for (int64_t e = tid; e < L * D; e += nt) {
    const int64_t d = e / D, i = e % D;
    T s = 0;
    for (int64_t j = 0; j < H; ++j) s += dx[d * H + j] * win[j * D + i];
    dwbar[e] = s;
  }
}

template <typename T>
std::vector<StageMeta<T>> stage_meta(const ControllerDims& dims, const std::vector<at::Tensor>& params, std::vector<at::Tensor>* grads, int64_t& ws_total) {
  std::vector<StageMeta<T>> meta;
  ws_total = 0;
  for (size_t s = 0; s < dims.stages.size(); ++s) {
    const StageDims& st = dims.stages[s];
    StageMeta<T> m{};
    for (int64_t k = 0; k < kParamsPerStage; ++k) {
      m.p[k] = params[kParamsPerStage * s + k].const_data_ptr<T>();
      m.g[k] = grads ? (*grads)[kParamsPerStage * s + k].mutable_data_ptr<T>() : nullptr;
    }
    m.L = st.L; m.D = st.D; m.H = st.H; m.C = st.C;
    m.wbar_off = st.wbar_off; m.dt_off = st.dt_off; m.saved_off = st.saved_off; m.ws_off = ws_total;
    ws_total += workspace_numel(st);
    meta.push_back(m);
  }
  return meta;
}

std::tuple<at::Tensor, at::Tensor> lstm_controller_cuda(const at::Tensor& wbar_in, at::IntArrayRef blocks, at::TensorList params_in) {
  const ControllerDims dims = controller_dims("tsc::lstm_controller", wbar_in, blocks, params_in);
  const c10::cuda::CUDAGuard guard(wbar_in.device());
  const at::Tensor wbar = wbar_in.contiguous();
  const std::vector<at::Tensor> params = contiguous_all(params_in);
  at::Tensor dt = at::empty({dims.dt_numel}, wbar.options());
  at::Tensor saved = at::empty({dims.saved_numel}, wbar.options());
  if (dims.stages.empty()) return {dt, saved};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(wbar.scalar_type(), "tsc_lstm_controller_cuda", [&] {
    int64_t ws_total = 0;
    for_each_stage_batch(stage_meta<scalar_t>(dims, params, nullptr, ws_total), [&](const StageBatch<scalar_t>& b) {
      lstm_controller_kernel<scalar_t><<<static_cast<int>(b.n), kThreads, 0, stream>>>(
          b, wbar.const_data_ptr<scalar_t>(), dt.mutable_data_ptr<scalar_t>(), saved.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dt, saved};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> lstm_controller_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& dt_in, const at::Tensor& wbar_in, at::IntArrayRef blocks,
    at::TensorList params_in, const at::Tensor& saved_in) {
  const ControllerDims dims =
      controller_backward_dims("tsc::lstm_controller_backward", grad_in, dt_in, wbar_in, blocks, params_in, saved_in);
  const c10::cuda::CUDAGuard guard(wbar_in.device());
  const at::Tensor wbar = wbar_in.contiguous(), grad = grad_in.contiguous(), dt = dt_in.contiguous(), saved = saved_in.contiguous();
  const std::vector<at::Tensor> params = contiguous_all(params_in);
  at::Tensor dwbar = at::empty({dims.wbar_numel}, wbar.options());
  std::vector<at::Tensor> grads;
  for (const auto& p : params) grads.push_back(at::empty_like(p));
  if (dims.stages.empty()) return {dwbar, grads};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(wbar.scalar_type(), "tsc_lstm_controller_backward_cuda", [&] {
    int64_t ws_total = 0;
    const std::vector<StageMeta<scalar_t>> meta = stage_meta<scalar_t>(dims, params, &grads, ws_total);
    at::Tensor ws = at::empty({ws_total}, wbar.options());  // caching allocator: capture-safe
    for_each_stage_batch(meta, [&](const StageBatch<scalar_t>& b) {
      lstm_controller_backward_kernel<scalar_t><<<static_cast<int>(b.n), kThreads, 0, stream>>>(
          b, grad.const_data_ptr<scalar_t>(), dt.const_data_ptr<scalar_t>(), wbar.const_data_ptr<scalar_t>(),
          saved.const_data_ptr<scalar_t>(), dwbar.mutable_data_ptr<scalar_t>(), ws.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dwbar, grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, CUDA, m) {
  m.impl("lstm_controller", &lstm_controller_cuda);
  m.impl("lstm_controller_backward", &lstm_controller_backward_cuda);
}

}  // namespace tsc
