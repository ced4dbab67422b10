// Launch geometry and the warp and block reductions shared by the CUDA kernels
// (residual_update_cuda.cu, batch_norm_residual_update_cuda.cu, scale_concat_cuda.cu,
// ode_combine_cuda.cu, weight_mean_cuda.cu, lstm_controller_cuda.cu, ...).
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

#include "launch_geometry.h"

namespace tsc {

// Enough blocks to cover numel once, capped at 32 per SM (the grid-stride loop does the rest).
// The device properties are cached by ATen: no host-device synchronisation.
// (launch_geometry.h's elementwise_blocks with this device's SM count, which the planners take as `sms`.)
inline int elementwise_grid(int64_t numel, int threads) {
  return static_cast<int>(elementwise_blocks(numel, threads, at::cuda::getCurrentDeviceProperties()->multiProcessorCount));
}

// Grid and block of a per-channel reduction planned by launch_geometry.h's plan_channel_reduction.
inline dim3 reduction_block(const ChannelReduction& r) { return dim3(static_cast<unsigned>(r.lanes), static_cast<unsigned>(r.value_lanes)); }
inline dim3 reduction_grid(const ChannelReduction& r) { return dim3(static_cast<unsigned>(r.tiles), static_cast<unsigned>(r.chunks)); }

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

// Walks the values m in [m0, m1), stepping `step`, of one channel of an (outer, C, inner) block,
// calling f(o, s) with (o, s) = (m / inner, m % inner) advanced incrementally (no per-value
// division): a block's threads cover consecutive m, so samples and positions are flattened and
// every lane is busy even when inner (the spatial size) is below the block size.
template <typename F>
__device__ __forceinline__ void for_channel_values(int64_t m0, int64_t m1, int64_t step, int64_t inner, F f) {
  int64_t o = m0 / inner, s = m0 % inner;
  const int64_t step_o = step / inner, step_s = step % inner;
  for (int64_t m = m0; m < m1; m += step) {
    f(o, s);
    o += step_o;
    s += step_s;
    if (s >= inner) {
      s -= inner;
      ++o;
    }
  }
}

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

// ddt[c] = sum over chunks of partial[j * C + c], a warp per channel (kFoldWarps per block,
// fold_blocks(C) blocks): fixed order, ceil(chunks / 32) + 5 dependent adds.
template <typename acc_t>
__global__ void fold_chunks_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out, int64_t chunks, int64_t C) {
  const int64_t c = blockIdx.x * kFoldWarps + threadIdx.x / 32;
  if (c >= C) return;  // whole warps leave: c is uniform in a warp
  const acc_t s = warp_fold_sum<acc_t>(chunks, [&](int64_t j) { return partial[j * C + c]; });
  if (threadIdx.x % 32 == 0) out[c] = s;
}

}  // namespace tsc
