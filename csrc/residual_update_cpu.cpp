// CPU kernels of the fused residual update (docs/ops.md), registered for the CPU dispatch key.
//
// Forward: one pass reading y and f, writing out. Backward: one pass reading grad and f (and the
// forward output when the ReLU is fused), writing df (and dy = masked grad with the ReLU) and
// reducing ddt[c] = sum(grad' * f) in the accumulation type. The ddt reduction is deterministic:
// the work split does not depend on the number of threads, and partial sums are added in a fixed
// order.
//
// The op is memory-bound. Outputs larger than the last-level cache are written with non-temporal
// (streaming) stores on AVX2 builds: a normal store first reads the destination line, so this
// cuts the traffic of the forward pass from 4N to 3N element transfers (and likewise backward).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/all.h>

#include <cstdint>
#include <vector>

#include "cpu_vec.h"
#include "residual_update_layout.h"
#include "residual_update_math.h"

namespace tsc {
namespace {

using at::vec::Vectorized;
using cpu::kGrain;
using cpu::kStreamBytes;
using cpu::Lanes;
using cpu::offset_or_null;
using cpu::relu_forward;
using cpu::stream_fence;
template <bool kPerLane, typename acc_t>
using StepSize = cpu::PerChannel<kPerLane, acc_t>;

// out[i] = relu?(y[i] + f[i] * dt) over a run of n elements.
template <bool kPerLane, typename scalar_t>
void forward_run(const scalar_t* y, const scalar_t* f, StepSize<kPerLane, at::opmath_type<scalar_t>> dt, scalar_t* out,
                 int64_t n, bool relu, bool stream) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  auto scalar = [&](int64_t i) {
    acc_t o = residual_forward(static_cast<acc_t>(y[i]), static_cast<acc_t>(f[i]), dt.at(i));
    out[i] = static_cast<scalar_t>(relu ? tsc::relu_forward(o) : o);
  };
  int64_t i = 0;
  for (const int64_t head = L::aligned_prefix(out, n, stream); i < head; ++i) scalar(i);
  for (; i + L::kStep <= n; i += L::kStep) {
    Vec y0, y1, f0, f1;
    L::load(y + i, y0, y1);
    L::load(f + i, f0, f1);
    auto o0 = residual_forward(y0, f0, dt.vec(i)), o1 = residual_forward(y1, f1, dt.vec(i + Vec::size()));
    if (relu) {
      o0 = relu_forward(o0);
      o1 = relu_forward(o1);
    }
    L::store(out + i, o0, o1, stream);
  }
  for (; i < n; ++i) scalar(i);
}

// Backward over a run: df = g' * dt and the products g' * f, where g' = grad masked by the fused
// ReLU (read from the forward output `out`; null when the ReLU is off, and then dy is not written
// since it is grad itself). The products are summed into `sum(i, value)`: one scalar per channel
// plane, or partial[c] along a channels-last row.
template <bool kPerLane, typename scalar_t, typename Sum, typename VecSum>
void backward_run(const scalar_t* g, const scalar_t* f, const scalar_t* out,
                  StepSize<kPerLane, at::opmath_type<scalar_t>> dt, scalar_t* dy, scalar_t* df, int64_t n, bool stream,
                  Sum sum, VecSum vec_sum) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  auto scalar = [&](int64_t i) {
    acc_t gi = static_cast<acc_t>(g[i]);
    if (out) {
      gi = tsc::relu_backward(gi, static_cast<acc_t>(out[i]));
      dy[i] = static_cast<scalar_t>(gi);
    }
    df[i] = static_cast<scalar_t>(gi * dt.at(i));
    sum(i, gi * static_cast<acc_t>(f[i]));
  };
  int64_t i = 0;
  for (const int64_t head = L::aligned_prefix(df, n, stream); i < head; ++i) scalar(i);
  for (; i + L::kStep <= n; i += L::kStep) {
    Vec g0, g1, f0, f1;
    L::load_grad(g + i, offset_or_null(out, i), g0, g1);
    L::load(f + i, f0, f1);
    if (out) L::store(dy + i, g0, g1, stream);
    L::store(df + i, g0 * dt.vec(i), g1 * dt.vec(i + Vec::size()), stream);
    vec_sum(i, g0 * f0, g1 * f1);
  }
  for (; i < n; ++i) scalar(i);
}

at::Tensor residual_update_cpu(const at::Tensor& y_in, const at::Tensor& f_in, const at::Tensor& dt_in, bool relu) {
  ForwardArgs a = prepare_forward(y_in, f_in, dt_in);
  const at::Tensor &y = a.y, &f = a.f, &dt = a.dt;
  const at::Tensor& out = a.out;
  const ChannelView v = a.view;
  if (y.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "tsc_residual_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool stream = Lanes<scalar_t>::kCanStream && y.nbytes() >= kStreamBytes;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const acc_t* dtp = dt.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t C = v.channels, S = v.inner;
    if (S == 1) {  // rows of C channels
      at::parallel_for(0, v.outer, std::max<int64_t>(1, kGrain / C), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          forward_run<true>(yp + r * C, fp + r * C, StepSize<true, acc_t>{dtp}, op + r * C, C, relu, stream);
        stream_fence(stream);
      });
    } else {  // planes of S elements sharing one dt
      at::parallel_for(0, v.outer * C, std::max<int64_t>(1, kGrain / S), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
          forward_run<false>(yp + p * S, fp + p * S, StepSize<false, acc_t>{dtp + p % C}, op + p * S, S, relu, stream);
        stream_fence(stream);
      });
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_update_backward_cpu(const at::Tensor& grad_in,
                                                                            const at::Tensor& f_in,
                                                                            const at::Tensor& dt_in,
                                                                            const std::optional<at::Tensor>& relu_out) {
  BackwardArgs a = prepare_backward(grad_in, f_in, dt_in, relu_out);
  const at::Tensor &f = a.f, &g = a.g, &dt = a.dt, &out = a.relu_out;
  const at::Tensor &dy = a.dy, &df = a.df, &ddt = a.ddt;
  const ChannelView v = a.view;
  const bool relu = a.relu;
  if (f.numel() == 0) return {dy, df, ddt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "tsc_residual_update_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    const bool stream = Lanes<scalar_t>::kCanStream && f.nbytes() >= kStreamBytes;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const scalar_t* outp = relu ? out.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* dtp = dt.const_data_ptr<acc_t>();
    scalar_t* dfp = df.mutable_data_ptr<scalar_t>();
    scalar_t* dyp = relu ? dy.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* ddtp = ddt.mutable_data_ptr<acc_t>();
    const int64_t C = v.channels, S = v.inner;
    if (S == 1) {
      // Rows split into fixed chunks; each chunk sums into its own partial row, and the partial
      // rows are then added in chunk order: bitwise the same result for any thread count.
      const int64_t rows_per_chunk = std::max<int64_t>(1, kGrain / C);
      const int64_t chunks = (v.outer + rows_per_chunk - 1) / rows_per_chunk;
      std::vector<acc_t> partial(chunks * C, acc_t(0));
      at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          acc_t* part = partial.data() + k * C;
          auto sum = [part](int64_t c, acc_t x) { part[c] += x; };
          auto vec_sum = [part](int64_t c, const Vec& a, const Vec& b) {
            (Vec::loadu(part + c) + a).store(part + c);
            (Vec::loadu(part + c + Vec::size()) + b).store(part + c + Vec::size());
          };
          for (int64_t r = k * rows_per_chunk, r_end = std::min(v.outer, (k + 1) * rows_per_chunk); r < r_end; ++r) {
            const int64_t o = r * C;
            backward_run<true>(gp + o, fp + o, offset_or_null(outp, o), StepSize<true, acc_t>{dtp},
                               offset_or_null(dyp, o), dfp + o, C, stream, sum, vec_sum);
          }
        }
        stream_fence(stream);
      });
      for (int64_t c = 0; c < C; ++c) ddtp[c] = partial[c];
      for (int64_t k = 1; k < chunks; ++k)
        for (int64_t c = 0; c < C; ++c) ddtp[c] += partial[k * C + c];
    } else {
      // Each task owns whole channels: it visits the channel's plane in every sample, so ddt[c]
      // is summed by one thread in sample order.
      const int64_t N = v.outer;
      at::parallel_for(0, C, std::max<int64_t>(1, kGrain / (S * std::max<int64_t>(N, 1))), [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          acc_t tail = 0;
          Vec s0(acc_t(0)), s1(acc_t(0));
          auto sum = [&tail](int64_t, acc_t x) { tail += x; };
          auto vec_sum = [&s0, &s1](int64_t, const Vec& a, const Vec& b) {
            s0 = s0 + a;
            s1 = s1 + b;
          };
          for (int64_t n = 0; n < N; ++n) {
            const int64_t o = (n * C + c) * S;
            backward_run<false>(gp + o, fp + o, offset_or_null(outp, o), StepSize<false, acc_t>{dtp + c},
                                offset_or_null(dyp, o), dfp + o, S, stream, sum, vec_sum);
          }
          ddtp[c] = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, s0 + s1) + tail;
        }
        stream_fence(stream);
      });
    }
  });
  return {dy, df, ddt};
}

}  // namespace

// The schemas of tsc::residual_update and its backward, the same text as the OpDef in
// tsc_kernels/ops/residual_update.py (tests/test_op_list.py compares them, parsed).
TORCH_LIBRARY_FRAGMENT(tsc, m) {
  // Residual update (docs/ops.md): out = y + f * dt[c], ReLU fused when relu.
  m.def("residual_update(Tensor y, Tensor f, Tensor dt, bool relu) -> Tensor");
  // Backward in one pass: (dy, df, ddt). relu_out is the forward output when the ReLU was fused;
  // then dy is the gradient masked by the ReLU. Without it dy is the incoming gradient itself, so
  // the op returns an empty (0,) tensor there instead of copying it.
  m.def("residual_update_backward(Tensor grad, Tensor f, Tensor dt, Tensor? relu_out) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tsc, CPU, m) {
  m.impl("residual_update", &residual_update_cpu);
  m.impl("residual_update_backward", &residual_update_backward_cpu);
}

}  // namespace tsc
