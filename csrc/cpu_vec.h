// CPU building blocks shared by the fused elementwise ops (residual_update_cpu.cpp,
// batch_norm_residual_update_cpu.cpp): at::vec::Vectorized lanes in the accumulation type, loads and
// (streaming) stores from/to the storage type, the vectorised ReLU and per-channel values of a run;
// and axpy, the vector-lane y += alpha * x of weight_mean_cpu.cpp and lstm_controller_cpu.cpp.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace tsc {
namespace cpu {

using at::vec::Vectorized;

// Outputs at least this large (bytes) are streamed past the cache.
constexpr int64_t kStreamBytes = 8 << 20;
// Elements per parallel task: large enough to amortise scheduling, small enough to split
// (8,256,56,56) evenly across cores.
constexpr int64_t kGrain = 32768;

// p + offset, or null for an absent optional buffer (the ReLU output without a fused ReLU, dy).
template <typename T>
T* offset_or_null(T* p, int64_t offset) {
  return p ? p + offset : nullptr;
}

template <typename acc_t>
Vectorized<acc_t> relu_forward(const Vectorized<acc_t>& x) {
  // blendv keeps NaN lanes (NaN < 0 is false), as the scalar tsc::relu_forward does.
  const Vectorized<acc_t> zero(acc_t(0));
  return Vectorized<acc_t>::blendv(x, zero, x < zero);
}

template <typename acc_t>
Vectorized<acc_t> relu_backward(const Vectorized<acc_t>& grad, const Vectorized<acc_t>& out) {
  const Vectorized<acc_t> zero(acc_t(0));
  return Vectorized<acc_t>::blendv(grad, zero, out <= zero);
}

// Lanes of the accumulation type, loaded from / stored to scalar_t in pairs of vectors so that
// fp16/bf16 (whose Vectorized holds twice as many lanes as Vectorized<float>) convert in one go.
template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * Vec::size();
  static constexpr bool kCanStream =
#if defined(CPU_CAPABILITY_AVX2)
      true;
#else
      false;
#endif

  static void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + Vec::size());
    } else {
      at::vec::load_to_float<scalar_t>(p, a, b);
    }
  }

  // The incoming gradient masked by the fused ReLU: zero where the forward output `out` is <= 0
  // (out null: no fused ReLU, the gradient as it is).
  static void load_grad(const scalar_t* g, const scalar_t* out, Vec& a, Vec& b) {
    load(g, a, b);
    if (out) {
      Vec o0, o1;
      load(out, o0, o1);
      a = relu_backward(a, o0);
      b = relu_backward(b, o1);
    }
  }

  // `stream` requires p to be 32-byte aligned (see aligned_prefix).
  static void store(scalar_t* p, const Vec& a, const Vec& b, bool stream) {
#if defined(CPU_CAPABILITY_AVX2)
    if (stream) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        _mm256_stream_ps(p, a);
        _mm256_stream_ps(p + Vec::size(), b);
      } else if constexpr (std::is_same_v<scalar_t, double>) {
        _mm256_stream_pd(p, a);
        _mm256_stream_pd(p + Vec::size(), b);
      } else {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_from_float<scalar_t>(a, b));
      }
      return;
    }
#endif
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      a.store(p);
      b.store(p + Vec::size());
    } else {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    }
  }

  // Number of leading elements to handle one by one so that `p + k` is 32-byte aligned.
  static int64_t aligned_prefix(const scalar_t* p, int64_t n, bool stream) {
    if (!stream) return 0;
    const auto misalign = reinterpret_cast<std::uintptr_t>(p) % 32;
    if (misalign % sizeof(scalar_t) != 0) return n;  // cannot align: all scalar (never for our outputs)
    return std::min<int64_t>(n, ((32 - misalign) % 32) / sizeof(scalar_t));
  }
};

inline void stream_fence(bool stream) {
#if defined(CPU_CAPABILITY_AVX2)
  if (stream) _mm_sfence();  // order the streaming stores before the op returns to other threads
#endif
}

// A per-channel value (dt, a coefficient) of element i of a run: one value for a channel plane
// (kPerLane = false), p[i] along a channels-last row (kPerLane = true).
template <bool kPerLane, typename acc_t>
struct PerChannel {
  const acc_t* p;
  acc_t at(int64_t i) const { return kPerLane ? p[i] : p[0]; }
  Vectorized<acc_t> vec(int64_t i) const {
    return kPerLane ? Vectorized<acc_t>::loadu(p + i) : Vectorized<acc_t>(p[0]);
  }
};

// y[i] += alpha * x[i].
template <typename T>
void axpy(T alpha, const T* x, T* y, int64_t n) {
  using Vec = Vectorized<T>;
  const Vec av(alpha);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) at::vec::fmadd(av, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace cpu
}  // namespace tsc
