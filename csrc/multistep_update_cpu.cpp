// CPU kernels of the linear multi-step update (docs/ops.md, multistep_update), CPU dispatch key.
//
// Forward: one pass reading u, u_prev, f, writing out. Backward: one pass reading grad, u, u_prev,
// f (and out with the fused ReLU), writing du, du_prev, df and a (N, C) table of partial sums,
// then a small fixed-order reduction of the table into dk, ddt and dkeep. Tasks own whole
// (sample, channel) planes (channel-first) or whole samples (channels-last), so every partial sum
// is added by one thread in index order: the gradients are the same for any thread count.
// The per-element arithmetic is multistep_update_math.h's, which the CUDA kernels share; here it
// runs on at::vec lanes (cpu_vec.h), with streaming stores for outputs larger than the cache, as
// in residual_update_cpu.cpp.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/all.h>

#include <vector>

#include "cpu_vec.h"
#include "multistep_update_layout.h"
#include "multistep_update_math.h"

namespace tsc {
namespace {

using at::vec::Vectorized;
using cpu::kGrain;
using cpu::kStreamBytes;
using cpu::Lanes;
using cpu::offset_or_null;
using cpu::stream_fence;
template <bool kPerLane, typename acc_t>
using Scale = cpu::PerChannel<kPerLane, acc_t>;

template <typename T>
const T* optional_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// scales[n*C + c] = keep[n] * dt[c], the factor of f, for every (sample, channel).
template <typename acc_t>
std::vector<acc_t> scale_table(const acc_t* dt, const acc_t* keep, int64_t N, int64_t C) {
  std::vector<acc_t> scales(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) scales[n * C + c] = multistep_scale(dt, keep, n, c);
  return scales;
}

// out[i] = relu?((1 - k) u[i] + k u_prev[i] + scale f[i]) over a run of n elements.
template <bool kPerLane, typename scalar_t>
void forward_run(const scalar_t* u, const scalar_t* up, const scalar_t* f, at::opmath_type<scalar_t> k,
                 Scale<kPerLane, at::opmath_type<scalar_t>> scale, scalar_t* out, int64_t n, bool relu, bool stream) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  auto scalar = [&](int64_t i) {
    const acc_t o = multistep_forward(static_cast<acc_t>(u[i]), static_cast<acc_t>(up[i]), static_cast<acc_t>(f[i]), k,
                                      scale.at(i));
    out[i] = static_cast<scalar_t>(relu ? relu_forward(o) : o);
  };
  const Vec kv(k);
  int64_t i = 0;
  for (const int64_t head = L::aligned_prefix(out, n, stream); i < head; ++i) scalar(i);
  for (; i + L::kStep <= n; i += L::kStep) {
    Vec u0, u1, p0, p1, f0, f1;
    L::load(u + i, u0, u1);
    L::load(up + i, p0, p1);
    L::load(f + i, f0, f1);
    Vec o0 = multistep_forward(u0, p0, f0, kv, scale.vec(i)),
        o1 = multistep_forward(u1, p1, f1, kv, scale.vec(i + Vec::size()));
    if (relu) {
      o0 = cpu::relu_forward(o0);
      o1 = cpu::relu_forward(o1);
    }
    L::store(out + i, o0, o1, stream);
  }
  for (; i < n; ++i) scalar(i);
}

// Backward over a run: du, du_prev, df of every element (grad masked by the fused ReLU, read from
// the forward output `out`, null without it) and the products g'(u_prev - u) and g' f, summed by
// `sum(i, dk_term, gf_term)` / `vec_sum(i, dk0, dk1, gf0, gf1)`.
template <bool kPerLane, typename scalar_t, typename Sum, typename VecSum>
void backward_run(const scalar_t* g, const scalar_t* u, const scalar_t* up, const scalar_t* f, const scalar_t* out,
                  at::opmath_type<scalar_t> k, Scale<kPerLane, at::opmath_type<scalar_t>> scale, scalar_t* du,
                  scalar_t* dup, scalar_t* df, int64_t n, bool stream, Sum sum, VecSum vec_sum) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  auto scalar = [&](int64_t i) {
    acc_t gi = static_cast<acc_t>(g[i]);
    if (out) gi = relu_backward(gi, static_cast<acc_t>(out[i]));
    const auto r = multistep_backward(gi, static_cast<acc_t>(u[i]), static_cast<acc_t>(up[i]), static_cast<acc_t>(f[i]),
                                      k, scale.at(i));
    du[i] = static_cast<scalar_t>(r.du);
    dup[i] = static_cast<scalar_t>(r.du_prev);
    df[i] = static_cast<scalar_t>(r.df);
    sum(i, r.dk_term, r.gf_term);
  };
  const Vec kv(k);
  int64_t i = 0;
  for (const int64_t head = L::aligned_prefix(du, n, stream); i < head; ++i) scalar(i);
  for (; i + L::kStep <= n; i += L::kStep) {
    Vec g0, g1, u0, u1, p0, p1, f0, f1;
    L::load_grad(g + i, offset_or_null(out, i), g0, g1);
    L::load(u + i, u0, u1);
    L::load(up + i, p0, p1);
    L::load(f + i, f0, f1);
    const auto r0 = multistep_backward(g0, u0, p0, f0, kv, scale.vec(i));
    const auto r1 = multistep_backward(g1, u1, p1, f1, kv, scale.vec(i + Vec::size()));
    L::store(du + i, r0.du, r1.du, stream);
    L::store(dup + i, r0.du_prev, r1.du_prev, stream);
    L::store(df + i, r0.df, r1.df, stream);
    vec_sum(i, r0.dk_term, r1.dk_term, r0.gf_term, r1.gf_term);
  }
  for (; i < n; ++i) scalar(i);
}

at::Tensor multistep_update_cpu(const at::Tensor& u_in, const at::Tensor& u_prev_in, const at::Tensor& f_in,
                                const at::Tensor& k_in, const std::optional<at::Tensor>& dt_in,
                                const std::optional<at::Tensor>& keep_in, bool relu) {
  MultistepForwardArgs a = prepare_multistep_forward(u_in, u_prev_in, f_in, k_in, dt_in, keep_in);
  const MultistepView v = a.view;
  if (a.u.numel() == 0) return a.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.u.scalar_type(), "tsc_multistep_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool stream = Lanes<scalar_t>::kCanStream && a.u.nbytes() >= kStreamBytes;
    const scalar_t* up = a.u.const_data_ptr<scalar_t>();
    const scalar_t* pp = a.u_prev.const_data_ptr<scalar_t>();
    const scalar_t* fp = a.f.const_data_ptr<scalar_t>();
    const acc_t k = *a.k.const_data_ptr<acc_t>();
    const std::vector<acc_t> scales = scale_table(optional_ptr<acc_t>(a.dt), optional_ptr<acc_t>(a.keep), v.N, v.C);
    scalar_t* op = a.out.mutable_data_ptr<scalar_t>();
    const int64_t C = v.C, S = v.S;
    if (v.channels_last) {  // rows (n, s) of C channels
      at::parallel_for(0, v.N * S, std::max<int64_t>(1, kGrain / C), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t o = r * C;
          forward_run<true>(up + o, pp + o, fp + o, k, Scale<true, acc_t>{scales.data() + (r / S) * C}, op + o, C, relu,
                            stream);
        }
        stream_fence(stream);
      });
    } else {  // planes (n, c) of S elements sharing one scale
      at::parallel_for(0, v.N * C, std::max<int64_t>(1, kGrain / S), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t o = p * S;
          forward_run<false>(up + o, pp + o, fp + o, k, Scale<false, acc_t>{scales.data() + p}, op + o, S, relu,
                             stream);
        }
        stream_fence(stream);
      });
    }
  });
  return a.out;
}

// One backward call's pointers and factors, read by both layouts' passes below.
template <typename scalar_t>
struct BackwardPass {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *g, *u, *up, *f, *out;  // out: the forward output with the fused ReLU, else null
  scalar_t *du, *dup, *df;
  acc_t k;
  const acc_t* scales;  // scale_table's (N, C)
  int64_t N, C, S;
  bool stream;
};

// Channels-last: one task per sample, its rows (n, s) of C channels in order, into row n of the
// partial tables pk (sums of g'(u_prev - u)) and pf (sums of g' f).
template <typename scalar_t>
void backward_channels_last(const BackwardPass<scalar_t>& b, at::opmath_type<scalar_t>* pk,
                            at::opmath_type<scalar_t>* pf) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t C = b.C, S = b.S;
  at::parallel_for(0, b.N, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C * S)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      acc_t* rk = pk + n * C;
      acc_t* rf = pf + n * C;
      auto sum = [rk, rf](int64_t c, acc_t dk, acc_t gf) {
        rk[c] += dk;
        rf[c] += gf;
      };
      auto vec_sum = [rk, rf](int64_t c, const Vec& k0, const Vec& k1, const Vec& f0, const Vec& f1) {
        (Vec::loadu(rk + c) + k0).store(rk + c);
        (Vec::loadu(rk + c + Vec::size()) + k1).store(rk + c + Vec::size());
        (Vec::loadu(rf + c) + f0).store(rf + c);
        (Vec::loadu(rf + c + Vec::size()) + f1).store(rf + c + Vec::size());
      };
      for (int64_t s = 0; s < S; ++s) {
        const int64_t o = (n * S + s) * C;
        backward_run<true>(b.g + o, b.u + o, b.up + o, b.f + o, offset_or_null(b.out, o), b.k,
                           Scale<true, acc_t>{b.scales + n * C}, b.du + o, b.dup + o, b.df + o, C, b.stream, sum,
                           vec_sum);
      }
    }
    stream_fence(b.stream);
  });
}

// Channel-first: one plane (n, c) of S elements per iteration, its sums into pk[p] and pf[p].
template <typename scalar_t>
void backward_planes(const BackwardPass<scalar_t>& b, at::opmath_type<scalar_t>* pk, at::opmath_type<scalar_t>* pf) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t S = b.S;
  at::parallel_for(0, b.N * b.C, std::max<int64_t>(1, kGrain / S), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      acc_t tk = 0, tf = 0;
      Vec k0(acc_t(0)), k1(acc_t(0)), f0(acc_t(0)), f1(acc_t(0));
      auto sum = [&](int64_t, acc_t dk, acc_t gf) {
        tk += dk;
        tf += gf;
      };
      auto vec_sum = [&](int64_t, const Vec& a0, const Vec& a1, const Vec& b0, const Vec& b1) {
        k0 = k0 + a0;
        k1 = k1 + a1;
        f0 = f0 + b0;
        f1 = f1 + b1;
      };
      const int64_t o = p * S;
      backward_run<false>(b.g + o, b.u + o, b.up + o, b.f + o, offset_or_null(b.out, o), b.k,
                          Scale<false, acc_t>{b.scales + p}, b.du + o, b.dup + o, b.df + o, S, b.stream, sum, vec_sum);
      auto add = [](Vec& x, Vec& y) { return x + y; };
      pk[p] = at::vec::vec_reduce_all<acc_t>(add, k0 + k1) + tk;
      pf[p] = at::vec::vec_reduce_all<acc_t>(add, f0 + f1) + tf;
    }
    stream_fence(b.stream);
  });
}

// Fixed-order reduction of the (N, C) tables (the same order as the CUDA and Triton finalize
// kernels): dk = sum of pk, ddt[c] = sum_n keep[n] pf[n, c], dkeep[n] = sum_c dt[c] pf[n, c].
template <typename acc_t>
void reduce_partials(const std::vector<acc_t>& pk, const std::vector<acc_t>& pf, const acc_t* dtp, const acc_t* keepp,
                     int64_t N, int64_t C, MultistepBackwardArgs& a) {
  acc_t dk = 0;
  for (int64_t i = 0; i < N * C; ++i) dk += pk[i];
  *a.dk.mutable_data_ptr<acc_t>() = dk;
  if (dtp) {
    acc_t* ddt = a.ddt.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      acc_t sum = 0;
      for (int64_t n = 0; n < N; ++n) sum += (keepp ? keepp[n] : acc_t(1)) * pf[n * C + c];
      ddt[c] = sum;
    }
  }
  if (keepp) {
    acc_t* dkeep = a.dkeep.mutable_data_ptr<acc_t>();
    for (int64_t n = 0; n < N; ++n) {
      acc_t sum = 0;
      for (int64_t c = 0; c < C; ++c) sum += (dtp ? dtp[c] : acc_t(1)) * pf[n * C + c];
      dkeep[n] = sum;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multistep_update_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& u_in, const at::Tensor& u_prev_in, const at::Tensor& f_in,
    const at::Tensor& k_in, const std::optional<at::Tensor>& dt_in, const std::optional<at::Tensor>& keep_in,
    const std::optional<at::Tensor>& relu_out) {
  MultistepBackwardArgs a = prepare_multistep_backward(grad_in, u_in, u_prev_in, f_in, k_in, dt_in, keep_in, relu_out);
  const MultistepView v = a.view;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.u.scalar_type(), "tsc_multistep_update_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t* dtp = optional_ptr<acc_t>(a.dt);
        const acc_t* keepp = optional_ptr<acc_t>(a.keep);
        const int64_t N = v.N, C = v.C;
        const std::vector<acc_t> scales = scale_table(dtp, keepp, N, C);
        const BackwardPass<scalar_t> b{a.g.const_data_ptr<scalar_t>(),
                                       a.u.const_data_ptr<scalar_t>(),
                                       a.u_prev.const_data_ptr<scalar_t>(),
                                       a.f.const_data_ptr<scalar_t>(),
                                       a.relu ? a.relu_out.const_data_ptr<scalar_t>() : nullptr,
                                       a.du.mutable_data_ptr<scalar_t>(),
                                       a.du_prev.mutable_data_ptr<scalar_t>(),
                                       a.df.mutable_data_ptr<scalar_t>(),
                                       *a.k.const_data_ptr<acc_t>(),
                                       scales.data(),
                                       N,
                                       C,
                                       v.S,
                                       Lanes<scalar_t>::kCanStream && a.u.nbytes() >= kStreamBytes};
        // partial[n*C + c]: sums over s of g'(u_prev - u) (pk) and g' f (pf)
        std::vector<acc_t> pk(N * C, acc_t(0)), pf(N * C, acc_t(0));
        if (a.u.numel() > 0) {
          if (v.channels_last)
            backward_channels_last(b, pk.data(), pf.data());
          else
            backward_planes(b, pk.data(), pf.data());
        }
        reduce_partials(pk, pf, dtp, keepp, N, C, a);
      });
  return {a.du, a.du_prev, a.df, a.dk, a.ddt, a.dkeep};
}

}  // namespace

// The schemas of tsc::multistep_update and its backward, the same text as the OpDef in
// tsc_kernels/ops/multistep_update.py (tests/test_op_list.py compares them, parsed).
TORCH_LIBRARY_FRAGMENT(tsc, m) {
  // Linear multi-step update (docs/ops.md, multistep_update): out = relu?((1 - k) u + k u_prev + keep[n] dt[c] f),
  // k a 0-d tensor, dt (C,) and keep (N,) optional (1 when absent).
  m.def("multistep_update(Tensor u, Tensor u_prev, Tensor f, Tensor k, Tensor? dt, Tensor? keep, bool relu) -> Tensor");
  // Backward in one pass + a fixed-order reduction: (du, du_prev, df, dk, ddt, dkeep); ddt / dkeep are
  // empty (0,) tensors when dt / keep are absent; relu_out is the forward output when the ReLU was fused.
  m.def(
      "multistep_update_backward(Tensor grad, Tensor u, Tensor u_prev, Tensor f, Tensor k, Tensor? dt, Tensor? keep, "
      "Tensor? relu_out) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tsc, CPU, m) {
  m.impl("multistep_update", &multistep_update_cpu);
  m.impl("multistep_update_backward", &multistep_update_backward_cpu);
}

}  // namespace tsc
