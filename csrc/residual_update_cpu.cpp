// CPU kernels of the fused residual update (SPEC.md §2), registered for the CPU dispatch key.
//
// Forward: one pass reading y and f, writing out. Backward: one pass reading grad and f (and the
// forward output when the ReLU is fused), writing df and reducing ddt[c] = sum(grad' * f) in the
// accumulation type. The ddt reduction is deterministic: the work split does not depend on the
// number of threads, and partial sums are added in a fixed order.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/OpMathType.h>
#include <torch/all.h>

#include <vector>

#include "residual_layout.h"
#include "residual_math.h"

namespace tsc {
namespace {

using at::vec::Vectorized;

// Lanes of the accumulation type, loaded from / stored to scalar_t in pairs of vectors so that
// fp16/bf16 (whose Vectorized holds twice as many lanes as Vectorized<float>) convert in one go.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
struct Lanes {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * Vec::size();
  static void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + Vec::size());
    } else {
      at::vec::load_to_float<scalar_t>(p, a, b);
    }
  }
  static void store(scalar_t* p, const Vec& a, const Vec& b) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      a.store(p);
      b.store(p + Vec::size());
    } else {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    }
  }
};

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

// out[i] = y[i] + f[i] * dt for a run of n elements sharing one dt (channel-first layout).
template <typename scalar_t, typename acc_t>
void forward_run_scalar_dt(const scalar_t* y, const scalar_t* f, acc_t dt, scalar_t* out, int64_t n, bool relu) {
  using L = Lanes<scalar_t>;
  const typename L::Vec dtv(dt);
  int64_t i = 0;
  for (; i + L::kStep <= n; i += L::kStep) {
    typename L::Vec y0, y1, f0, f1;
    L::load(y + i, y0, y1);
    L::load(f + i, f0, f1);
    auto o0 = residual_forward(y0, f0, dtv), o1 = residual_forward(y1, f1, dtv);
    if (relu) { o0 = relu_forward(o0); o1 = relu_forward(o1); }
    L::store(out + i, o0, o1);
  }
  for (; i < n; ++i) {
    acc_t o = residual_forward(static_cast<acc_t>(y[i]), static_cast<acc_t>(f[i]), dt);
    out[i] = static_cast<scalar_t>(relu ? tsc::relu_forward(o) : o);
  }
}

// One row of a channels-last tensor: out[c] = y[c] + f[c] * dt[c].
template <typename scalar_t, typename acc_t>
void forward_row(const scalar_t* y, const scalar_t* f, const acc_t* dt, scalar_t* out, int64_t C, bool relu) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  int64_t c = 0;
  for (; c + L::kStep <= C; c += L::kStep) {
    Vec y0, y1, f0, f1;
    L::load(y + c, y0, y1);
    L::load(f + c, f0, f1);
    auto o0 = residual_forward(y0, f0, Vec::loadu(dt + c));
    auto o1 = residual_forward(y1, f1, Vec::loadu(dt + c + Vec::size()));
    if (relu) { o0 = relu_forward(o0); o1 = relu_forward(o1); }
    L::store(out + c, o0, o1);
  }
  for (; c < C; ++c) {
    acc_t o = residual_forward(static_cast<acc_t>(y[c]), static_cast<acc_t>(f[c]), dt[c]);
    out[c] = static_cast<scalar_t>(relu ? tsc::relu_forward(o) : o);
  }
}

// Backward over a run of n elements sharing one dt: df = g' * dt, returns sum(g' * f) where
// g' = grad masked by the fused ReLU (read from the forward output `out`, null when relu is off);
// with the ReLU, dy = g' is written too (without it dy is grad itself and nothing is written).
template <typename scalar_t, typename acc_t>
acc_t backward_run_scalar_dt(const scalar_t* g, const scalar_t* f, const scalar_t* out, acc_t dt, scalar_t* dy, scalar_t* df, int64_t n) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  const Vec dtv(dt);
  Vec s0(acc_t(0)), s1(acc_t(0));
  int64_t i = 0;
  for (; i + L::kStep <= n; i += L::kStep) {
    Vec g0, g1, f0, f1;
    L::load(g + i, g0, g1);
    L::load(f + i, f0, f1);
    if (out) {
      Vec o0, o1;
      L::load(out + i, o0, o1);
      g0 = relu_backward(g0, o0);
      g1 = relu_backward(g1, o1);
      L::store(dy + i, g0, g1);
    }
    L::store(df + i, g0 * dtv, g1 * dtv);
    s0 = at::vec::fmadd(g0, f0, s0);
    s1 = at::vec::fmadd(g1, f1, s1);
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, s0 + s1);
  for (; i < n; ++i) {
    acc_t gi = static_cast<acc_t>(g[i]);
    if (out) {
      gi = tsc::relu_backward(gi, static_cast<acc_t>(out[i]));
      dy[i] = static_cast<scalar_t>(gi);
    }
    df[i] = static_cast<scalar_t>(gi * dt);
    sum += gi * static_cast<acc_t>(f[i]);
  }
  return sum;
}

// Backward over one channels-last row: df[c] = g'[c] * dt[c], partial[c] += g'[c] * f[c] (dy as above).
template <typename scalar_t, typename acc_t>
void backward_row(const scalar_t* g, const scalar_t* f, const scalar_t* out, const acc_t* dt, scalar_t* dy, scalar_t* df, acc_t* partial, int64_t C) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  int64_t c = 0;
  for (; c + L::kStep <= C; c += L::kStep) {
    Vec g0, g1, f0, f1;
    L::load(g + c, g0, g1);
    L::load(f + c, f0, f1);
    if (out) {
      Vec o0, o1;
      L::load(out + c, o0, o1);
      g0 = relu_backward(g0, o0);
      g1 = relu_backward(g1, o1);
      L::store(dy + c, g0, g1);
    }
    L::store(df + c, g0 * Vec::loadu(dt + c), g1 * Vec::loadu(dt + c + Vec::size()));
    at::vec::fmadd(g0, f0, Vec::loadu(partial + c)).store(partial + c);
    at::vec::fmadd(g1, f1, Vec::loadu(partial + c + Vec::size())).store(partial + c + Vec::size());
  }
  for (; c < C; ++c) {
    acc_t gc = static_cast<acc_t>(g[c]);
    if (out) {
      gc = tsc::relu_backward(gc, static_cast<acc_t>(out[c]));
      dy[c] = static_cast<scalar_t>(gc);
    }
    df[c] = static_cast<scalar_t>(gc * dt[c]);
    partial[c] += gc * static_cast<acc_t>(f[c]);
  }
}

// Elements per parallel task: large enough to amortise scheduling, small enough to split
// (8,256,56,56) across cores.
constexpr int64_t kGrain = 32768;

at::Tensor residual_update_cpu(const at::Tensor& y_in, const at::Tensor& f_in, const at::Tensor& dt_in, bool relu) {
  check_residual_args(y_in, f_in, dt_in);
  const bool cl = is_channels_last_like(y_in);
  const at::Tensor y = to_layout(y_in, cl), f = to_layout(f_in, cl), dt = dt_in.contiguous();
  at::Tensor out = at::empty_like(y);
  const ChannelView v = channel_view(y, cl);
  if (y.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "tsc_residual_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const acc_t* dtp = dt.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    if (v.inner == 1) {  // rows of C channels
      const int64_t C = v.channels;
      at::parallel_for(0, v.outer, std::max<int64_t>(1, kGrain / C), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) forward_row(yp + r * C, fp + r * C, dtp, op + r * C, C, relu);
      });
    } else {  // planes of `inner` elements sharing one dt
      const int64_t S = v.inner, C = v.channels;
      at::parallel_for(0, v.outer * C, std::max<int64_t>(1, kGrain / S), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
          forward_run_scalar_dt(yp + p * S, fp + p * S, dtp[p % C], op + p * S, S, relu);
      });
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_update_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& f_in, const at::Tensor& dt_in, const std::optional<at::Tensor>& relu_out) {
  check_residual_args(f_in, grad_in, dt_in);
  const bool relu = relu_out.has_value();
  TORCH_CHECK(!relu || relu_out->sizes() == f_in.sizes(), "tsc::residual_update_backward: relu_out must have f's shape");
  const bool cl = is_channels_last_like(f_in);
  const at::Tensor f = to_layout(f_in, cl), g = to_layout(grad_in, cl), dt = dt_in.contiguous();
  const at::Tensor out = relu ? to_layout(*relu_out, cl) : at::Tensor();
  at::Tensor df = at::empty_like(f);
  at::Tensor dy = relu ? at::empty_like(f) : at::empty({0}, f.options());
  at::Tensor ddt = at::zeros_like(dt);
  const ChannelView v = channel_view(f, cl);
  if (f.numel() == 0) return {dy, df, ddt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "tsc_residual_update_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const scalar_t* outp = relu ? out.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* dtp = dt.const_data_ptr<acc_t>();
    scalar_t* dfp = df.mutable_data_ptr<scalar_t>();
    scalar_t* dyp = relu ? dy.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* ddtp = ddt.mutable_data_ptr<acc_t>();
    const int64_t C = v.channels;
    if (v.inner == 1) {
      // Rows split into fixed chunks; each chunk sums into its own partial row, and the partial
      // rows are then added in chunk order: bitwise the same result for any thread count.
      const int64_t rows_per_chunk = std::max<int64_t>(1, kGrain / C);
      const int64_t chunks = (v.outer + rows_per_chunk - 1) / rows_per_chunk;
      std::vector<acc_t> partial(chunks * C, acc_t(0));
      at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t r_end = std::min(v.outer, (k + 1) * rows_per_chunk);
          for (int64_t r = k * rows_per_chunk; r < r_end; ++r) {
            const int64_t o = r * C;
            backward_row(gp + o, fp + o, outp ? outp + o : nullptr, dtp, dyp ? dyp + o : nullptr, dfp + o, partial.data() + k * C, C);
          }
        }
      });
      for (int64_t k = 0; k < chunks; ++k)
        for (int64_t c = 0; c < C; ++c) ddtp[c] += partial[k * C + c];
    } else {
      // Each task owns whole channels: it visits the channel's plane in every sample, so ddt[c]
      // is summed by one thread in sample order.
      const int64_t S = v.inner, N = v.outer;
      at::parallel_for(0, C, std::max<int64_t>(1, kGrain / (S * std::max<int64_t>(N, 1))), [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          acc_t sum = 0;
          for (int64_t n = 0; n < N; ++n) {
            const int64_t o = (n * C + c) * S;
            sum += backward_run_scalar_dt(gp + o, fp + o, outp ? outp + o : nullptr, dtp[c], dyp ? dyp + o : nullptr, dfp + o, S);
          }
          ddtp[c] = sum;
        }
      });
    }
  });
  return {dy, df, ddt};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, CPU, m) {
  m.impl("residual_update", &residual_update_cpu);
  m.impl("residual_update_backward", &residual_update_backward_cpu);
}

}  // namespace tsc
