// CPU kernels of the fused ODE stage combination (docs/ode.md), registered for the CPU dispatch key.
//
// Forward: out = z + sum_i c[i] * k_i in one pass (reads z and the S stages once, writes out).
// Backward: dk_i = c[i] * g for every stage and dc[i] = sum(g * k_i) in one pass over g and the
// stages. The dc reduction is deterministic: the work is split into fixed chunks (independent of
// the thread count), each chunk sums into its own partial row, and the rows are added in order.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/all.h>

#include <array>
#include <vector>

#include "cpu_vec.h"
#include "ode_combine_layout.h"
#include "ode_combine_math.h"

namespace tsc {
namespace {

using at::vec::Vectorized;

// Elements per chunk: the unit of parallel work and of the deterministic dc reduction.
constexpr int64_t kChunk = 16384;
// Values per block of the dc sums inside a chunk (a multiple of every Lanes<T>::kStep).
constexpr int64_t kBlock = 512;

using cpu::Lanes;  // csrc/cpu_vec.h

at::Tensor ode_combine_cpu(const at::Tensor& z_in, at::TensorList stages_in, const at::Tensor& coeffs_in) {
  OdeCombineArgs a = prepare_ode_combine("tsc::ode_combine", z_in, stages_in, coeffs_in);
  at::Tensor out = at::empty_like(a.z);
  const int64_t numel = a.z.numel(), S = static_cast<int64_t>(a.stages.size());
  if (numel == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.z.scalar_type(), "tsc_ode_combine_cpu", [&] {
    using L = Lanes<scalar_t>;
    using acc_t = typename L::acc_t;
    using Vec = typename L::Vec;
    const scalar_t* zp = a.z.const_data_ptr<scalar_t>();
    std::array<const scalar_t*, kOdeMaxStages> kp{};
    for (int64_t s = 0; s < S; ++s) kp[s] = a.stages[s].const_data_ptr<scalar_t>();
    std::array<acc_t, kOdeMaxStages> c{};
    for (int64_t s = 0; s < S; ++s) c[s] = a.coeffs.const_data_ptr<acc_t>()[s];
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, numel, kChunk, [&](int64_t b, int64_t e) {
      int64_t i = b;
      for (; i + L::kStep <= e; i += L::kStep) {
        Vec o0, o1, k0, k1;
        L::load(zp + i, o0, o1);
        for (int64_t s = 0; s < S; ++s) {
          L::load(kp[s] + i, k0, k1);
          o0 = ode_combine_term(o0, k0, Vec(c[s]));
          o1 = ode_combine_term(o1, k1, Vec(c[s]));
        }
        L::store(op + i, o0, o1, /*stream=*/false);
      }
      for (; i < e; ++i) {
        acc_t o = static_cast<acc_t>(zp[i]);
        for (int64_t s = 0; s < S; ++s) o = ode_combine_term(o, static_cast<acc_t>(kp[s][i]), c[s]);
        op[i] = static_cast<scalar_t>(o);
      }
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> ode_combine_backward_cpu(const at::Tensor& grad_in,
                                                                         at::TensorList stages_in,
                                                                         const at::Tensor& coeffs_in) {
  OdeCombineArgs a = prepare_ode_combine("tsc::ode_combine_backward", grad_in, stages_in, coeffs_in);
  const int64_t numel = a.z.numel(), S = static_cast<int64_t>(a.stages.size());
  std::vector<at::Tensor> dk;
  for (int64_t s = 0; s < S; ++s) dk.push_back(at::empty_like(a.z));
  at::Tensor dc = at::zeros_like(a.coeffs);
  if (numel == 0) return {dk, dc};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.z.scalar_type(), "tsc_ode_combine_backward_cpu", [&] {
    using L = Lanes<scalar_t>;
    using acc_t = typename L::acc_t;
    using Vec = typename L::Vec;
    const scalar_t* gp = a.z.const_data_ptr<scalar_t>();
    std::array<const scalar_t*, kOdeMaxStages> kp{};
    std::array<scalar_t*, kOdeMaxStages> dkp{};
    std::array<acc_t, kOdeMaxStages> c{};
    for (int64_t s = 0; s < S; ++s) {
      kp[s] = a.stages[s].const_data_ptr<scalar_t>();
      dkp[s] = dk[s].mutable_data_ptr<scalar_t>();
      c[s] = a.coeffs.const_data_ptr<acc_t>()[s];
    }
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    std::vector<acc_t> partial(chunks * S, acc_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t b = q * kChunk, e = std::min(numel, b + kChunk);
        std::array<Vec, kOdeMaxStages> v0, v1;
        std::array<acc_t, kOdeMaxStages> tail{};
        for (int64_t s = 0; s < S; ++s) v0[s] = v1[s] = Vec(acc_t(0));
        int64_t i = b;
        while (i + L::kStep <= e) {
          // Blocks of kBlock values summed on their own, then added to the chunk's sums: two levels
          // of short sequential sums per lane, not one of the chunk's length (the rounding error of
          // a lane's running sum grows with its length: one sum of 1,024 products per lane was
          // several times less accurate than torch's sum of the same products).
          std::array<Vec, kOdeMaxStages> b0, b1;
          for (int64_t s = 0; s < S; ++s) b0[s] = b1[s] = Vec(acc_t(0));
          const int64_t stop = std::min(e, i + kBlock);
          for (; i + L::kStep <= stop; i += L::kStep) {
            Vec g0, g1, k0, k1;
            L::load(gp + i, g0, g1);
            for (int64_t s = 0; s < S; ++s) {
              L::load(kp[s] + i, k0, k1);
              L::store(dkp[s] + i, ode_combine_stage_grad(g0, Vec(c[s])), ode_combine_stage_grad(g1, Vec(c[s])), false);
              b0[s] = b0[s] + g0 * k0;
              b1[s] = b1[s] + g1 * k1;
            }
          }
          for (int64_t s = 0; s < S; ++s) {
            v0[s] = v0[s] + b0[s];
            v1[s] = v1[s] + b1[s];
          }
        }
        for (; i < e; ++i) {
          const acc_t g = static_cast<acc_t>(gp[i]);
          for (int64_t s = 0; s < S; ++s) {
            dkp[s][i] = static_cast<scalar_t>(ode_combine_stage_grad(g, c[s]));
            tail[s] += g * static_cast<acc_t>(kp[s][i]);
          }
        }
        for (int64_t s = 0; s < S; ++s)
          partial[q * S + s] =
              at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, v0[s] + v1[s]) + tail[s];
      }
    });
    acc_t* dcp = dc.mutable_data_ptr<acc_t>();
    for (int64_t q = 0; q < chunks; ++q)
      for (int64_t s = 0; s < S; ++s) dcp[s] += partial[q * S + s];
  });
  return {dk, dc};
}

}  // namespace

// The schemas of tsc::ode_combine and its backward, the same text as the OpDef in
// tsc_kernels/ops/ode_combine.py (tests/test_op_list.py compares them, parsed).
TORCH_LIBRARY_FRAGMENT(tsc, m) {
  // ODE stage combination (docs/ode.md): out = z + sum_i coeffs[i] * stages[i], 1 to 8 stages of
  // z's shape and dtype, coeffs fp32 (fp64 for fp64) of shape (len(stages),), one pass.
  m.def("ode_combine(Tensor z, Tensor[] stages, Tensor coeffs) -> Tensor");
  // Backward in one pass: (dstages, dcoeffs), dstages[i] = coeffs[i] * grad, dcoeffs[i] = sum(grad *
  // stages[i]) (deterministic); dz is grad itself.
  m.def("ode_combine_backward(Tensor grad, Tensor[] stages, Tensor coeffs) -> (Tensor[], Tensor)");
}

TORCH_LIBRARY_IMPL(tsc, CPU, m) {
  m.impl("ode_combine", &ode_combine_cpu);
  m.impl("ode_combine_backward", &ode_combine_backward_cpu);
}

}  // namespace tsc
