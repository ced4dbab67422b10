// CPU kernels of the fused BatchNorm tail (docs/ops.md), registered for the CPU dispatch key.
//
// Forward (training): one statistics pass over x, then one pass reading x, y and writing out.
// The statistics pass splits every channel into fixed chunks (pieces of a channel plane, or blocks
// of channels-last rows) of at most kChunk elements; each chunk's mean and M2 = Σ(x - mean)² come
// from two sweeps over the chunk, the second one hitting the cache, and the chunks are merged per
// channel in a fixed order with Chan's formula. So the statistics are numerically sound (no
// E[x²] - E[x]² cancellation), read x from memory once, and do not depend on the thread count.
// Eval skips the statistics pass. Backward: one reduction pass (S1 = Σ g', S2c = Σ g' (x - μ) with
// the same fixed chunks, hence deterministic) and one elementwise pass writing dx (and dy with the
// fused ReLU). The per-element math is batch_norm_residual_update_math.h, shared with CUDA.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/all.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "batch_norm_residual_update_layout.h"
#include "batch_norm_residual_update_math.h"
#include "cpu_vec.h"

namespace tsc {
namespace {

using at::vec::Vectorized;
using cpu::kGrain;
using cpu::kStreamBytes;
using cpu::Lanes;
using cpu::offset_or_null;
using cpu::PerChannel;
using cpu::stream_fence;

// Elements per statistics / reduction chunk: 64 KiB of fp32, so the second sweep over a chunk
// reads it from L2, and enough chunks to keep the cores busy on (8, 256, 56, 56).
constexpr int64_t kChunk = 16384;

// The fixed split of the (outer, C, inner) block into chunks (see the file comment).
struct ChunkPlan {
  ChannelView v;
  int64_t per_plane = 1, piece = 0, rows = 0, chunks = 0, per_channel = 0;

  explicit ChunkPlan(ChannelView view) : v(view) {
    if (v.outer == 0 || v.channels == 0 || v.inner == 0) return;  // no values: no chunks
    if (v.inner > 1) {  // planes: chunk q = piece (q % per_plane) of plane (q / per_plane)
      per_plane = (v.inner + kChunk - 1) / kChunk;
      piece = (v.inner + per_plane - 1) / per_plane;
      chunks = v.outer * v.channels * per_plane;
      per_channel = v.outer * per_plane;
    } else {  // channels-last rows: chunk q = rows [q * rows, (q + 1) * rows)
      rows = std::max<int64_t>(1, kChunk / v.channels);
      chunks = (v.outer + rows - 1) / rows;
      per_channel = chunks;
    }
  }
  bool by_rows() const { return v.inner == 1; }
  // Partial-result slots: one per chunk (planes) or one per (chunk, channel) (rows).
  int64_t slots() const { return by_rows() ? chunks * v.channels : chunks; }
  int64_t chunks_per_channel() const { return per_channel; }
  // Slot of the j-th chunk of channel c, j in the fixed merge order.
  int64_t slot(int64_t c, int64_t j) const {
    return by_rows() ? j * v.channels + c : ((j / per_plane) * v.channels + c) * per_plane + j % per_plane;
  }
  // Calls run(per_lane, offset, n, channel, slot) for every run of chunk q: a plane piece
  // (per_lane = false_type: one channel) or each row of a row block (true_type: channels 0..C-1).
  template <typename F>
  void for_each_run(int64_t q, F&& run) const {
    if (by_rows()) {
      const int64_t C = v.channels;
      for (int64_t r = q * rows, r1 = std::min(v.outer, (q + 1) * rows); r < r1; ++r)
        run(std::true_type{}, r * C, C, int64_t(0), q * C);
    } else {
      const int64_t p = q / per_plane, s0 = (q % per_plane) * piece, s1 = std::min(v.inner, s0 + piece);
      run(std::false_type{}, p * v.inner + s0, s1 - s0, p % v.channels, q);
    }
  }
  int64_t chunk_count(int64_t q) const {  // values per channel in chunk q
    if (by_rows()) return std::min(v.outer, (q + 1) * rows) - q * rows;
    const int64_t s0 = (q % per_plane) * piece;
    return std::min(v.inner, s0 + piece) - s0;
  }
};

// Elementwise passes: every run of the block, in parallel (no reductions, any split).
// Each task ends with a store fence when the runs stream their stores.
template <typename F>
void parallel_runs(const ChannelView& v, bool stream, F&& run) {
  const int64_t C = v.channels, S = v.inner;
  if (S == 1) {
    at::parallel_for(0, v.outer, std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) run(std::true_type{}, r * C, C, int64_t(0));
      stream_fence(stream);
    });
  } else {
    at::parallel_for(0, v.outer * C, std::max<int64_t>(1, kGrain / S), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) run(std::false_type{}, p * S, S, p % C);
      stream_fence(stream);
    });
  }
}

template <typename acc_t>
acc_t reduce_lanes(const Vectorized<acc_t>& a) {
  return at::vec::vec_reduce_all<acc_t>([](Vectorized<acc_t>& u, Vectorized<acc_t>& w) { return u + w; }, a);
}

// acc[lane] += d or d² (kSquare) with d = x - mean, over a run of n elements; without per-lane
// channels every element adds to acc[0].
template <bool kPerLane, bool kSquare, typename scalar_t>
void accumulate_run(const scalar_t* x, int64_t n, PerChannel<kPerLane, at::opmath_type<scalar_t>> mean,
                    at::opmath_type<scalar_t>* acc) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  auto value = [](auto d) { return kSquare ? d * d : d; };
  Vec s0(acc_t(0)), s1(acc_t(0));
  acc_t tail = 0;
  int64_t i = 0;
  for (; i + L::kStep <= n; i += L::kStep) {
    Vec x0, x1;
    L::load(x + i, x0, x1);
    const Vec v0 = value(x0 - mean.vec(i)), v1 = value(x1 - mean.vec(i + Vec::size()));
    if constexpr (kPerLane) {
      (Vec::loadu(acc + i) + v0).store(acc + i);
      (Vec::loadu(acc + i + Vec::size()) + v1).store(acc + i + Vec::size());
    } else {
      s0 = s0 + v0;
      s1 = s1 + v1;
    }
  }
  for (; i < n; ++i) {
    const acc_t v = value(static_cast<acc_t>(x[i]) - mean.at(i));
    if constexpr (kPerLane)
      acc[i] += v;
    else
      tail += v;
  }
  // runs shorter than a step (the planes of a late stage at small images: 2x2, 4x4) have no
  // vector sum to fold: the lane reduction, a dozen shuffles, cost more than the run itself
  if constexpr (!kPerLane) acc[0] += (n >= L::kStep ? reduce_lanes(s0 + s1) : acc_t(0)) + tail;
}

// s1[lane] += g', s2[lane] += g' (x - mean), g' = grad masked by the fused ReLU (out; null without it).
template <bool kPerLane, typename scalar_t>
void backward_sums_run(const scalar_t* g, const scalar_t* x, const scalar_t* out,
                       PerChannel<kPerLane, at::opmath_type<scalar_t>> mean, int64_t n, at::opmath_type<scalar_t>* s1,
                       at::opmath_type<scalar_t>* s2) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  Vec a0(acc_t(0)), a1(acc_t(0)), b0(acc_t(0)), b1(acc_t(0));
  acc_t ta = 0, tb = 0;
  int64_t i = 0;
  for (; i + L::kStep <= n; i += L::kStep) {
    Vec g0, g1, x0, x1;
    L::load_grad(g + i, offset_or_null(out, i), g0, g1);
    L::load(x + i, x0, x1);
    const Vec p0 = g0 * (x0 - mean.vec(i)), p1 = g1 * (x1 - mean.vec(i + Vec::size()));
    if constexpr (kPerLane) {
      (Vec::loadu(s1 + i) + g0).store(s1 + i);
      (Vec::loadu(s1 + i + Vec::size()) + g1).store(s1 + i + Vec::size());
      (Vec::loadu(s2 + i) + p0).store(s2 + i);
      (Vec::loadu(s2 + i + Vec::size()) + p1).store(s2 + i + Vec::size());
    } else {
      a0 = a0 + g0;
      a1 = a1 + g1;
      b0 = b0 + p0;
      b1 = b1 + p1;
    }
  }
  for (; i < n; ++i) {
    acc_t gi = static_cast<acc_t>(g[i]);
    if (out) gi = relu_backward(gi, static_cast<acc_t>(out[i]));
    const acc_t pi = gi * (static_cast<acc_t>(x[i]) - mean.at(i));
    if constexpr (kPerLane) {
      s1[i] += gi;
      s2[i] += pi;
    } else {
      ta += gi;
      tb += pi;
    }
  }
  if constexpr (!kPerLane) {
    const bool vectors = n >= L::kStep;  // as in accumulate_run
    s1[0] += (vectors ? reduce_lanes(a0 + a1) : acc_t(0)) + ta;
    s2[0] += (vectors ? reduce_lanes(b0 + b1) : acc_t(0)) + tb;
  }
}

// out = relu?(y + (x - mean) * scale + shift) over a run.
template <bool kPerLane, typename scalar_t>
void apply_run(const scalar_t* y, const scalar_t* x, const at::opmath_type<scalar_t>* const* coef, scalar_t* out,
               int64_t n, bool relu, bool stream) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const PerChannel<kPerLane, acc_t> mean{coef[0]}, scale{coef[1]}, shift{coef[2]};
  auto scalar = [&](int64_t i) {
    const acc_t o =
        bn_residual_forward(static_cast<acc_t>(y[i]), static_cast<acc_t>(x[i]), mean.at(i), scale.at(i), shift.at(i));
    out[i] = static_cast<scalar_t>(relu ? relu_forward(o) : o);
  };
  int64_t i = 0;
  for (const int64_t head = L::aligned_prefix(out, n, stream); i < head; ++i) scalar(i);
  for (; i + L::kStep <= n; i += L::kStep) {
    Vec y0, y1, x0, x1;
    L::load(y + i, y0, y1);
    L::load(x + i, x0, x1);
    const int64_t j = i + Vec::size();
    Vec o0 = bn_residual_forward(y0, x0, mean.vec(i), scale.vec(i), shift.vec(i));
    Vec o1 = bn_residual_forward(y1, x1, mean.vec(j), scale.vec(j), shift.vec(j));
    if (relu) {
      o0 = cpu::relu_forward(o0);
      o1 = cpu::relu_forward(o1);
    }
    L::store(out + i, o0, o1, stream);
  }
  for (; i < n; ++i) scalar(i);
}

// dx = k1 g' + k3 (x - mean) + k2 and dy = g' (only with the fused ReLU) over a run.
template <bool kPerLane, typename scalar_t>
void backward_apply_run(const scalar_t* g, const scalar_t* x, const scalar_t* out,
                        const at::opmath_type<scalar_t>* const* coef, scalar_t* dy, scalar_t* dx, int64_t n,
                        bool stream) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const PerChannel<kPerLane, acc_t> mean{coef[0]}, k1{coef[1]}, k2{coef[2]}, k3{coef[3]};
  auto scalar = [&](int64_t i) {
    acc_t gi = static_cast<acc_t>(g[i]);
    if (out) {
      gi = relu_backward(gi, static_cast<acc_t>(out[i]));
      dy[i] = static_cast<scalar_t>(gi);
    }
    dx[i] =
        static_cast<scalar_t>(bn_backward_dx(gi, static_cast<acc_t>(x[i]), mean.at(i), k1.at(i), k2.at(i), k3.at(i)));
  };
  int64_t i = 0;
  for (const int64_t head = L::aligned_prefix(dx, n, stream); i < head; ++i) scalar(i);
  for (; i + L::kStep <= n; i += L::kStep) {
    Vec g0, g1, x0, x1;
    L::load_grad(g + i, offset_or_null(out, i), g0, g1);
    L::load(x + i, x0, x1);
    if (out) L::store(dy + i, g0, g1, stream);
    const int64_t j = i + Vec::size();
    L::store(dx + i, bn_backward_dx(g0, x0, mean.vec(i), k1.vec(i), k2.vec(i), k3.vec(i)),
             bn_backward_dx(g1, x1, mean.vec(j), k1.vec(j), k2.vec(j), k3.vec(j)), stream);
  }
  for (; i < n; ++i) scalar(i);
}

// A (C,) tensor of any floating dtype and stride as acc_t values into v[0, C) (`absent` when None).
template <typename acc_t>
void read_channels(const std::optional<at::Tensor>& t, int64_t C, acc_t absent, acc_t* v) {
  if (!t.has_value()) {
    std::fill(v, v + C, absent);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "tsc_bn_read_channels", [&] {
    const scalar_t* p = t->const_data_ptr<scalar_t>();
    const int64_t stride = t->stride(0);
    for (int64_t c = 0; c < C; ++c) v[c] = static_cast<acc_t>(p[c * stride]);
  });
}

// Writes acc_t values v[0, C) into a (C,) tensor of any floating dtype and stride (in its dtype).
template <typename acc_t>
void write_channels(const at::Tensor& t, const acc_t* v, int64_t C) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "tsc_bn_write_channels", [&] {
    scalar_t* p = t.mutable_data_ptr<scalar_t>();
    const int64_t stride = t.stride(0);
    for (int64_t c = 0; c < C; ++c) p[c * stride] = static_cast<scalar_t>(v[c]);
  });
}

// n zeroed arrays of `len` values each (per channel, per lane or per partial slot) carved from one
// allocation: the op runs once per block of every step, and inside a training step each heap
// allocation is a cold malloc (a dozen vectors per call cost ~4 us of a CIFAR block's tail on the
// CPU; one costs a tenth).
template <typename acc_t>
struct ScratchArrays {
  std::vector<acc_t> buf;
  int64_t len;
  ScratchArrays(int64_t n, int64_t length) : buf(static_cast<size_t>(n * length), acc_t(0)), len(length) {}
  acc_t* operator[](int64_t i) { return buf.data() + i * len; }
};

// Training statistics of x per channel: moments per chunk (a sum pass, then M2 around the chunk's
// mean), merged per channel in chunk order; fills mean, invstd and the unbiased variance.
template <typename scalar_t, typename acc_t>
void batch_statistics(const ChannelView& v, const scalar_t* xp, int64_t count, acc_t eps, acc_t* mean, acc_t* invstd,
                      acc_t* unbiased) {
  const int64_t C = v.channels;
  const ChunkPlan plan(v);
  std::vector<Moments<acc_t>> partial(plan.slots());
  at::parallel_for(0, plan.chunks, 1, [&](int64_t q0, int64_t q1) {
    const int64_t lanes = plan.by_rows() ? C : 1;
    ScratchArrays<acc_t> lane(4, lanes);  // zeros: the mean of the sum pass
    acc_t *sum = lane[0], *chunk_mean = lane[1], *m2 = lane[2], *zeros = lane[3];
    for (int64_t q = q0; q < q1; ++q) {
      std::fill(sum, sum + lanes, acc_t(0));
      std::fill(m2, m2 + lanes, acc_t(0));
      plan.for_each_run(q, [&](auto per_lane, int64_t o, int64_t n, int64_t, int64_t) {
        constexpr bool kPerLane = decltype(per_lane)::value;
        accumulate_run<kPerLane, false>(xp + o, n, PerChannel<kPerLane, acc_t>{zeros}, sum);
      });
      const acc_t chunk_count = static_cast<acc_t>(plan.chunk_count(q));
      for (int64_t l = 0; l < lanes; ++l) chunk_mean[l] = sum[l] / chunk_count;
      plan.for_each_run(q, [&](auto per_lane, int64_t o, int64_t n, int64_t, int64_t) {
        constexpr bool kPerLane = decltype(per_lane)::value;
        accumulate_run<kPerLane, true>(xp + o, n, PerChannel<kPerLane, acc_t>{chunk_mean}, m2);
      });
      const int64_t first = plan.by_rows() ? q * C : q;
      for (int64_t l = 0; l < lanes; ++l) partial[first + l] = {chunk_count, chunk_mean[l], m2[l]};
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    Moments<acc_t> m{acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t j = 0, J = plan.chunks_per_channel(); j < J; ++j) merge_moments(m, partial[plan.slot(c, j)]);
    mean[c] = m.mean;
    invstd[c] = bn_invstd(m.m2 / static_cast<acc_t>(count), eps);
    unbiased[c] = m.m2 / static_cast<acc_t>(count - 1);
  }
}

// running = (1 - momentum) running + momentum batch, for the mean and the unbiased variance, in
// place; `scratch` holds 2 C values.
template <typename acc_t>
void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var, const acc_t* mean,
                          const acc_t* unbiased, int64_t C, double momentum, acc_t* scratch) {
  const acc_t mom = static_cast<acc_t>(momentum);
  acc_t *rm = scratch, *rv = scratch + C;
  read_channels<acc_t>(running_mean, C, 0, rm);
  read_channels<acc_t>(running_var, C, 0, rv);
  for (int64_t c = 0; c < C; ++c) {
    rm[c] = running_update(rm[c], mean[c], mom);
    rv[c] = running_update(rv[c], unbiased[c], mom);
  }
  write_channels(running_mean, rm, C);
  write_channels(running_var, rv, C);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_residual_update_cpu(
    const at::Tensor& y_in, const at::Tensor& x_in, const at::Tensor& dt_in,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool training, double momentum,
    double eps, bool relu) {
  BnForwardArgs a = prepare_bn_forward(y_in, x_in, dt_in, running_mean, running_var, weight, bias, training);
  const ChannelView v = a.view;
  const int64_t C = v.channels;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.y.scalar_type(), "tsc_batch_norm_residual_update_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
        // mean and invstd are the saved statistics themselves (acc_t, contiguous (C,))
        acc_t* mean = a.save_mean.mutable_data_ptr<acc_t>();
        acc_t* invstd = a.save_invstd.mutable_data_ptr<acc_t>();
        // 0 dt, 1 gamma, 2 beta, 3 scale, 4 shift (3-4 first hold the running statistics' update),
        // 5 the batch's unbiased variance (training) or the running variance (eval)
        ScratchArrays<acc_t> arr(6, C);
        if (training) {
          acc_t* unbiased = arr[5];
          batch_statistics(v, xp, a.count, static_cast<acc_t>(eps), mean, invstd, unbiased);
          if (running_mean.has_value())
            update_running_stats(*running_mean, *running_var, mean, unbiased, C, momentum, arr[3]);
        } else {
          read_channels<acc_t>(running_mean, C, 0, mean);
          acc_t* var = arr[5];
          read_channels<acc_t>(running_var, C, 0, var);
          for (int64_t c = 0; c < C; ++c) invstd[c] = bn_invstd(var[c], static_cast<acc_t>(eps));
        }
        if (a.y.numel() == 0) return;

        acc_t *dt = arr[0], *gamma = arr[1], *beta = arr[2], *scale = arr[3], *shift = arr[4];
        read_channels<acc_t>(a.dt, C, 0, dt);
        read_channels<acc_t>(weight, C, 1, gamma);
        read_channels<acc_t>(bias, C, 0, beta);
        for (int64_t c = 0; c < C; ++c) {
          const BnApply<acc_t> k = bn_apply_coefficients(dt[c], gamma[c], beta[c], invstd[c]);
          scale[c] = k.scale;
          shift[c] = k.shift;
        }
        const bool stream = Lanes<scalar_t>::kCanStream && a.y.nbytes() >= kStreamBytes;
        const scalar_t* yp = a.y.const_data_ptr<scalar_t>();
        scalar_t* op = a.out.mutable_data_ptr<scalar_t>();
        parallel_runs(v, stream, [&](auto per_lane, int64_t o, int64_t n, int64_t c) {
          const acc_t* coef[3] = {mean + c, scale + c, shift + c};
          apply_run<decltype(per_lane)::value>(yp + o, xp + o, coef, op + o, n, relu, stream);
        });
      });
  return {a.out, a.save_mean, a.save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_residual_update_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& dt_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_invstd,
    const std::optional<at::Tensor>& relu_out, bool training) {
  BnBackwardArgs a = prepare_bn_backward(grad_in, x_in, dt_in, weight, bias, save_mean, save_invstd, relu_out);
  const ChannelView v = a.view;
  const int64_t C = v.channels;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.x.scalar_type(), "tsc_batch_norm_residual_update_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* gp = a.g.const_data_ptr<scalar_t>();
        const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
        const scalar_t* outp = a.relu ? a.relu_out.const_data_ptr<scalar_t>() : nullptr;
        const acc_t* mean = a.save_mean.const_data_ptr<acc_t>();
        const acc_t* invstd = a.save_invstd.const_data_ptr<acc_t>();

        // Reduction: S1, S2c per chunk (zeroed slots), then summed per channel in chunk order.
        const ChunkPlan plan(v);
        ScratchArrays<acc_t> partials(2, plan.slots());
        acc_t *p1 = partials[0], *p2 = partials[1];
        at::parallel_for(0, plan.chunks, 1, [&](int64_t q0, int64_t q1) {
          for (int64_t q = q0; q < q1; ++q)
            plan.for_each_run(q, [&](auto per_lane, int64_t o, int64_t n, int64_t c, int64_t slot) {
              constexpr bool kPerLane = decltype(per_lane)::value;
              backward_sums_run<kPerLane>(gp + o, xp + o, offset_or_null(outp, o),
                                          PerChannel<kPerLane, acc_t>{mean + c}, n, &p1[slot], &p2[slot]);
            });
        });
        ScratchArrays<acc_t> arr(6, C);
        acc_t *dt = arr[0], *gamma = arr[1], *beta = arr[2], *k1 = arr[3], *k2 = arr[4], *k3 = arr[5];
        read_channels<acc_t>(a.dt, C, 0, dt);
        read_channels<acc_t>(weight, C, 1, gamma);
        read_channels<acc_t>(bias, C, 0, beta);
        acc_t* ddt = a.ddt.mutable_data_ptr<acc_t>();
        acc_t* dw = weight.has_value() ? a.dweight.mutable_data_ptr<acc_t>() : nullptr;
        acc_t* db = bias.has_value() ? a.dbias.mutable_data_ptr<acc_t>() : nullptr;
        for (int64_t c = 0; c < C; ++c) {
          acc_t s1 = 0, s2c = 0;
          for (int64_t j = 0, J = plan.chunks_per_channel(); j < J; ++j) {
            s1 += p1[plan.slot(c, j)];
            s2c += p2[plan.slot(c, j)];
          }
          const BnBackward<acc_t> r = bn_backward_coefficients(dt[c], gamma[c], beta[c], invstd[c], s1, s2c,
                                                               static_cast<acc_t>(a.count), training);
          k1[c] = r.k1;
          k2[c] = r.k2;
          k3[c] = r.k3;
          ddt[c] = r.ddt;
          if (dw) dw[c] = r.dweight;
          if (db) db[c] = r.dbias;
        }
        if (a.x.numel() == 0) return;

        const bool stream = Lanes<scalar_t>::kCanStream && a.x.nbytes() >= kStreamBytes;
        scalar_t* dxp = a.dx.mutable_data_ptr<scalar_t>();
        scalar_t* dyp = a.relu ? a.dy.mutable_data_ptr<scalar_t>() : nullptr;
        parallel_runs(v, stream, [&](auto per_lane, int64_t o, int64_t n, int64_t c) {
          const acc_t* coef[4] = {mean + c, k1 + c, k2 + c, k3 + c};
          backward_apply_run<decltype(per_lane)::value>(gp + o, xp + o, offset_or_null(outp, o), coef,
                                                        offset_or_null(dyp, o), dxp + o, n, stream);
        });
      });
  return {bn_dy_in_layout(a.dy, a.dy_channels_last), a.dx, a.ddt, a.dweight, a.dbias};
}

}  // namespace

// The schemas of tsc::batch_norm_residual_update and its backward, the same text as the OpDef in
// tsc_kernels/ops/batch_norm_residual_update.py (tests/test_op_list.py compares them, parsed).
TORCH_LIBRARY_FRAGMENT(tsc, m) {
  // Fused BatchNorm tail (docs/ops.md): out = relu?(y + dt[c] * batch_norm(x)), returns (out,
  // save_mean, save_invstd); running statistics updated in place in training, as F.batch_norm.
  m.def(
      "batch_norm_residual_update(Tensor y, Tensor x, Tensor dt, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor? weight, Tensor? bias, bool training, float momentum, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  // Backward: one per-channel reduction and one elementwise pass: (dy, dx, ddt, dweight, dbias);
  // dy is empty without the fused ReLU (it is grad itself), dweight / dbias empty without affine.
  m.def(
      "batch_norm_residual_update_backward(Tensor grad, Tensor x, Tensor dt, Tensor? weight, Tensor? bias, "
      "Tensor save_mean, Tensor save_invstd, Tensor? relu_out, bool training) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tsc, CPU, m) {
  m.impl("batch_norm_residual_update", &batch_norm_residual_update_cpu);
  m.impl("batch_norm_residual_update_backward", &batch_norm_residual_update_backward_cpu);
}

}  // namespace tsc
