// CUDA kernels of the batched TSC_LSTM controller (docs/tsc.md, docs/ops.md), registered for the
// CUDA dispatch key. The launches come from lstm_controller_plan.h (the launch planner runs the same
// functions): batched products over every block of every stage (lstm_controller_products_kernel)
// around the recurrent cell, one thread block per stage (lstm_controller_recurrent_kernel, BPTT
// lstm_controller_bptt_kernel), the only launches whose chain is the number of blocks.
// Per-element arithmetic is lstm_controller_math.h, the functions the CPU kernels run. Job and stage
// records travel BY VALUE (cuda_meta_batch.cuh): no host-to-device copy, no sync, CUDA-graph
// capturable. Every output element is written by one thread in a fixed order: deterministic.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include <algorithm>
#include <vector>

#include "cuda_grid.cuh"
#include "cuda_meta_batch.cuh"
#include "lstm_controller_layout.h"
#include "lstm_controller_math.h"
#include "lstm_controller_plan.h"

namespace tsc {
namespace {

using namespace lstm_plan;
constexpr int kBlock = static_cast<int>(kThreads);

// sum_i a[i] * b[i] by the calling warp (every lane gets the result).
template <typename T>
__device__ T warp_dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  T s = 0;
  for (int64_t i = threadIdx.x % 32; i < n; i += 32) s += a[i] * b[i];
  return warp_sum(s);
}

template <typename T>
using JobBatch = MetaBatch<JobPtrs<T>, kMaxJobs>;
static_assert(sizeof(JobBatch<double>) + 64 <= 4096, "kernel parameters must stay under 4 KiB");

// The products that do not depend on the recurrence, every stage's at once: blocks [block0,
// next block0) of the grid work on job k (lstm_controller_plan.h: Job, Form).
template <typename T>
__global__ void __launch_bounds__(kBlock) lstm_controller_products_kernel(const __grid_constant__ JobBatch<T> batch) {
  int64_t k = 0;
  while (k + 1 < batch.n && static_cast<int64_t>(blockIdx.x) >= batch.m[k + 1].block0) ++k;
  const JobPtrs<T>& j = batch.m[k];
  const int64_t local = blockIdx.x - j.block0, n = j.rows * j.cols;
  if (j.form == kDot) {  // a warp per output, lanes along k (both operands contiguous in k)
    const int64_t e = local * kWarps + threadIdx.x / 32;
    if (e >= n) return;  // warp-uniform
    const int64_t r = e / j.cols, c = e % j.cols;
    T s = 0;
    for (int64_t i = threadIdx.x % 32; i < j.K; i += 32) s += a_at(j, r, i) * b_at(j, i, c);
    s = warp_sum(s);
    if (threadIdx.x % 32 == 0) store_output(j, r, c, s);
  } else {  // a thread per output, lanes along c (b contiguous in c), k in order
    const int64_t e = local * blockDim.x + threadIdx.x;
    if (e >= n) return;
    const int64_t r = e / j.cols, c = e % j.cols;
    store_output(j, r, c, ordered_sum(j, r, c));
  }
}

// A stage of the recurrent launches.
template <typename T>
struct CellMeta {
  const T* whh;
  int64_t L, H, saved_off;
  WsLayout ws;  // the stage's backward workspace (lstm_controller_plan.h)
};

template <typename T>
using CellBatch = MetaBatch<CellMeta<T>, kMaxStages>;

// The recurrence of one stage per block: the gates' input half is in `saved` already (products
// launch), this adds h_{d-1} W_hh^T (a warp per gate row, W_hh rows read coalesced) and runs the
// cell; the activated gates overwrite the pre-activations.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    lstm_controller_recurrent_kernel(const __grid_constant__ CellBatch<T> batch, T* __restrict__ saved_all) {
  const CellMeta<T>& m = batch.m[blockIdx.x];
  const int64_t L = m.L, H = m.H;
  T* gates = saved_all + m.saved_off + L * H;
  T* c = gates + 4 * L * H;
  T* h = c + L * H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t d = 0; d < L; ++d) {
    T* gd = gates + d * 4 * H;
    if (d > 0) {
      for (int64_t k = warp; k < 4 * H; k += kWarps) {
        const T s = warp_dot(m.whh + k * H, h + (d - 1) * H, H);
        if (lane == 0) gd[k] += s;
      }
      __syncthreads();
    }
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const T c_prev = d > 0 ? c[(d - 1) * H + j] : T(0);
      lstm_cell_forward(gd[j], gd[H + j], gd[2 * H + j], gd[3 * H + j], c_prev, c[d * H + j], h[d * H + j]);
    }
    __syncthreads();
  }
}

// BPTT of one stage per block: dh (from fc_out, products launch) plus dnext = W_hh^T dpre_{d+1}
// through the cell; writes dpre (L, 4H) for the products after it. A thread owns hidden unit j in
// both loops (dnext[j], dc[j]), W_hh read along its rows by adjacent threads.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    lstm_controller_bptt_kernel(const __grid_constant__ CellBatch<T> batch, const T* __restrict__ saved_all,
                                T* __restrict__ ws_all) {
  const CellMeta<T>& m = batch.m[blockIdx.x];
  const int64_t L = m.L, H = m.H;
  const T* gates = saved_all + m.saved_off + L * H;
  const T* c = gates + 4 * L * H;
  const T* dh = ws_all + m.ws.dh;
  T* dpre = ws_all + m.ws.dpre;
  T* dnext = ws_all + m.ws.dnext;
  T* dc = ws_all + m.ws.dc;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) dnext[j] = dc[j] = T(0);
  for (int64_t d = L - 1; d >= 0; --d) {
    const T* gd = gates + d * 4 * H;
    T* dp = dpre + d * 4 * H;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const T c_prev = d > 0 ? c[(d - 1) * H + j] : T(0);
      dc[j] = lstm_cell_backward(dh[d * H + j] + dnext[j], dc[j], gd[j], gd[H + j], gd[2 * H + j], gd[3 * H + j],
                                 c[d * H + j], c_prev, dp[j], dp[H + j], dp[2 * H + j], dp[3 * H + j]);
    }
    __syncthreads();
    if (d == 0) break;  // nothing flows to h_{-1}
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      T s = 0;
      for (int64_t k = 0; k < 4 * H; ++k) s += dp[k] * m.whh[k * H + j];
      dnext[j] = s;
    }
    __syncthreads();
  }
}

template <typename T>
void launch_products(const Step& st, const Buffers<T>& b, cudaStream_t stream) {
  JobBatch<T> batch{};
  batch.n = static_cast<int64_t>(st.jobs.size());
  int64_t block0 = 0;
  for (int64_t k = 0; k < batch.n; ++k) {
    const Job& j = st.jobs[k];
    batch.m[k] = b.job(j, block0);
    block0 += job_blocks(j);
  }
  lstm_controller_products_kernel<T><<<static_cast<unsigned>(std::max<int64_t>(block0, 1)), kBlock, 0, stream>>>(batch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
CellBatch<T> cell_batch(const Step& st, const ControllerDims& dims, const std::vector<at::Tensor>& params) {
  const std::vector<int64_t> ws = ws_offsets(dims, nullptr);
  CellBatch<T> batch{};
  batch.n = st.nstages;
  for (int64_t k = 0; k < st.nstages; ++k) {
    const int64_t s = st.stage0 + k;
    const StageDims& sd = dims.stages[s];
    batch.m[k] = CellMeta<T>{params[kParamsPerStage * s + kWhh].const_data_ptr<T>(), sd.L, sd.H, sd.saved_off,
                             ws_layout(sd, ws[s])};
  }
  return batch;
}

std::tuple<at::Tensor, at::Tensor> lstm_controller_cuda(const at::Tensor& wbar_in, at::IntArrayRef blocks,
                                                        at::TensorList params_in) {
  const ControllerDims dims = controller_dims("tsc::lstm_controller", wbar_in, blocks, params_in);
  const c10::cuda::CUDAGuard guard(wbar_in.device());
  const at::Tensor wbar = wbar_in.contiguous();
  const std::vector<at::Tensor> params = contiguous_all(params_in);
  at::Tensor dt = at::empty({dims.dt_numel}, wbar.options());
  at::Tensor saved = at::empty({dims.saved_numel}, wbar.options());
  if (dims.stages.empty()) return {dt, saved};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(wbar.scalar_type(), "tsc_lstm_controller_cuda", [&] {
    Buffers<scalar_t> b;
    b.wbar = wbar.const_data_ptr<scalar_t>();
    b.dt = dt.mutable_data_ptr<scalar_t>();
    b.saved = saved.mutable_data_ptr<scalar_t>();
    b.params = &params;
    for (const Step& st : forward_steps(dims)) {
      if (!st.jobs.empty()) {
        launch_products(st, b, stream);
      } else {
        lstm_controller_recurrent_kernel<scalar_t>
            <<<static_cast<unsigned>(st.nstages), kBlock, 0, stream>>>(cell_batch<scalar_t>(st, dims, params), b.saved);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return {dt, saved};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> lstm_controller_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& dt_in, const at::Tensor& wbar_in, at::IntArrayRef blocks,
    at::TensorList params_in, const at::Tensor& saved_in) {
  const ControllerDims dims =
      controller_backward_dims("tsc::lstm_controller_backward", grad_in, dt_in, wbar_in, blocks, params_in, saved_in);
  const c10::cuda::CUDAGuard guard(wbar_in.device());
  const at::Tensor wbar = wbar_in.contiguous(), grad = grad_in.contiguous(), dt = dt_in.contiguous(),
                   saved = saved_in.contiguous();
  const std::vector<at::Tensor> params = contiguous_all(params_in);
  at::Tensor dwbar = at::empty({dims.wbar_numel}, wbar.options());
  std::vector<at::Tensor> grads;
  for (const auto& p : params) grads.push_back(at::empty_like(p));
  if (dims.stages.empty()) return {dwbar, grads};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(wbar.scalar_type(), "tsc_lstm_controller_backward_cuda", [&] {
    int64_t ws_total = 0;
    ws_offsets(dims, &ws_total);
    at::Tensor ws = at::empty({ws_total}, wbar.options());  // caching allocator: capture-safe
    Buffers<scalar_t> b;
    b.wbar = wbar.const_data_ptr<scalar_t>();
    b.dt_in = dt.const_data_ptr<scalar_t>();
    b.grad = grad.const_data_ptr<scalar_t>();
    b.saved = const_cast<scalar_t*>(saved.const_data_ptr<scalar_t>());  // read only in backward
    b.ws = ws.mutable_data_ptr<scalar_t>();
    b.dwbar = dwbar.mutable_data_ptr<scalar_t>();
    b.params = &params;
    b.grads = &grads;
    for (const Step& st : backward_steps(dims)) {
      if (!st.jobs.empty()) {
        launch_products(st, b, stream);
      } else {
        lstm_controller_bptt_kernel<scalar_t><<<static_cast<unsigned>(st.nstages), kBlock, 0, stream>>>(
            cell_batch<scalar_t>(st, dims, params), b.saved, b.ws);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return {dwbar, grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, CUDA, m) {
  m.impl("lstm_controller", &lstm_controller_cuda);
  m.impl("lstm_controller_backward", &lstm_controller_backward_cuda);
}

}  // namespace tsc
