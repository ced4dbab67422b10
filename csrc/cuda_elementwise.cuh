// Per-element CUDA kernels over (N, C, inner) tensors: 32-bit indices and 16-byte loads.
//
// The channel of flat element i is (i / inner) % C. With 64-bit `/` and `%` on every element (a
// ~40-instruction software routine each on NVIDIA GPUs) the index math, not memory, bounds a
// kernel that only reads two values and writes one. So:
//   - tensors with fewer than 2^31 elements (every activation of a CIFAR or ImageNet ResNet) run a
//     32-bit instantiation whose divisions are ATen's magic-number IntDivider<unsigned>
//     (a multiply-high and a shift); larger ones keep int64 and plain division;
//   - when every pointer is 16-byte aligned (always for fresh allocations; views with an offset
//     may not be) each thread moves packs of 16 bytes (4 fp32, 8 fp16/bf16): one vector load per
//     tensor instead of 4-8 scalar 2/4-byte loads. The < kPack tail runs element by element.
// dispatch_elementwise picks the instantiation on the host; for_each_pack is the grid-stride loop.
#pragma once

#include <ATen/cuda/detail/IntegerDivider.cuh>

#include <cstdint>
#include <initializer_list>
#include <limits>

#include "cuda_grid.cuh"

namespace tsc {

template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <int W, typename T>
__device__ __forceinline__ Pack<T, W> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, W>*>(p);
}

template <int W, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, W>& x) {
  *reinterpret_cast<Pack<T, W>*>(p) = x;
}

// P adjacent elements at p: one P-element vector access when Vec (p must be P-element aligned),
// else P scalar ones (a misaligned view walking the same items: same values, same order).
template <int P, bool Vec, typename T>
__device__ __forceinline__ Pack<T, P> load_items(const T* p) {
  if constexpr (Vec || P == 1) {
    return load_pack<P>(p);
  } else {
    Pack<T, P> x;
#pragma unroll
    for (int j = 0; j < P; ++j) x.v[j] = p[j];
    return x;
  }
}

template <int P, bool Vec, typename T>
__device__ __forceinline__ void store_items(T* p, const Pack<T, P>& x) {
  if constexpr (Vec || P == 1) {
    store_pack<P>(p, x);
  } else {
#pragma unroll
    for (int j = 0; j < P; ++j) p[j] = x.v[j];
  }
}

// Channel and sample of flat element i of N samples of C channels: c = (i / inner) % C and
// n = i / per_sample (inner = prod(spatial), per_sample = C * inner for channel-first tensors;
// inner = 1, per_sample = C * prod(spatial) for channels-last ones).
template <typename index_t>
struct ChannelIndex {
  at::cuda::detail::IntDivider<index_t> inner, C, per_sample;
  ChannelIndex(int64_t inner_, int64_t C_, int64_t per_sample_)
      : inner(static_cast<index_t>(inner_)),
        C(static_cast<index_t>(C_)),
        per_sample(static_cast<index_t>(per_sample_)) {}
  __device__ __forceinline__ index_t channel(index_t i) const { return C.mod(inner.div(i)); }
  __device__ __forceinline__ index_t sample(index_t i) const { return per_sample.div(i); }
};

// Grid-stride loop over numel elements in packs of W: body.template operator()<W>(i) handles
// elements [i, i + W), then body.template operator()<1>(i) each element of the tail.
template <int W, typename index_t, typename Body>
__device__ __forceinline__ void for_each_pack(index_t numel, Body&& body) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t first = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t packs = numel / W;
  // no wrap-around in 32 bits: p < packs <= 2^31 and stride < 2^31
  for (index_t p = first; p < packs; p += stride) body.template operator()<W>(p * W);
  if constexpr (W > 1)
    for (index_t i = packs * W + first; i < numel; i += stride) body.template operator()<1>(i);
}

// Elements per 16-byte pack.
template <typename scalar_t>
constexpr int kPack = 16 / sizeof(scalar_t);

// launch.template operator()<index_t>(): uint32_t below 2^31 elements, else int64_t.
template <typename Launch>
void dispatch_index(int64_t numel, Launch&& launch) {
  if (numel <= std::numeric_limits<int32_t>::max())
    launch.template operator()<uint32_t>();
  else
    launch.template operator()<int64_t>();
}

// launch.template operator()<W, index_t>(): W = kPack<scalar_t> when every (non-null) pointer is
// 16-byte aligned, else 1; index_t = uint32_t below 2^31 elements, else int64_t.
template <typename scalar_t, typename Launch>
void dispatch_elementwise(int64_t numel, std::initializer_list<const void*> ptrs, Launch&& launch) {
  bool aligned = true;
  for (const void* p : ptrs) aligned = aligned && reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
  dispatch_index(numel, [&]<typename index_t>() {
    if (aligned)
      launch.template operator()<kPack<scalar_t>, index_t>();
    else
      launch.template operator()<1, index_t>();
  });
}

}  // namespace tsc
