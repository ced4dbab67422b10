// CUDA kernels of the fused BatchNorm tail (docs/ops.md), registered for the CUDA dispatch key.
// The arithmetic is batch_norm_residual_update_math.h, the same functions the CPU kernels run.
//
// Forward (training), three launches on the current stream, no host synchronisation:
//   1. bn_stats_kernel, grid (channel tiles, chunks): each block reduces one chunk of the M values of
//      its channel(s) to moments (count, mean, M2: per-thread sums around the channel's first value, turned
//      into moments once, then a fixed-order tree of Chan merges) and writes them to a partial buffer.
//      Chunks split every channel, so a small C still fills the GPU.
//   2. bn_forward_channels_kernel, a warp per channel: merges the chunks in a fixed lane-then-tree order
//      (Chan's formula; deterministic, ceil(chunks / 32) + 5 dependent merges), writes save_mean / save_invstd, updates
//      the running statistics in their dtype and computes the apply coefficients (scale, shift). Eval starts here, from
//      the running statistics.
//   3. bn_apply_kernel: the grid-stride elementwise pass writing out.
// Backward, three launches: per-chunk sums S1, S2c (same chunks, fixed-order tree), the per-channel
// pass (a warp per channel, fixed-order fold of the chunks; ddt, dweight, dbias and the dx coefficients), then dx (and
// dy). Layouts: the (outer, C, inner) block of channel_layout.h. Chunks enumerate the flattened items of one channel
// (walk_reduction_items, launch_geometry.h: bf16 / half pairs, 4-byte loads and 128-byte warp requests): threads
// advance (sample, item) incrementally, so there is no per-element division in the reductions; all indices are int64.
// The grids are planned by batch_norm_residual_update_plan.h (host code, also behind tsc::cuda_launch_plan).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include "batch_norm_residual_update_layout.h"
#include "batch_norm_residual_update_math.h"
#include "cuda_elementwise.cuh"
#include "cuda_grid.cuh"
#include "launch_geometry.h"

namespace tsc {
namespace {

constexpr int kThreads = 256;
constexpr int kChannelWarps = static_cast<int>(kFoldWarps);  // per-channel kernels: a warp per channel

// partial[j][c] = moments of chunk j of channel c; partial is (3, chunks, C): count, mean, m2.
// Block (tile, j) walks chunk j's items (walk_reduction_items: bf16 / half pairs, 4-byte loads);
// W: channel slots per thread and widest item; Vec: items loaded as W-element vectors. Each thread sums
// its values around the channel's first value (push_shifted: no division per value), converts to moments
// once (shifted_to_moments), then the fixed-order tree merges them (Chan).
template <int W, bool Vec, typename scalar_t, typename acc_t>
__global__ void bn_stats_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ partial, ChannelReduction r) {
  __shared__ Slots<Moments<acc_t>, W> shared[kThreads];
  const int64_t C = r.channels, inner = r.inner;
  const int64_t c = reduction_channel(r, blockIdx.x, threadIdx.x);
  const int64_t chunks = gridDim.y;
  const bool slots = r.rows || r.group;  // a slot per value of an item (else every value is of channel c)
  Slots<ShiftedSums<acc_t>, W> sums{};
  acc_t k[W];  // the shift of each slot's channel: its first value (sample 0, item 0), the same in every block
  auto shift_of = [&](int64_t ch) { return static_cast<acc_t>(x[ch * inner]); };
  auto body = [&]<int P>(int64_t o, int64_t s) {
    const Pack<scalar_t, P> xv = load_items<P, Vec>(x + (o * C + c) * inner + s);
#pragma unroll
    for (int j = 0; j < P; ++j) {
      if (slots)  // constant indices in both branches: the slots stay in registers (no stack frame)
        push_shifted(sums.v[j], static_cast<acc_t>(xv.v[j]), k[j]);
      else
        push_shifted(sums.v[0], static_cast<acc_t>(xv.v[j]), k[0]);
    }
  };
  if (r.group) {  // channel groups: each item's values over the chunk's samples into its columns
    Moments<acc_t>* cols = group_columns<Moments<acc_t>>();
    walk_group_items(r, blockIdx.x, blockIdx.y, threadIdx.x, [&](int64_t s, int64_t n, int64_t o0, int64_t o1) {
#pragma unroll
      for (int j = 0; j < W; ++j) k[j] = shift_of(c + (s + (j < n ? j : 0)) / inner);  // the channel of value j
      sums = Slots<ShiftedSums<acc_t>, W>{};
      for (int64_t o = o0; o < o1; ++o) reduction_item<W>(o, s, n, body);
#pragma unroll
      for (int j = 0; j < W; ++j)
        if (j < n) cols[s + j] = shifted_to_moments(sums.v[j], k[j]);
    });
    fold_group_columns(
        r, cols, [](Moments<acc_t>& a, const Moments<acc_t>& b) { merge_moments(a, b); },
        [&](int64_t ch, const Moments<acc_t>& total) {
          const int64_t o = blockIdx.y * C + ch;
          partial[o] = total.count;
          partial[chunks * C + o] = total.mean;
          partial[2 * chunks * C + o] = total.m2;
        });
    return;
  }
  if (c < C) {
#pragma unroll
    for (int j = 0; j < W; ++j) k[j] = shift_of(r.rows && c + j < C ? c + j : c);
    walk_reduction_items(r, c, blockIdx.y, threadIdx.y,
                         [&](int64_t o, int64_t s, int64_t n) { reduction_item<W>(o, s, n, body); });
  }
  Slots<Moments<acc_t>, W> mom{};
  if (c < C) {
#pragma unroll
    for (int j = 0; j < W; ++j) mom.v[j] = shifted_to_moments(sums.v[j], k[j]);
  }
  shared[threadIdx.y * blockDim.x + threadIdx.x] = mom;
  tree_reduce(shared, [](Slots<Moments<acc_t>, W>& a, const Slots<Moments<acc_t>, W>& b) {
#pragma unroll
    for (int j = 0; j < W; ++j) merge_moments(a.v[j], b.v[j]);
  });
  if (threadIdx.y == 0 && c < C) {
#pragma unroll
    for (int j = 0; j < W; ++j) {
      if (j > 0 && !(r.rows && j < r.pack)) continue;
      const Moments<acc_t> total = shared[threadIdx.x].v[j];
      const int64_t o = blockIdx.y * C + c + j;
      partial[o] = total.count;
      partial[chunks * C + o] = total.mean;
      partial[2 * chunks * C + o] = total.m2;
    }
  }
}

// Shuffle-down tree step of a warp's moments: lane l merges lane l + off (batch_norm_residual_update_math.h
// merge_chunks_like_gpu is the host twin of this order).
template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> warp_merge_moments(Moments<acc_t> m) {
  for (int off = 16; off > 0; off >>= 1) {
    const Moments<acc_t> b{__shfl_down_sync(0xffffffffu, m.count, off), __shfl_down_sync(0xffffffffu, m.mean, off),
                           __shfl_down_sync(0xffffffffu, m.m2, off)};
    merge_moments(m, b);
  }
  return m;
}

// A warp per channel: statistics (the chunks merged in a fixed lane-then-tree order in training,
// the running ones in eval), running update, apply coefficients coef = (scale, shift) as (2, C).
// Chain: ceil(chunks / 32) + 5 merges (was one thread merging all chunks in a row: up to 1024).
// With at most one chunk (eval, C = 2^20), a thread per channel: a warp reads 32 adjacent channels.
template <typename acc_t, typename running_t>
__global__ void bn_forward_channels_kernel(const acc_t* __restrict__ partial, int64_t chunks, int64_t C, int64_t M,
                                           const acc_t* __restrict__ dt, const acc_t* __restrict__ weight,
                                           const acc_t* __restrict__ bias, running_t* running_mean,
                                           running_t* running_var, int64_t running_stride, bool training,
                                           acc_t momentum, acc_t eps, acc_t* __restrict__ save_mean,
                                           acc_t* __restrict__ save_invstd, acc_t* __restrict__ coef) {
  const bool per_thread = chunks <= 1;  // channel_pass_blocks: a thread per channel (a lane per chunk no use)
  const int64_t c = per_thread ? blockIdx.x * (int64_t)kThreads + threadIdx.x
                               : blockIdx.x * (int64_t)kChannelWarps + threadIdx.x / 32;
  if (c >= C) return;  // whole warps leave in warp mode: c is uniform in a warp
  Moments<acc_t> m{acc_t(0), acc_t(0), acc_t(0)};
  if (training && per_thread) {
    if (chunks == 1) m = Moments<acc_t>{partial[c], partial[C + c], partial[2 * C + c]};  // = the warp's merge
  } else if (training) {
    m = lane_moments<acc_t>(threadIdx.x % 32, chunks, [&](int64_t j) {
      return Moments<acc_t>{partial[j * C + c], partial[(chunks + j) * C + c], partial[(2 * chunks + j) * C + c]};
    });
    m = warp_merge_moments(m);
  }
  if (!per_thread && threadIdx.x % 32 != 0) return;
  acc_t mean, invstd;
  if (training) {
    mean = m.mean;
    invstd = bn_invstd(m.m2 / static_cast<acc_t>(M), eps);
    if (running_mean) {
      running_t* rm = running_mean + c * running_stride;
      running_t* rv = running_var + c * running_stride;
      *rm = static_cast<running_t>(running_update(static_cast<acc_t>(*rm), mean, momentum));
      *rv = static_cast<running_t>(running_update(static_cast<acc_t>(*rv), m.m2 / static_cast<acc_t>(M - 1), momentum));
    }
  } else {
    mean = static_cast<acc_t>(running_mean[c * running_stride]);
    invstd = bn_invstd(static_cast<acc_t>(running_var[c * running_stride]), eps);
  }
  save_mean[c] = mean;
  save_invstd[c] = invstd;
  const BnApply<acc_t> k =
      bn_apply_coefficients(dt[c], weight ? weight[c] : acc_t(1), bias ? bias[c] : acc_t(0), invstd);
  coef[c] = k.scale;
  coef[C + c] = k.shift;
}

// The channels of a pack's elements, in order. Channels-last rows (inner = 1): adjacent elements are adjacent
// channels, so one division finds the pack's first channel and the others follow by an increment that wraps at
// C (a pack may span rows when C < 16 bytes); planes: the channel of each element (ChannelIndex).
template <typename index_t>
struct PackChannels {
  index_t c;
  index_t C;
  bool rows;
  __device__ __forceinline__ PackChannels(const ChannelIndex<index_t>& ci, index_t i, int64_t C_, bool rows_)
      : c(rows_ ? ci.C.mod(i) : index_t(0)), C(static_cast<index_t>(C_)), rows(rows_) {}
  __device__ __forceinline__ index_t next(const ChannelIndex<index_t>& ci, index_t i) {
    if (!rows) return ci.channel(i);
    const index_t r = c;
    c = c + 1 == C ? index_t(0) : c + 1;
    return r;
  }
};

template <int W, typename index_t, typename scalar_t, typename acc_t>
__global__ void bn_apply_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ x,
                                const acc_t* __restrict__ mean, const acc_t* __restrict__ coef,
                                scalar_t* __restrict__ out, index_t numel, int64_t C, ChannelIndex<index_t> ci,
                                bool rows, bool relu) {
  for_each_pack<W>(numel, [&]<int P>(index_t i) {
    const Pack<scalar_t, P> yv = load_pack<P>(y + i), xv = load_pack<P>(x + i);
    Pack<scalar_t, P> o;
    PackChannels<index_t> pc(ci, i, C, rows);
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const index_t c = pc.next(ci, i + j);
      const acc_t r =
          bn_residual_forward(static_cast<acc_t>(yv.v[j]), static_cast<acc_t>(xv.v[j]), mean[c], coef[c], coef[C + c]);
      o.v[j] = static_cast<scalar_t>(relu ? relu_forward(r) : r);
    }
    store_pack<P>(out + i, o);
  });
}

// partial (2, chunks, C): S1 = Σ g', S2c = Σ g' (x - mean) of chunk j of channel c; the items of
// bn_stats_kernel (W, Vec: its template parameters).
template <typename acc_t>
struct Sums {
  acc_t s1, s2;
};

template <int W, bool Vec, typename scalar_t, typename acc_t>
__global__ void bn_backward_sums_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ relu_out, const acc_t* __restrict__ mean,
                                        acc_t* __restrict__ partial, ChannelReduction r) {
  __shared__ Slots<Sums<acc_t>, W> shared[kThreads];
  const int64_t C = r.channels, inner = r.inner;
  const int64_t c = reduction_channel(r, blockIdx.x, threadIdx.x);
  const int64_t chunks = gridDim.y;
  const bool slots = r.rows || r.group;  // a slot per value of an item (else every value is of channel c)
  Slots<Sums<acc_t>, W> sums{};
  acc_t mu[W];
  auto body = [&]<int P>(int64_t o, int64_t s) {
    const int64_t i = (o * C + c) * inner + s;
    const Pack<scalar_t, P> gv = load_items<P, Vec>(g + i), xv = load_items<P, Vec>(x + i);
    Pack<scalar_t, P> ov;
    if (relu_out) ov = load_items<P, Vec>(relu_out + i);
#pragma unroll
    for (int j = 0; j < P; ++j) {
      acc_t gi = static_cast<acc_t>(gv.v[j]);
      if (relu_out) gi = relu_backward(gi, static_cast<acc_t>(ov.v[j]));
      if (slots) {  // constant indices in both branches: the slots stay in registers (no stack frame)
        sums.v[j].s1 += gi;
        sums.v[j].s2 += gi * (static_cast<acc_t>(xv.v[j]) - mu[j]);
      } else {
        sums.v[0].s1 += gi;
        sums.v[0].s2 += gi * (static_cast<acc_t>(xv.v[j]) - mu[0]);
      }
    }
  };
  if (r.group) {  // channel groups: each item's values over the chunk's samples into its columns
    Sums<acc_t>* cols = group_columns<Sums<acc_t>>();
    walk_group_items(r, blockIdx.x, blockIdx.y, threadIdx.x, [&](int64_t s, int64_t n, int64_t o0, int64_t o1) {
#pragma unroll
      for (int j = 0; j < W; ++j) mu[j] = mean[c + (s + (j < n ? j : 0)) / inner];  // the channel of value j
      sums = Slots<Sums<acc_t>, W>{};
      for (int64_t o = o0; o < o1; ++o) reduction_item<W>(o, s, n, body);
#pragma unroll
      for (int j = 0; j < W; ++j)
        if (j < n) cols[s + j] = sums.v[j];
    });
    fold_group_columns(
        r, cols,
        [](Sums<acc_t>& a, const Sums<acc_t>& b) {
          a.s1 += b.s1;
          a.s2 += b.s2;
        },
        [&](int64_t ch, const Sums<acc_t>& total) {
          partial[blockIdx.y * C + ch] = total.s1;
          partial[(chunks + blockIdx.y) * C + ch] = total.s2;
        });
    return;
  }
  if (c < C) {
#pragma unroll
    for (int j = 0; j < W; ++j) mu[j] = mean[r.rows && c + j < C ? c + j : c];
    walk_reduction_items(r, c, blockIdx.y, threadIdx.y,
                         [&](int64_t o, int64_t s, int64_t n) { reduction_item<W>(o, s, n, body); });
  }
  shared[threadIdx.y * blockDim.x + threadIdx.x] = sums;
  tree_reduce(shared, [](Slots<Sums<acc_t>, W>& a, const Slots<Sums<acc_t>, W>& b) {
#pragma unroll
    for (int j = 0; j < W; ++j) {
      a.v[j].s1 += b.v[j].s1;
      a.v[j].s2 += b.v[j].s2;
    }
  });
  if (threadIdx.y == 0 && c < C) {
#pragma unroll
    for (int j = 0; j < W; ++j) {
      if (j > 0 && !(r.rows && j < r.pack)) continue;
      const int64_t o = blockIdx.y * C + c + j;
      partial[o] = shared[threadIdx.x].v[j].s1;
      partial[chunks * C + o] = shared[threadIdx.x].v[j].s2;
    }
  }
}

// A warp per channel: S1, S2c folded over the chunks in a fixed order (warp_fold_sum: ceil(chunks / 32) + 5
// dependent adds); gradients of dt, weight, bias; coef (3, C) = k1, k2, k3. At most one chunk: a thread per channel.
template <typename acc_t>
__global__ void bn_backward_channels_kernel(const acc_t* __restrict__ partial, int64_t chunks, int64_t C, int64_t M,
                                            const acc_t* __restrict__ dt, const acc_t* __restrict__ weight,
                                            const acc_t* __restrict__ bias, const acc_t* __restrict__ invstd,
                                            bool training, acc_t* __restrict__ ddt, acc_t* __restrict__ dweight,
                                            acc_t* __restrict__ dbias, acc_t* __restrict__ coef) {
  const bool per_thread = chunks <= 1;  // channel_pass_blocks: a thread per channel
  const int64_t c = per_thread ? blockIdx.x * (int64_t)kThreads + threadIdx.x
                               : blockIdx.x * (int64_t)kChannelWarps + threadIdx.x / 32;
  if (c >= C) return;  // whole warps leave in warp mode
  acc_t s1 = 0, s2c = 0;
  if (per_thread && chunks == 1) {  // the warp's fold of one chunk: the value itself
    s1 = partial[c];
    s2c = partial[C + c];
  } else if (!per_thread) {
    s1 = warp_fold_sum<acc_t>(chunks, [&](int64_t j) { return partial[j * C + c]; });
    s2c = warp_fold_sum<acc_t>(chunks, [&](int64_t j) { return partial[(chunks + j) * C + c]; });
  }
  if (!per_thread && threadIdx.x % 32 != 0) return;
  const BnBackward<acc_t> r = bn_backward_coefficients(dt[c], weight ? weight[c] : acc_t(1), bias ? bias[c] : acc_t(0),
                                                       invstd[c], s1, s2c, static_cast<acc_t>(M), training);
  ddt[c] = r.ddt;
  if (dweight) dweight[c] = r.dweight;
  if (dbias) dbias[c] = r.dbias;
  coef[c] = r.k1;
  coef[C + c] = r.k2;
  coef[2 * C + c] = r.k3;
}

template <int W, typename index_t, typename scalar_t, typename acc_t>
__global__ void bn_backward_apply_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ relu_out, const acc_t* __restrict__ mean,
                                         const acc_t* __restrict__ coef, scalar_t* __restrict__ dy,
                                         scalar_t* __restrict__ dx, index_t numel, int64_t C, ChannelIndex<index_t> ci,
                                         bool rows) {
  for_each_pack<W>(numel, [&]<int P>(index_t i) {
    Pack<scalar_t, P> gv = load_pack<P>(g + i);
    const Pack<scalar_t, P> xv = load_pack<P>(x + i);
    if (relu_out) {
      const Pack<scalar_t, P> ov = load_pack<P>(relu_out + i);
#pragma unroll
      for (int j = 0; j < P; ++j)
        gv.v[j] = static_cast<scalar_t>(relu_backward(static_cast<acc_t>(gv.v[j]), static_cast<acc_t>(ov.v[j])));
      store_pack<P>(dy + i, gv);
    }
    Pack<scalar_t, P> d;
    PackChannels<index_t> pc(ci, i, C, rows);
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const index_t c = pc.next(ci, i + j);
      d.v[j] = static_cast<scalar_t>(bn_backward_dx(static_cast<acc_t>(gv.v[j]), static_cast<acc_t>(xv.v[j]), mean[c],
                                                    coef[c], coef[C + c], coef[2 * C + c]));
    }
    store_pack<P>(dx + i, d);
  });
}

// weight / bias as contiguous acc-dtype tensors (a conversion only for other dtypes), or undefined.
at::Tensor channel_param(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? t->to(acc).contiguous() : at::Tensor();
}

template <typename T>
const T* maybe_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

unsigned channel_blocks(int64_t C, int64_t chunks) { return static_cast<unsigned>(channel_pass_blocks(C, chunks)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_residual_update_cuda(
    const at::Tensor& y_in, const at::Tensor& x_in, const at::Tensor& dt_in,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool training, double momentum,
    double eps, bool relu) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  BnForwardArgs a = prepare_bn_forward(y_in, x_in, dt_in, running_mean, running_var, weight, bias, training);
  const ChannelView v = a.view;
  const int64_t C = v.channels;
  if (C == 0) return {a.out, a.save_mean, a.save_invstd};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc = bn_acc_type(a.y);
  const at::Tensor w = channel_param(weight, acc), b = channel_param(bias, acc);
  const at::Tensor coef = at::empty({2, C}, a.dt.options());
  const ChannelReduction plan = plan_channel_reduction(v, a.y.element_size(), true);
  const at::Tensor partial = training ? at::empty({3, plan.chunks, C}, a.dt.options()) : at::Tensor();
  const auto running_type = running_mean.has_value() ? running_mean->scalar_type() : acc;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.y.scalar_type(), "tsc_batch_norm_residual_update_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (training) {
          const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
          dispatch_reduction<scalar_t>(plan, {xp}, true, [&]<int W, bool Vec>() {
            const auto cols = static_cast<unsigned>(group_shared_bytes(plan, sizeof(Moments<acc_t>)));
            bn_stats_kernel<W, Vec, scalar_t, acc_t><<<reduction_grid(plan), reduction_block(plan), cols, stream>>>(
                xp, partial.mutable_data_ptr<acc_t>(), plan);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, running_type, "tsc_batch_norm_residual_update_cuda_channels", [&] {
              using running_t = scalar_t;
              running_t* rm = running_mean.has_value() ? running_mean->mutable_data_ptr<running_t>() : nullptr;
              running_t* rv = running_var.has_value() ? running_var->mutable_data_ptr<running_t>() : nullptr;
              TORCH_CHECK(!running_mean.has_value() || running_mean->stride(0) == running_var->stride(0),
                          "tsc::batch_norm_residual_update: running_mean and running_var must have one stride");
              const int64_t rstride = running_mean.has_value() ? running_mean->stride(0) : 0;
              bn_forward_channels_kernel<acc_t, running_t>
                  <<<channel_blocks(C, training ? plan.chunks : 0), kThreads, 0, stream>>>(
                      training ? partial.const_data_ptr<acc_t>() : nullptr, training ? plan.chunks : 0, C, a.count,
                      a.dt.const_data_ptr<acc_t>(), maybe_ptr<acc_t>(w), maybe_ptr<acc_t>(b), rm, rv, rstride, training,
                      static_cast<acc_t>(momentum), static_cast<acc_t>(eps), a.save_mean.mutable_data_ptr<acc_t>(),
                      a.save_invstd.mutable_data_ptr<acc_t>(), coef.mutable_data_ptr<acc_t>());
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
        if (a.y.numel() == 0) return;
        const scalar_t *yp = a.y.const_data_ptr<scalar_t>(), *xp = a.x.const_data_ptr<scalar_t>();
        scalar_t* op = a.out.mutable_data_ptr<scalar_t>();
        const int64_t numel = a.y.numel();
        dispatch_elementwise<scalar_t>(numel, {yp, xp, op}, [&]<int W, typename index_t>() {
          bn_apply_kernel<W, index_t, scalar_t, acc_t>
              <<<elementwise_grid(numel / W + 1, kThreads), kThreads, 0, stream>>>(
                  yp, xp, a.save_mean.const_data_ptr<acc_t>(), coef.const_data_ptr<acc_t>(), op,
                  static_cast<index_t>(numel), C, ChannelIndex<index_t>(v.inner, C, v.inner * C), v.inner == 1, relu);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return {a.out, a.save_mean, a.save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_residual_update_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& dt_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_invstd,
    const std::optional<at::Tensor>& relu_out, bool training) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  BnBackwardArgs a = prepare_bn_backward(grad_in, x_in, dt_in, weight, bias, save_mean, save_invstd, relu_out);
  const ChannelView v = a.view;
  const int64_t C = v.channels;
  if (C == 0) return {a.dy, a.dx, a.ddt, a.dweight, a.dbias};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc = bn_acc_type(a.x);
  const at::Tensor w = channel_param(weight, acc), b = channel_param(bias, acc);
  const at::Tensor coef = at::empty({3, C}, a.dt.options());
  const bool any = a.x.numel() > 0;
  const ChannelReduction plan = plan_channel_reduction(v, a.x.element_size(), true);
  const at::Tensor partial = any ? at::empty({2, plan.chunks, C}, a.dt.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.x.scalar_type(), "tsc_batch_norm_residual_update_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* outp = a.relu ? a.relu_out.const_data_ptr<scalar_t>() : nullptr;
        if (any) {
          const scalar_t *gp = a.g.const_data_ptr<scalar_t>(), *xp = a.x.const_data_ptr<scalar_t>();
          dispatch_reduction<scalar_t>(plan, {gp, xp, outp}, true, [&]<int W, bool Vec>() {
            const auto cols = static_cast<unsigned>(group_shared_bytes(plan, sizeof(Sums<acc_t>)));
            bn_backward_sums_kernel<W, Vec, scalar_t, acc_t>
                <<<reduction_grid(plan), reduction_block(plan), cols, stream>>>(
                    gp, xp, outp, a.save_mean.const_data_ptr<acc_t>(), partial.mutable_data_ptr<acc_t>(), plan);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
        // No values: zero chunks, so the per-channel pass writes zero gradients.
        bn_backward_channels_kernel<acc_t><<<channel_blocks(C, any ? plan.chunks : 0), kThreads, 0, stream>>>(
            any ? partial.const_data_ptr<acc_t>() : nullptr, any ? plan.chunks : 0, C, a.count,
            a.dt.const_data_ptr<acc_t>(), maybe_ptr<acc_t>(w), maybe_ptr<acc_t>(b),
            a.save_invstd.const_data_ptr<acc_t>(), training, a.ddt.mutable_data_ptr<acc_t>(),
            weight.has_value() ? a.dweight.mutable_data_ptr<acc_t>() : nullptr,
            bias.has_value() ? a.dbias.mutable_data_ptr<acc_t>() : nullptr, coef.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (!any) return;
        const scalar_t *gp = a.g.const_data_ptr<scalar_t>(), *xp = a.x.const_data_ptr<scalar_t>();
        scalar_t* dyp = a.relu ? a.dy.mutable_data_ptr<scalar_t>() : nullptr;
        scalar_t* dxp = a.dx.mutable_data_ptr<scalar_t>();
        const int64_t numel = a.x.numel();
        dispatch_elementwise<scalar_t>(numel, {gp, xp, outp, dyp, dxp}, [&]<int W, typename index_t>() {
          bn_backward_apply_kernel<W, index_t, scalar_t, acc_t>
              <<<elementwise_grid(numel / W + 1, kThreads), kThreads, 0, stream>>>(
                  gp, xp, outp, a.save_mean.const_data_ptr<acc_t>(), coef.const_data_ptr<acc_t>(), dyp, dxp,
                  static_cast<index_t>(numel), C, ChannelIndex<index_t>(v.inner, C, v.inner * C), v.inner == 1);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return {bn_dy_in_layout(a.dy, a.dy_channels_last), a.dx, a.ddt, a.dweight, a.dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, CUDA, m) {
  m.impl("batch_norm_residual_update", &batch_norm_residual_update_cuda);
  m.impl("batch_norm_residual_update_backward", &batch_norm_residual_update_backward_cuda);
}

}  // namespace tsc
