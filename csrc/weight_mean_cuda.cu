// CUDA kernels of the weight-mean projection (docs/tsc.md, docs/ops.md), registered for the CUDA
// dispatch key. The division is weight_mean_math.h, the same function the CPU kernels run, so the
// CPU tests cover it.
//
// weight_mean: one launch for every weight of the network, one warp per row of contiguous values
// (weight_mean_layout.h RunView: one output channel's (C_in, K) block of an NCHW weight, or one
// (o, k)'s C_in values of a 1x1 / channels-last weight). The warp's lanes read adjacent 16-byte
// packs along the row (issue 22: lanes stepping along C_in K values apart made one-value requests
// for 3x3 weights, 64-byte ones for 1x1 bf16), each of a lane's slots keeping one output k; the
// slots' sums merge per k in a fixed order (a tree over the lane groups, then the packs).
// Backward: one grid-stride launch writing dw̄ / C_in of every weight; a training step's
// (tsc::_weight_mean_aliased, weight_mean_autograd.cpp) then adds those values into every conv's dW
// with one more grid-stride launch (add_wbar_grads_kernel). The per-weight metadata
// (pointer, offsets, sizes, strides) travels BY VALUE as a kernel parameter (MetaBatch slices of up
// to kMaxWeights weights, cuda_meta_batch.cuh), more weights taking more launches: no
// host-to-device copy, no sync, CUDA-graph capturable.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include <algorithm>
#include <vector>

#include "cuda_grid.cuh"
#include "cuda_meta_batch.cuh"
#include "weight_mean_kernels.h"
#include "weight_mean_layout.h"
#include "weight_mean_math.h"
#include "weight_mean_plan.h"

namespace tsc {
namespace {

constexpr int kThreads = static_cast<int>(weight_mean_plan::kThreads);
constexpr int kWarps = static_cast<int>(weight_mean_plan::kWarps);

struct WeightMeta {
  int64_t ptr;       // the weight's data pointer (forward); its conv gradient's (add_wbar_grads_kernel)
  int64_t mean_off;  // first w̄ index of this weight
  int64_t row_off;   // first row of this weight among the batch's rows (forward); first value (adds)
  int64_t C_in;
  int64_t per_out, period, run, so, sk;  // RunView (forward); period: K, the kernel's values (adds)
};

constexpr int kMaxWeights =
    static_cast<int>(weight_mean_plan::kMaxWeights);  // 48 * 72 B + 24 B < 4 KiB of kernel parameters
using WeightBatch = MetaBatch<WeightMeta, kMaxWeights>;
static_assert(sizeof(WeightBatch) + 64 <= 4096, "kernel parameters must stay under 4 KiB");

// Index of the weight whose [start, next start) range holds i (the starts ascend).
template <int64_t WeightMeta::* start>
__device__ int64_t find_weight(const WeightMeta* meta, int64_t n, int64_t i) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (meta[mid].*start <= i)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

template <typename scalar_t>
struct alignas(16) Pack {
  scalar_t v[run_pack_values(sizeof(scalar_t))];
};

// Row of period > 32 (kernels of more than 32 values): lanes on adjacent outputs k, each summing its
// C_in values in order (the row's K adjacent values per C_in step are one request).
template <typename scalar_t, typename acc_t>
__device__ void mean_wide_row(const scalar_t* x, const WeightMeta& m, acc_t* y, int lane) {
  for (int64_t k = lane; k < m.period; k += 32) {
    acc_t s = 0;
    for (int64_t i = 0; i < m.C_in; ++i) s += static_cast<acc_t>(x[i * m.period + k]);
    y[k] = mean_from_sum(s, m.C_in);
  }
}

// One row of period P <= 32 by one warp (weight_mean_layout.h run_lane_groups): the row is read from
// `lead` values before it (the 16-byte boundary) in steps of V x P x groups values; lane l's slot h
// is the step's value V l + h, always of output (V l + h - lead) mod P. Whole packs are one 16-byte
// load, the row's partial first and last packs value by value (the sums are the same either way).
template <typename scalar_t, typename acc_t>
__device__ void mean_row(const scalar_t* x, const WeightMeta& m, acc_t* y, int lane, acc_t* fold) {
  constexpr int V = static_cast<int>(run_pack_values(sizeof(scalar_t)));
  const int64_t P = m.period, groups = run_lane_groups(P), step = V * P * groups;
  const int64_t lead = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x) / sizeof(scalar_t)) % V;
  const scalar_t* a0 = x - lead;  // 16-byte aligned
  const int64_t end = lead + m.run;
  acc_t acc[V];
  for (int h = 0; h < V; ++h) acc[h] = 0;
  if (lane < P * groups) {
    for (int64_t q0 = V * lane; q0 < end; q0 += step) {
      if (q0 >= lead && q0 + V <= end) {
        const Pack<scalar_t> p = *reinterpret_cast<const Pack<scalar_t>*>(a0 + q0);
        for (int h = 0; h < V; ++h) acc[h] += static_cast<acc_t>(p.v[h]);
      } else {
        for (int h = 0; h < V; ++h)
          if (q0 + h >= lead && q0 + h < end) acc[h] += static_cast<acc_t>(a0[q0 + h]);
      }
    }
  }
  // Lanes l and l + w P hold the same outputs in the same slots: a fixed tree over the groups.
  const int64_t g = lane / P;
  int64_t w = 1;
  while (w < groups) w <<= 1;
  for (w >>= 1; w >= 1; w >>= 1) {
    for (int h = 0; h < V; ++h) {
      const acc_t other = __shfl_down_sync(0xffffffffu, acc[h], static_cast<unsigned>(w * P));
      if (g < w && g + w < groups) acc[h] += other;
    }
  }
  // Group 0's V P slots hold every output V times: slot q = V l + h is output (q - lead) mod P.
  if (lane < P)
    for (int h = 0; h < V; ++h) fold[V * lane + h] = acc[h];
  __syncwarp();
  if (lane < P) {
    acc_t s = 0;
    const int64_t first = (lane + lead) % P;
    for (int h = 0; h < V; ++h) s += fold[first + P * h];
    y[lane] = mean_from_sum(s, m.C_in);
  }
  __syncwarp();
}

template <typename scalar_t, typename acc_t>
__global__ void weight_mean_kernel(const __grid_constant__ WeightBatch batch, acc_t* __restrict__ out) {
  constexpr int V = static_cast<int>(run_pack_values(sizeof(scalar_t)));
  __shared__ acc_t fold[kWarps][32 * V];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t warps = (int64_t)gridDim.x * kWarps;
  for (int64_t r = batch.begin + blockIdx.x * (int64_t)kWarps + warp; r < batch.end; r += warps) {
    const WeightMeta& m = batch.m[find_weight<&WeightMeta::row_off>(batch.m, batch.n, r)];
    const int64_t row = r - m.row_off;
    const scalar_t* x = reinterpret_cast<const scalar_t*>(m.ptr) + (row / m.per_out) * m.so + (row % m.per_out) * m.sk;
    acc_t* y = out + m.mean_off + row * m.period;
    if (m.period > 32)
      mean_wide_row(x, m, y, lane);
    else
      mean_row(x, m, y, lane, fold[warp]);
  }
}

// Backward: dw̄ / C_in, packed like w̄, one grid-stride launch per WeightBatch (only mean_off and
// C_in of the records are read).
template <typename acc_t>
__global__ void weight_mean_backward_kernel(const __grid_constant__ WeightBatch batch, const acc_t* __restrict__ grad,
                                            acc_t* __restrict__ out) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = batch.begin + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < batch.end; e += stride) {
    out[e] = mean_from_sum(grad[e], batch.m[find_weight<&WeightMeta::mean_off>(batch.m, batch.n, e)].C_in);
  }
}

// A training step's: dW[o, i, k] += scaled[o K + k] for every value of every conv gradient of the
// batch (contiguous), grid-stride over the values (row_off: a gradient's first; period: K).
template <typename scalar_t>
__global__ void add_wbar_grads_kernel(const __grid_constant__ WeightBatch batch, const scalar_t* __restrict__ scaled) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = batch.begin + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < batch.end; e += stride) {
    const WeightMeta& m = batch.m[find_weight<&WeightMeta::row_off>(batch.m, batch.n, e)];
    const uint32_t t = static_cast<uint32_t>(e - m.row_off);  // < 2^31: add_wbar_grads_cuda
    scalar_t* g = reinterpret_cast<scalar_t*>(m.ptr);
    const uint32_t q = wbar_grad_index(t, static_cast<uint32_t>(m.C_in), static_cast<uint32_t>(m.period));
    g[t] = static_cast<scalar_t>(g[t] + scaled[m.mean_off + q]);
  }
}

// Calls launch(batch) for each launch of weight_mean_plan::weight_batches (the split the planner
// reports): the forward's items are rows (row_off), the backward's w̄ values (mean_off).
template <int64_t WeightMeta::* start, typename F>
void for_each_weight_batch(const std::vector<WeightMeta>& meta, int64_t total, F&& launch) {
  std::vector<int64_t> starts;
  for (const WeightMeta& m : meta) starts.push_back(m.*start);
  for (const weight_mean_plan::WeightBatchRange& r : weight_mean_plan::weight_batches(starts, total)) {
    WeightBatch b{};
    b.n = r.n;
    for (int64_t k = 0; k < b.n; ++k) b.m[k] = meta[r.first + k];
    b.begin = r.begin;
    b.end = r.end;
    launch(b);
  }
}

at::Tensor weight_mean_cuda(at::TensorList weights_in) {
  check_weights("tsc::weight_mean", weights_in);
  const c10::cuda::CUDAGuard guard(weights_in[0].device());
  int64_t total = 0;
  const std::vector<int64_t> off = mean_offsets(weights_in, total);
  const auto dtype = weights_in[0].scalar_type();
  at::Tensor out = at::empty({total}, weights_in[0].options().dtype(accumulation_type(dtype)));
  if (total == 0) return out;
  std::vector<at::Tensor> keep;  // the tensors read: the weights, or contiguous copies (weight_runs)
  std::vector<WeightMeta> meta;
  int64_t rows = 0;
  for (size_t j = 0; j < weights_in.size(); ++j) {
    RunView v;
    keep.push_back(weight_runs(weights_in[j], v));
    meta.push_back({reinterpret_cast<int64_t>(keep.back().const_data_ptr()), off[j], rows, v.C_in, v.per_out, v.period,
                    v.run, v.so, v.sk});
    rows += v.rows;
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "tsc_weight_mean_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_each_weight_batch<&WeightMeta::row_off>(meta, rows, [&](const WeightBatch& b) {
      weight_mean_kernel<scalar_t, acc_t>
          <<<elementwise_grid(b.end - b.begin, kWarps), kThreads, 0, stream>>>(b, out.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor weight_mean_backward_cuda(const at::Tensor& grad_in, at::TensorList weights) {
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const WeightMeanGrad a = prepare_weight_mean_backward("tsc::weight_mean_backward", grad_in, weights);
  if (a.total == 0) return a.out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  std::vector<WeightMeta> meta(weights.size());
  for (size_t j = 0; j < weights.size(); ++j) {
    meta[j].mean_off = a.off[j];
    meta[j].C_in = weights[j].size(1);
  }
  AT_DISPATCH_FLOATING_TYPES(a.grad.scalar_type(), "tsc_weight_mean_backward_cuda", [&] {
    for_each_weight_batch<&WeightMeta::mean_off>(meta, a.total, [&](const WeightBatch& b) {
      weight_mean_backward_kernel<scalar_t><<<elementwise_grid(b.end - b.begin, kThreads), kThreads, 0, stream>>>(
          b, a.grad.const_data_ptr<scalar_t>(), a.out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return a.out;
}

}  // namespace

void add_wbar_grads_cuda(const std::vector<at::Tensor>& gs, const at::Tensor& scaled,
                         const std::vector<int64_t>& offsets) {
  TORCH_INTERNAL_ASSERT(gs.size() == offsets.size() && scaled.is_cuda() && scaled.dim() == 1);
  const c10::cuda::CUDAGuard guard(scaled.device());
  std::vector<WeightMeta> meta;
  int64_t total = 0;
  for (size_t j = 0; j < gs.size(); ++j) {
    const at::Tensor& g = gs[j];
    TORCH_INTERNAL_ASSERT(g.device() == scaled.device() && g.scalar_type() == scaled.scalar_type() &&
                          g.is_contiguous() && g.dim() >= 2);
    const int64_t K = c10::multiply_integers(g.sizes().begin() + 2, g.sizes().end());
    TORCH_INTERNAL_ASSERT(offsets[j] + g.size(0) * K <= scaled.numel());
    TORCH_INTERNAL_ASSERT(g.numel() <= INT32_MAX);  // 32-bit index math (the caller's kernel_adds)
    meta.push_back({reinterpret_cast<int64_t>(g.data_ptr()), offsets[j], total, g.size(1), 0, K, 0, 0, 0});
    total += g.numel();
  }
  if (total == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scaled.scalar_type(), "tsc_add_wbar_grads_cuda", [&] {
    for_each_weight_batch<&WeightMeta::row_off>(meta, total, [&](const WeightBatch& b) {
      add_wbar_grads_kernel<scalar_t>
          <<<elementwise_grid(b.end - b.begin, kThreads), kThreads, 0, stream>>>(b, scaled.const_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

TORCH_LIBRARY_IMPL(tsc, CUDA, m) {
  m.impl("weight_mean", &weight_mean_cuda);
  m.impl("weight_mean_backward", &weight_mean_backward_cuda);
}

}  // namespace tsc
