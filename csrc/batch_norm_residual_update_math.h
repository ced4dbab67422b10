// Per-channel and per-element math of the fused BatchNorm tail (docs/ops.md):
//   out = relu?(y + dt[c] * (γ[c] (x - μ[c]) invstd[c] + β[c]))
// shared verbatim by the CPU kernels (scalar and at::vec::Vectorized lanes) and the CUDA kernels,
// so the CPU tests cover the arithmetic the GPU runs. T is the accumulation type (fp32 for
// fp32/fp16/bf16 activations, fp64 for fp64) or a Vectorized of it.
//
// The per-channel work (statistics -> coefficients, sums -> gradients) is done once per channel so
// that each element costs one short FMA chain. x is centred before scaling ((x - μ) a, not a x + b
// with b = -a μ): the same operation count, without the cancellation a large |μ| / σ would cause.
#pragma once

#include <cmath>

#include "elementwise_math.h"

namespace tsc {

// Partial statistics of a chunk of one channel: count, mean and M2 = Σ (x - mean)^2.
template <typename T>
struct Moments {
  T count, mean, m2;
};

// Chan et al.'s pairwise merge of two chunks' moments (a += b), exact in exact arithmetic and
// numerically sound for any sizes (no E[x^2] - E[x]^2 cancellation). Empty chunks are neutral.
template <typename T>
TSC_HD void merge_moments(Moments<T>& a, const Moments<T>& b) {
  if (b.count == T(0)) return;
  const T n = a.count + b.count;
  const T delta = b.mean - a.mean;
  const T wb = b.count / n;
  a.mean = a.mean + delta * wb;
  a.m2 = a.m2 + b.m2 + delta * delta * a.count * wb;
  a.count = n;
}

// Welford's one-value update (a chunk grown by x).
template <typename T>
TSC_HD void push_moment(Moments<T>& a, T x) {
  a.count = a.count + T(1);
  const T delta = x - a.mean;
  a.mean = a.mean + delta / a.count;
  a.m2 = a.m2 + delta * (x - a.mean);
}

// One thread's running sums of a channel's values around a shift k (a value of the channel, the same for
// every thread of it): count, Σ (x - k), Σ (x - k)^2. A push is two adds and an FMA, no division (Welford's
// update divides per value); shifted_to_moments divides once, before the fixed-order Chan merge. With k
// within a few σ of the mean, Σ (x - k)^2 - (Σ (x - k))^2 / n loses at most a few bits in fp32 (a large
// |mean| / σ does not enter). The CUDA statistics kernel (bn_stats_kernel) runs these two functions;
// tsc::_bn_shifted_moments runs them on the host (tests/tooling/test_cuda_plans.py).
template <typename T>
struct ShiftedSums {
  T count, sum, sumsq;
};

template <typename T>
TSC_HD void push_shifted(ShiftedSums<T>& a, T x, T shift) {
  const T d = x - shift;
  a.count = a.count + T(1);
  a.sum = a.sum + d;
  a.sumsq = a.sumsq + d * d;
}

// (count, mean, M2) of the sums; M2 is clamped at 0 (rounding of the difference); no values: zeros.
template <typename T>
TSC_HD Moments<T> shifted_to_moments(const ShiftedSums<T>& a, T shift) {
  if (a.count == T(0)) return Moments<T>{T(0), T(0), T(0)};
  const T d = a.sum / a.count;
  const T m2 = a.sumsq - a.sum * d;
  return Moments<T>{a.count, shift + d, m2 > T(0) ? m2 : T(0)};
}

template <typename T>
TSC_HD T bn_invstd(T var, T eps) {
#if defined(__CUDA_ARCH__)
  return T(1) / sqrt(var + eps);
#else
  return T(1) / std::sqrt(var + eps);
#endif
}

// F.batch_norm's running-statistics update: the biased batch variance m2 / M normalises, the
// unbiased one m2 / (M - 1) enters running_var.
template <typename T>
TSC_HD T running_update(T running, T batch, T momentum) {
  return (T(1) - momentum) * running + momentum * batch;
}

// Apply coefficients of one channel: out = relu?(y + (x - mean) * scale + shift).
template <typename T>
struct BnApply {
  T scale, shift;  // dt γ invstd, dt β
};

template <typename T>
TSC_HD BnApply<T> bn_apply_coefficients(T dt, T gamma, T beta, T invstd) {
  return {dt * gamma * invstd, dt * beta};
}

template <typename T>
TSC_HD T bn_residual_forward(T y, T x, T mean, T scale, T shift) {
  return y + ((x - mean) * scale + shift);
}

// Backward of one channel from S1 = Σ g' and S2c = Σ g' (x - mean) (so S2 = Σ g' x̂ = invstd S2c):
//   dx = k1 g' + k3 (x - mean) + k2,  k1 = dt γ invstd; training: k2 = -k1 S1 / M, k3 = -k1 invstd² S2c / M
//   (eval: the statistics are constants, k2 = k3 = 0); ddt = γ S2 + β S1, dγ = dt S2, dβ = dt S1.
template <typename T>
struct BnBackward {
  T k1, k2, k3;
  T ddt, dweight, dbias;
};

template <typename T>
TSC_HD BnBackward<T> bn_backward_coefficients(T dt, T gamma, T beta, T invstd, T s1, T s2c, T count, bool training) {
  const T s2 = s2c * invstd;
  BnBackward<T> r;
  r.k1 = dt * gamma * invstd;
  r.k2 = training ? -r.k1 * s1 / count : T(0);
  r.k3 = training ? -r.k1 * invstd * s2 / count : T(0);
  r.ddt = gamma * s2 + beta * s1;
  r.dweight = dt * s2;
  r.dbias = dt * s1;
  return r;
}

template <typename T>
TSC_HD T bn_backward_dx(T g, T x, T mean, T k1, T k2, T k3) {
  return g * k1 + ((x - mean) * k3 + k2);
}

// The fixed order of the CUDA per-channel merge of `chunks` chunks' moments (a warp per channel,
// batch_norm_residual_update_cuda.cu): lane l merges chunks l, l + 32, ... in order (this
// function); then the lanes merge pairwise, lane l taking lane l + off for off = 16, 8, 4, 2, 1
// (merge_lane_tree on the host, shuffles on the GPU). ceil(chunks / 32) + 5 dependent merges
// instead of `chunks`. load(j) gives chunk j's moments.
template <typename T, typename Load>
TSC_HD Moments<T> lane_moments(int lane, int64_t chunks, Load load) {
  Moments<T> m{T(0), T(0), T(0)};
  for (int64_t j = lane; j < chunks; j += 32) merge_moments(m, load(j));
  return m;
}

// Host twin of the GPU's shuffle tree over 32 lanes' moments (merge order identical), so the CPU
// tests check the merged statistics the GPU computes (tsc::_bn_merge_chunks, tests/test_cuda_plans.py).
template <typename T, typename Load>
Moments<T> merge_chunks_like_gpu(int64_t chunks, Load load) {
  Moments<T> lanes[32];
  for (int l = 0; l < 32; ++l) lanes[l] = lane_moments<T>(l, chunks, load);
  for (int off = 16; off > 0; off >>= 1)
    for (int l = 0; l < off; ++l) merge_moments(lanes[l], lanes[l + off]);
  return lanes[0];
}

}  // namespace tsc
