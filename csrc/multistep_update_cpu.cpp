// CPU kernels of the linear multi-step update (docs/ops.md, multistep_update), CPU dispatch key.
//
// Forward: one pass reading u, u_prev, f, writing out. Backward: one pass reading grad, u, u_prev,
// f (and out with the fused ReLU), writing du, du_prev, df and a (N, C) table of partial sums,
// then a small fixed-order reduction of the table into dk, ddt and dkeep. Tasks own whole
// (sample, channel) planes (channel-first) or whole samples (channels-last), so every partial sum
// is added by one thread in index order: the gradients are the same for any thread count.
// The per-element arithmetic is multistep_update_math.h's, which the CUDA kernels share.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/all.h>

#include <vector>

#include "multistep_layout.h"
#include "multistep_update_math.h"

namespace tsc {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel task

template <typename T>
const T* optional_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

at::Tensor multistep_update_cpu(const at::Tensor& u_in, const at::Tensor& u_prev_in, const at::Tensor& f_in, const at::Tensor& k_in,
                                const std::optional<at::Tensor>& dt_in, const std::optional<at::Tensor>& keep_in, bool relu) {
  MultistepForwardArgs a = prepare_multistep_forward(u_in, u_prev_in, f_in, k_in, dt_in, keep_in);
  const MultistepView v = a.view;
  if (a.u.numel() == 0) return a.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.u.scalar_type(), "tsc_multistep_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* up = a.u.const_data_ptr<scalar_t>();
    const scalar_t* pp = a.u_prev.const_data_ptr<scalar_t>();
    const scalar_t* fp = a.f.const_data_ptr<scalar_t>();
    const acc_t* dtp = optional_ptr<acc_t>(a.dt);
    const acc_t* keepp = optional_ptr<acc_t>(a.keep);
    const acc_t k = *a.k.const_data_ptr<acc_t>();
    scalar_t* op = a.out.mutable_data_ptr<scalar_t>();
    auto element = [&](int64_t i, acc_t scale) {
      const acc_t o = multistep_forward(static_cast<acc_t>(up[i]), static_cast<acc_t>(pp[i]), static_cast<acc_t>(fp[i]), k, scale);
      op[i] = static_cast<scalar_t>(relu ? relu_forward(o) : o);
    };
    const int64_t C = v.C, S = v.S;
    if (v.channels_last) {  // rows (n, s) of C channels
      at::parallel_for(0, v.N * S, std::max<int64_t>(1, kGrain / C), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t n = r / S;
          for (int64_t c = 0; c < C; ++c) element(r * C + c, multistep_scale(dtp, keepp, n, c));
        }
      });
    } else {  // planes (n, c) of S elements sharing one scale
      at::parallel_for(0, v.N * C, std::max<int64_t>(1, kGrain / S), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const acc_t scale = multistep_scale(dtp, keepp, p / C, p % C);
          for (int64_t s = 0; s < S; ++s) element(p * S + s, scale);
        }
      });
    }
  });
  return a.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multistep_update_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& u_in, const at::Tensor& u_prev_in, const at::Tensor& f_in, const at::Tensor& k_in,
    const std::optional<at::Tensor>& dt_in, const std::optional<at::Tensor>& keep_in, const std::optional<at::Tensor>& relu_out) {
  MultistepBackwardArgs a = prepare_multistep_backward(grad_in, u_in, u_prev_in, f_in, k_in, dt_in, keep_in, relu_out);
  const MultistepView v = a.view;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.u.scalar_type(), "tsc_multistep_update_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = a.g.const_data_ptr<scalar_t>();
    const scalar_t* up = a.u.const_data_ptr<scalar_t>();
    const scalar_t* pp = a.u_prev.const_data_ptr<scalar_t>();
    const scalar_t* fp = a.f.const_data_ptr<scalar_t>();
    const scalar_t* outp = a.relu ? a.relu_out.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* dtp = optional_ptr<acc_t>(a.dt);
    const acc_t* keepp = optional_ptr<acc_t>(a.keep);
    const acc_t k = *a.k.const_data_ptr<acc_t>();
    scalar_t* dup = a.du.mutable_data_ptr<scalar_t>();
    scalar_t* dpp = a.du_prev.mutable_data_ptr<scalar_t>();
    scalar_t* dfp = a.df.mutable_data_ptr<scalar_t>();
    const int64_t N = v.N, C = v.C, S = v.S;
    // partial[n*C + c]: sums over s of g'(u_prev - u) (pk) and g' f (pf)
    std::vector<acc_t> pk(N * C, acc_t(0)), pf(N * C, acc_t(0));
    auto element = [&](int64_t i, acc_t scale, acc_t& sk, acc_t& sf) {
      acc_t g = static_cast<acc_t>(gp[i]);
      if (outp) g = relu_backward(g, static_cast<acc_t>(outp[i]));
      const auto r = multistep_backward(g, static_cast<acc_t>(up[i]), static_cast<acc_t>(pp[i]), static_cast<acc_t>(fp[i]), k, scale);
      dup[i] = static_cast<scalar_t>(r.du);
      dpp[i] = static_cast<scalar_t>(r.du_prev);
      dfp[i] = static_cast<scalar_t>(r.df);
      sk += r.dk_term;
      sf += r.gf_term;
    };
    if (a.u.numel() > 0) {
      if (v.channels_last) {  // one task per sample: its rows, in order, into row n of the tables
        at::parallel_for(0, N, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C * S)), [&](int64_t n0, int64_t n1) {
          for (int64_t n = n0; n < n1; ++n)
            for (int64_t s = 0; s < S; ++s)
              for (int64_t c = 0; c < C; ++c)
                element((n * S + s) * C + c, multistep_scale(dtp, keepp, n, c), pk[n * C + c], pf[n * C + c]);
        });
      } else {  // one plane (n, c) per iteration
        at::parallel_for(0, N * C, std::max<int64_t>(1, kGrain / S), [&](int64_t p0, int64_t p1) {
          for (int64_t p = p0; p < p1; ++p) {
            const acc_t scale = multistep_scale(dtp, keepp, p / C, p % C);
            acc_t sk = 0, sf = 0;
            for (int64_t s = 0; s < S; ++s) element(p * S + s, scale, sk, sf);
            pk[p] = sk;
            pf[p] = sf;
          }
        });
      }
    }
    // Fixed-order reduction of the tables (the same order as the CUDA and Triton finalize kernels).
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
  });
  return {a.du, a.du_prev, a.df, a.dk, a.ddt, a.dkeep};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, CPU, m) {
  m.impl("multistep_update", &multistep_update_cpu);
  m.impl("multistep_update_backward", &multistep_update_backward_cpu);
}

}  // namespace tsc
