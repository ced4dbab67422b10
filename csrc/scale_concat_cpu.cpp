// CPU kernels of scale_concat `out = cat([x, f * dt[c]], dim=1)` (docs/ops.md, scale_concat),
// registered for the CPU dispatch key. Arithmetic from scale_concat_math.h (shared with CUDA).
//
// Forward: one pass over out's rows (scale_concat_math.h: row o = x's row o, then f's row o
// scaled): x's part is a memcpy, f's part one multiply per element.
// Backward: one pass over grad's f part and f, writing df and per-chunk partial sums of ddt; the
// chunks (fixed size, independent of the thread count) are then added in chunk order, so ddt is
// bitwise the same for any number of threads. dx is a view of grad (no kernel, see the Python side).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/all.h>

#include <cstring>
#include <vector>

#include "scale_concat_layout.h"
#include "scale_concat_math.h"

namespace tsc {
namespace {

// Elements per parallel task / per ddt chunk.
constexpr int64_t kGrain = 32768;

at::Tensor scale_concat_cpu(const at::Tensor& x_in, const at::Tensor& f_in, const at::Tensor& dt_in) {
  ScaleConcatForward a = prepare_scale_concat_forward(x_in, f_in, dt_in);
  const ScaleConcatShape s = a.shape;
  if (a.out.numel() == 0) return a.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "tsc_scale_concat_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
    const scalar_t* fp = a.f.const_data_ptr<scalar_t>();
    const acc_t* dtp = a.dt.const_data_ptr<acc_t>();
    scalar_t* op = a.out.mutable_data_ptr<scalar_t>();
    const int64_t x_row = s.cx * s.inner, f_row = s.k * s.inner, row = x_row + f_row;
    at::parallel_for(0, s.outer, std::max<int64_t>(1, kGrain / row), [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        scalar_t* dst = op + o * row;
        if (x_row) std::memcpy(dst, xp + o * x_row, x_row * sizeof(scalar_t));
        dst += x_row;
        const scalar_t* src = fp + o * f_row;
        for (int64_t c = 0; c < s.k; ++c) {
          const acc_t d = dtp[c];
          for (int64_t sp = 0; sp < s.inner; ++sp) {
            const int64_t j = c * s.inner + sp;
            dst[j] = static_cast<scalar_t>(scale_concat_forward(static_cast<acc_t>(src[j]), d));
          }
        }
      }
    });
  });
  return a.out;
}

std::tuple<at::Tensor, at::Tensor> scale_concat_backward_cpu(const at::Tensor& grad_in, const at::Tensor& f_in,
                                                             const at::Tensor& dt_in) {
  ScaleConcatBackward a = prepare_scale_concat_backward(grad_in, f_in, dt_in);
  const ScaleConcatShape s = a.shape;
  if (a.f.numel() == 0) return {a.df, a.ddt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.f.scalar_type(), "tsc_scale_concat_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = a.g.const_data_ptr<scalar_t>();
    const scalar_t* fp = a.f.const_data_ptr<scalar_t>();
    const acc_t* dtp = a.dt.const_data_ptr<acc_t>();
    scalar_t* dfp = a.df.mutable_data_ptr<scalar_t>();
    acc_t* ddtp = a.ddt.mutable_data_ptr<acc_t>();
    const int64_t f_row = s.k * s.inner;
    const int64_t rows_per_chunk = std::max<int64_t>(1, kGrain / f_row);
    const int64_t chunks = (s.outer + rows_per_chunk - 1) / rows_per_chunk;
    std::vector<acc_t> partial(chunks * s.k, acc_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t chunk = k0; chunk < k1; ++chunk) {
        acc_t* part = partial.data() + chunk * s.k;
        for (int64_t o = chunk * rows_per_chunk, o_end = std::min(s.outer, (chunk + 1) * rows_per_chunk); o < o_end;
             ++o) {
          const scalar_t* g = gp + scale_concat_grad_index(o, 0, 0, s);
          const scalar_t* f = fp + o * f_row;
          scalar_t* df = dfp + o * f_row;
          for (int64_t c = 0; c < s.k; ++c) {
            const acc_t d = dtp[c];
            acc_t sum = 0;
            for (int64_t sp = 0; sp < s.inner; ++sp) {
              const int64_t j = c * s.inner + sp;
              const acc_t gj = static_cast<acc_t>(g[j]);
              df[j] = static_cast<scalar_t>(scale_concat_df(gj, d));
              sum += scale_concat_ddt_term(gj, static_cast<acc_t>(f[j]));
            }
            part[c] += sum;
          }
        }
      }
    });
    for (int64_t c = 0; c < s.k; ++c) ddtp[c] = partial[c];
    for (int64_t chunk = 1; chunk < chunks; ++chunk)
      for (int64_t c = 0; c < s.k; ++c) ddtp[c] += partial[chunk * s.k + c];
  });
  return {a.df, a.ddt};
}

}  // namespace

// The schemas of tsc::scale_concat and its backward, the same text as the OpDef in
// tsc_kernels/ops/scale_concat.py (tests/test_op_list.py compares them, parsed).
TORCH_LIBRARY_FRAGMENT(tsc, m) {
  // scale_concat (docs/ops.md, scale_concat): out = cat([x, f * dt[c]], dim=1), TSC-DenseNet's
  // concatenation of a layer's scaled new features; out follows x's layout.
  m.def("scale_concat(Tensor x, Tensor f, Tensor dt) -> Tensor");
  // Backward in one pass over grad's last k channels: (df, ddt); dx is the view grad[:, :Cx].
  m.def("scale_concat_backward(Tensor grad, Tensor f, Tensor dt) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tsc, CPU, m) {
  m.impl("scale_concat", &scale_concat_cpu);
  m.impl("scale_concat_backward", &scale_concat_backward_cpu);
}

}  // namespace tsc
