// Launch geometry and the warp and block reductions shared by the CUDA kernels
// (residual_update_cuda.cu, batch_norm_residual_update_cuda.cu, scale_concat_cuda.cu,
// ode_combine_cuda.cu, weight_mean_cuda.cu, lstm_controller_cuda.cu, ...).
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "launch_geometry.h"

namespace tsc {

// Enough blocks to cover numel once, capped at 32 per SM (the grid-stride loop does the rest).
// The device properties are cached by ATen: no host-device synchronisation.
// (launch_geometry.h's elementwise_blocks with this device's SM count, which the planners take as `sms`.)
inline int elementwise_grid(int64_t numel, int threads) {
  return static_cast<int>(
      elementwise_blocks(numel, threads, at::cuda::getCurrentDeviceProperties()->multiProcessorCount));
}

// Grid and block of a per-channel reduction planned by launch_geometry.h's plan_channel_reduction.
inline dim3 reduction_block(const ChannelReduction& r) {
  return dim3(static_cast<unsigned>(r.lanes), static_cast<unsigned>(r.value_lanes));
}
inline dim3 reduction_grid(const ChannelReduction& r) {
  return dim3(static_cast<unsigned>(r.tiles), static_cast<unsigned>(r.chunks));
}

// Sum of v over the warp, in every lane.
template <typename T>
__device__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return __shfl_sync(0xffffffffu, v, 0);
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024), valid in thread 0. shared
// holds one acc_t per warp; the leading barrier lets a kernel call this repeatedly with the same shared.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[lane] : acc_t(0);
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Fixed-order sum of n values load(j), j in [0, n), by one warp (every lane calls it): lane l adds
// j = l, l + 32, ... in order, then the shuffle-down tree (lane l += lane l + off, off = 16 .. 1);
// the total is valid in lane 0. The order depends on n only (not the GPU); the chain is
// ceil(n / 32) + 5 dependent adds instead of n (launch_geometry.h fold_chain).
template <typename acc_t, typename Load>
__device__ acc_t warp_fold_sum(int64_t n, Load load) {
  acc_t s = 0;
  for (int64_t j = threadIdx.x % 32; j < n; j += 32) s += load(j);
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  return s;
}

// Launches a per-channel reduction kernel planned by plan_channel_reduction (launch_geometry.h):
// launch.template operator()<W, Vec>() with W = reduction_pack(sizeof(scalar_t)) (the kernel's
// channel slots per thread and widest item) and Vec = whether its items may be loaded as W-element
// vectors: the plan pairs (pack > 1), every (non-null) pointer is W-element aligned and `offsets`
// (the kernel's other index offsets, e.g. scale_concat's gradient rows) keep pairs aligned. A
// misaligned view runs Vec = false: the same items with scalar accesses, the same sums.
template <typename scalar_t, typename Launch>
void dispatch_reduction(const ChannelReduction& r, std::initializer_list<const void*> ptrs, bool offsets,
                        Launch&& launch) {
  constexpr int W = static_cast<int>(reduction_pack(sizeof(scalar_t)));
  if constexpr (W == 1) {
    launch.template operator()<1, true>();
  } else {
    bool vec = offsets && r.pack == W;
    for (const void* p : ptrs) vec = vec && reinterpret_cast<std::uintptr_t>(p) % (W * sizeof(scalar_t)) == 0;
    if (vec)
      launch.template operator()<W, true>();
    else
      launch.template operator()<W, false>();
  }
}

// Calls body.template operator()<P>(o, s) for one item of walk_reduction_items: P = W when the item
// holds W elements, else 1 (a plane's single head or tail value, or rows that do not pair).
template <int W, typename Body>
__device__ __forceinline__ void reduction_item(int64_t o, int64_t s, int64_t n, Body& body) {
  if constexpr (W > 1) {
    if (n == W) {
      body.template operator()<W>(o, s);
      return;
    }
  }
  body.template operator()<1>(o, s);
}

// A thread's sums of a reduction: one slot per channel of its item (rows: pack channels; planes:
// slot 0 only, every value is of one channel).
template <typename T, int W>
struct Slots {
  T v[W];
};

// Fixed-order tree over the value lanes (threadIdx.y) of a block of (lanes, value lanes) threads,
// shared[y * lanes + x] holding each thread's value: afterwards value lane 0 holds the total.
template <typename T, typename Merge>
__device__ __forceinline__ void tree_reduce(T* shared, Merge merge) {
  const int lane = threadIdx.x, t = threadIdx.y, lanes = blockDim.x;
  for (int half = blockDim.y / 2; half > 0; half /= 2) {
    __syncthreads();
    if (t < half) merge(shared[t * lanes + lane], shared[(t + half) * lanes + lane]);
  }
  __syncthreads();
}

// Channel groups (launch_geometry.h plan_channel_groups): the block's columns, one T per value of the
// run, in dynamic shared memory (group_shared_bytes(r, sizeof(T)) at the launch).
template <typename T>
__device__ __forceinline__ T* group_columns() {
  extern __shared__ __align__(16) unsigned char tsc_group_shared[];
  return reinterpret_cast<T*>(tsc_group_shared);
}

// After every thread stored its columns: thread g folds channel g's `inner` columns in order (merge(a, b):
// a += b) and calls store(c, total) for its channel c of the group (a shorter last group: fewer channels).
template <typename T, typename Merge, typename Store>
__device__ __forceinline__ void fold_group_columns(const ChannelReduction& r, const T* cols, Merge merge, Store store) {
  __syncthreads();
  const int64_t g = threadIdx.x, c = blockIdx.x * r.group + g;
  if (g >= r.group || c >= r.channels) return;
  T total = cols[g * r.inner];
  for (int64_t k = 1; k < r.inner; ++k) merge(total, cols[g * r.inner + k]);
  store(c, total);
}

// ddt[c] = sum over chunks of partial[j * C + c], a warp per channel (kFoldWarps per block,
// fold_blocks(C) blocks): fixed order, ceil(chunks / 32) + 5 dependent adds.
template <typename acc_t>
__global__ void fold_chunks_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out, int64_t chunks,
                                   int64_t C) {
  const int64_t c = blockIdx.x * kFoldWarps + threadIdx.x / 32;
  if (c >= C) return;  // whole warps leave: c is uniform in a warp
  const acc_t s = warp_fold_sum<acc_t>(chunks, [&](int64_t j) { return partial[j * C + c]; });
  if (threadIdx.x % 32 == 0) out[c] = s;
}

}  // namespace tsc
