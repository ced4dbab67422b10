// CUDA kernels of the weight-mean projection (docs/tsc.md, docs/ops.md), registered for the CUDA
// dispatch key. The division is weight_mean_math.h, the same function the CPU kernels run, so the
// CPU tests cover it.
//
// weight_mean: one launch for every weight of the network, one warp per output element (lanes
// stride over C_in, shuffle reduction); backward: one grid-stride launch writing dw̄ / C_in of
// every weight. The per-weight metadata (pointer, offsets, sizes, strides) travels BY VALUE as a
// kernel parameter (MetaBatch slices of up to kMaxWeights weights, cuda_meta_batch.cuh), more
// weights taking more launches: no host-to-device copy, no sync, CUDA-graph capturable.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include <algorithm>
#include <vector>

#include "cuda_grid.cuh"
#include "cuda_meta_batch.cuh"
#include "weight_mean_layout.h"
#include "weight_mean_math.h"
#include "weight_mean_plan.h"

namespace tsc {
namespace {

constexpr int kThreads = static_cast<int>(weight_mean_plan::kThreads);
constexpr int kWarps = static_cast<int>(weight_mean_plan::kWarps);

struct WeightMeta {
  int64_t ptr;       // the weight's data pointer (forward only)
  int64_t mean_off;  // first w̄ index of this weight
  int64_t C_out, C_in, K, so, si, sk;
};

constexpr int kMaxWeights =
    static_cast<int>(weight_mean_plan::kMaxWeights);  // 48 * 64 B + 24 B < 4 KiB of kernel parameters
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

template <typename scalar_t, typename acc_t>
__global__ void weight_mean_kernel(const __grid_constant__ WeightBatch batch, acc_t* __restrict__ out) {
  const int64_t warps = (int64_t)gridDim.x * kWarps;
  for (int64_t e = batch.begin + blockIdx.x * (int64_t)kWarps + threadIdx.x / 32; e < batch.end; e += warps) {
    const WeightMeta& m = batch.m[find_weight<&WeightMeta::mean_off>(batch.m, batch.n, e)];
    const int64_t r = e - m.mean_off, o = r / m.K, k = r % m.K;
    const scalar_t* w = reinterpret_cast<const scalar_t*>(m.ptr) + o * m.so + k * m.sk;
    acc_t s = 0;
    for (int64_t i = threadIdx.x % 32; i < m.C_in; i += 32) s += static_cast<acc_t>(w[i * m.si]);
    s = warp_sum(s);
    if (threadIdx.x % 32 == 0) out[e] = mean_from_sum(s, m.C_in);
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

// Calls launch(batch) for each launch of weight_mean_plan::weight_batches (the split the planner reports).
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
  std::vector<at::Tensor> keep;  // contiguous copies of weights whose kernel dims do not collapse
  std::vector<WeightMeta> meta;
  for (size_t j = 0; j < weights_in.size(); ++j) {
    WeightView v;
    at::Tensor w = weights_in[j];
    if (!weight_view(w, v)) {
      keep.push_back(w.contiguous());
      w = keep.back();
      weight_view(w, v);
    }
    meta.push_back({reinterpret_cast<int64_t>(w.const_data_ptr()), off[j], v.C_out, v.C_in, v.K, v.so, v.si, v.sk});
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "tsc_weight_mean_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_each_weight_batch<&WeightMeta::mean_off>(meta, total, [&](const WeightBatch& b) {
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

TORCH_LIBRARY_IMPL(tsc, CUDA, m) {
  m.impl("weight_mean", &weight_mean_cuda);
  m.impl("weight_mean_backward", &weight_mean_backward_cuda);
}

}  // namespace tsc
