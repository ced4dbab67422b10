// CUDA kernels of the fused ODE stage combination (docs/ode.md), registered for the CUDA dispatch
// key. The arithmetic is tsc::ode_combine_term / ode_combine_stage_grad from ode_combine_math.h,
// the functions the CPU kernels run, so the CPU tests cover it.
//
// Stage pointers travel by value in a kernel parameter (no host-to-device copy per call); the
// coefficients are read from device memory, so a step size that changes between iterations is
// just a new value in that small tensor (no host sync, no recompilation).
// Forward: one grid-stride pass in 16-byte packs (cuda_elementwise.cuh) when every pointer is
// 16-byte aligned. Backward: one grid-stride pass (bf16 / half pairs: 4-byte loads) writing every dk_i and per-block
// partial sums of g * k_i (g read once); a second one-block kernel adds the partials, a warp per
// stage in a fixed order (ceil(blocks / 32) + 5 dependent adds). The grid of the backward depends on
// numel only (not on the GPU; ode_combine_plan.h), so dc is bitwise reproducible.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include <vector>

#include "ode_combine_layout.h"
#include "ode_combine_math.h"
#include "ode_combine_plan.h"
#include "cuda_elementwise.cuh"
#include "cuda_grid.cuh"

namespace tsc {
namespace {

constexpr int kThreads = static_cast<int>(ode_plan::kThreads);

template <typename scalar_t>
struct StagePtrs {
  const scalar_t* k[kOdeMaxStages];
};

template <typename scalar_t>
struct GradPtrs {
  scalar_t* dk[kOdeMaxStages];
};

// W: 16-byte packs (kPack) when every pointer is 16-byte aligned, else 1 (each element's sum is the
// same either way: the S terms in order).
template <int W, typename scalar_t, typename acc_t>
__global__ void ode_combine_forward_kernel(const scalar_t* __restrict__ z, StagePtrs<scalar_t> stages,
                                           const acc_t* __restrict__ coeffs, scalar_t* __restrict__ out, int64_t numel,
                                           int S) {
  for_each_pack<W>(numel, [&]<int P>(int64_t i) {
    const Pack<scalar_t, P> zv = load_pack<P>(z + i);
    acc_t o[P];
#pragma unroll
    for (int j = 0; j < P; ++j) o[j] = static_cast<acc_t>(zv.v[j]);
#pragma unroll
    for (int s = 0; s < kOdeMaxStages; ++s) {  // unrolled (guarded by s < S): stage pointers stay in registers
      if (s < S) {
        const Pack<scalar_t, P> kv = load_pack<P>(stages.k[s] + i);
        const acc_t cs = coeffs[s];
#pragma unroll
        for (int j = 0; j < P; ++j) o[j] = ode_combine_term(o[j], static_cast<acc_t>(kv.v[j]), cs);
      }
    }
    Pack<scalar_t, P> ov;
#pragma unroll
    for (int j = 0; j < P; ++j) ov.v[j] = static_cast<scalar_t>(o[j]);
    store_pack<P>(out + i, ov);
  });
}

// partial[block, s] = sum over the block's elements of g * k_s; dk_s = c_s * g. One pass: g is
// read once; the S sums live in registers (the loops over kOdeMaxStages unroll, guarded by s < S).
// Items of W = ode_plan::pack elements (bf16 / half pairs: 4-byte loads), grid-stride, then the
// odd element alone (for_each_pack): the order of every sum depends on numel only. Vec: items
// loaded as W-element vectors (every pointer aligned); else the same items with scalar accesses.
template <int W, bool Vec, typename scalar_t, typename acc_t>
__global__ void ode_combine_backward_kernel(const scalar_t* __restrict__ g, StagePtrs<scalar_t> stages,
                                            GradPtrs<scalar_t> grads, const acc_t* __restrict__ coeffs,
                                            acc_t* __restrict__ partial, int64_t numel, int S) {
  __shared__ acc_t shared[kThreads / 32];
  acc_t c[kOdeMaxStages], sum[kOdeMaxStages];
#pragma unroll
  for (int s = 0; s < kOdeMaxStages; ++s) {
    c[s] = s < S ? coeffs[s] : acc_t(0);
    sum[s] = 0;
  }
  for_each_pack<W>(numel, [&]<int P>(int64_t i) {
    const Pack<scalar_t, P> gv = load_items<P, Vec>(g + i);
#pragma unroll
    for (int s = 0; s < kOdeMaxStages; ++s) {
      if (s < S) {
        const Pack<scalar_t, P> kv = load_items<P, Vec>(stages.k[s] + i);
        Pack<scalar_t, P> dv;
#pragma unroll
        for (int j = 0; j < P; ++j) {
          const acc_t gi = static_cast<acc_t>(gv.v[j]);
          dv.v[j] = static_cast<scalar_t>(ode_combine_stage_grad(gi, c[s]));
          sum[s] += gi * static_cast<acc_t>(kv.v[j]);
        }
        store_items<P, Vec>(grads.dk[s] + i, dv);
      }
    }
  });
#pragma unroll
  for (int s = 0; s < kOdeMaxStages; ++s) {
    if (s < S) {
      const acc_t total = block_sum(sum[s], shared);
      if (threadIdx.x == 0) partial[blockIdx.x * (int64_t)S + s] = total;
    }
  }
}

bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

// dc[s] = sum over blocks of partial[b, s]: warp s folds the blocks (warp_fold_sum, fixed order).
template <typename acc_t>
__global__ void ode_combine_sum_partials_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ dc,
                                                int64_t blocks, int S) {
  const int s = threadIdx.x / 32;
  if (s >= S) return;  // whole warps leave
  const acc_t sum = warp_fold_sum<acc_t>(blocks, [&](int64_t b) { return partial[b * S + s]; });
  if (threadIdx.x % 32 == 0) dc[s] = sum;
}

at::Tensor ode_combine_cuda(const at::Tensor& z_in, at::TensorList stages_in, const at::Tensor& coeffs_in) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  OdeCombineArgs a = prepare_ode_combine("tsc::ode_combine", z_in, stages_in, coeffs_in);
  at::Tensor out = at::empty_like(a.z);
  const int64_t numel = a.z.numel();
  const int S = static_cast<int>(a.stages.size());
  if (numel == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.z.scalar_type(), "tsc_ode_combine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    StagePtrs<scalar_t> k{};
    for (int s = 0; s < S; ++s) k.k[s] = a.stages[s].const_data_ptr<scalar_t>();
    const scalar_t* zp = a.z.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    bool aligned = aligned_to(zp, 16) && aligned_to(op, 16);
    for (int s = 0; s < S; ++s) aligned = aligned && aligned_to(k.k[s], 16);
    auto launch = [&]<int W>() {
      ode_combine_forward_kernel<W, scalar_t, acc_t>
          <<<elementwise_grid(numel / W + 1, kThreads), kThreads, 0, stream>>>(zp, k, a.coeffs.const_data_ptr<acc_t>(),
                                                                               op, numel, S);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (aligned)
      launch.template operator()<kPack<scalar_t>>();
    else
      launch.template operator()<1>();
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> ode_combine_backward_cuda(const at::Tensor& grad_in,
                                                                          at::TensorList stages_in,
                                                                          const at::Tensor& coeffs_in) {
  const c10::cuda::CUDAGuard guard(grad_in.device());
  OdeCombineArgs a = prepare_ode_combine("tsc::ode_combine_backward", grad_in, stages_in, coeffs_in);
  const int64_t numel = a.z.numel();
  const int S = static_cast<int>(a.stages.size());
  std::vector<at::Tensor> dk;
  for (int s = 0; s < S; ++s) dk.push_back(at::empty_like(a.z));
  if (numel == 0) return {dk, at::zeros_like(a.coeffs)};
  at::Tensor dc = at::empty_like(a.coeffs);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = ode_plan::backward_blocks(numel);
  at::Tensor partial = at::empty({blocks, S}, a.coeffs.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.z.scalar_type(), "tsc_ode_combine_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    StagePtrs<scalar_t> k{};
    GradPtrs<scalar_t> d{};
    for (int s = 0; s < S; ++s) {
      k.k[s] = a.stages[s].const_data_ptr<scalar_t>();
      d.dk[s] = dk[s].mutable_data_ptr<scalar_t>();
    }
    constexpr int W = static_cast<int>(ode_plan::pack(sizeof(scalar_t)));
    const scalar_t* gp = a.z.const_data_ptr<scalar_t>();
    bool vec = aligned_to(gp, W * sizeof(scalar_t));
    for (int s = 0; s < S; ++s)
      vec = vec && aligned_to(k.k[s], W * sizeof(scalar_t)) && aligned_to(d.dk[s], W * sizeof(scalar_t));
    auto launch = [&]<bool Vec>() {
      ode_combine_backward_kernel<W, Vec, scalar_t, acc_t><<<static_cast<int>(blocks), kThreads, 0, stream>>>(
          gp, k, d, a.coeffs.const_data_ptr<acc_t>(), partial.mutable_data_ptr<acc_t>(), numel, S);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec)
      launch.template operator()<true>();
    else
      launch.template operator()<W == 1>();  // one-element items: no vectors to avoid
    ode_combine_sum_partials_kernel<acc_t>
        <<<1, 32 * S, 0, stream>>>(partial.const_data_ptr<acc_t>(), dc.mutable_data_ptr<acc_t>(), blocks, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dk, dc};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, CUDA, m) {
  m.impl("ode_combine", &ode_combine_cuda);
  m.impl("ode_combine_backward", &ode_combine_backward_cuda);
}

}  // namespace tsc
