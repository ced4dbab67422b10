// CPU kernels of the weight-mean projection (docs/tsc.md, docs/ops.md), registered for the CPU
// dispatch key.
//
// weight_mean: one pass over every conv weight of the network (parallel over output rows of all
// weights), writing the packed w̄; its backward writes dw̄ / C_in of every weight, packed like w̄,
// in one pass. The division is weight_mean_math.h (shared with the CUDA kernels). Every reduction
// runs in a fixed order on one thread: results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/all.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "cpu_vec.h"
#include "weight_mean_kernels.h"
#include "weight_mean_layout.h"
#include "weight_mean_math.h"

namespace tsc {
namespace {

using at::vec::Vectorized;
using cpu::axpy;

// Sum of n values at stride `stride` in the accumulation type (vector lanes when contiguous fp32/fp64).
template <typename scalar_t, typename acc_t>
acc_t strided_sum(const scalar_t* p, int64_t n, int64_t stride) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1) {
      using Vec = Vectorized<acc_t>;
      Vec s(acc_t(0));
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) s = s + Vec::loadu(p + i);
      acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, s);
      for (; i < n; ++i) sum += p[i];
      return sum;
    }
  }
  acc_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<acc_t>(p[i * stride]);
  return sum;
}

// Means over C_in of `n` output rows (row o: a contiguous (C_in, K) block at w + o * so), written to
// out[o * K + k]. A run of P = lcm(K, lanes) values holds P / K whole C_in rows, so vector j of
// every run covers the same columns: P / lanes vector accumulators in registers, each updated once
// per run. Adding C_in row after C_in row instead chains every row's K additions through the same
// K accumulators (3x3 kernels: 1 value per cycle, slower than memory). The accumulators of up to
// kFoldRows output rows are stored first and folded into their K columns after (column k is lane
// k + K j of the rows_per_run j, then the C_in rows after the last whole run): folding each row
// right after its stores reloaded lanes the stores had not yet written back (a store-forwarding
// stall per load) and cost more than the row's sums (ResNet-56's 2,016 rows of 16-64 x 9
// values). The order is fixed: the sums do not depend on the thread count.
template <int A, typename T>
void means_in_runs(const T* w, int64_t so, int64_t n, int64_t C_in, int64_t K, T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size(), period = A * V, kFoldRows = 16;
  const int64_t rows_per_run = period / K, runs = C_in / rows_per_run, tail = C_in - runs * rows_per_run;
  alignas(64) T lanes[kFoldRows * period];
  for (int64_t o0 = 0; o0 < n; o0 += kFoldRows) {
    const int64_t rows = std::min(kFoldRows, n - o0);
    for (int64_t r = 0; r < rows; ++r) {
      const T* p = w + (o0 + r) * so;
      Vec acc[A];
      for (int a = 0; a < A; ++a) acc[a] = Vec(T(0));
      for (int64_t run = 0; run < runs; ++run, p += period)
        for (int a = 0; a < A; ++a) acc[a] = acc[a] + Vec::loadu(p + a * V);
      for (int a = 0; a < A; ++a) acc[a].store(lanes + r * period + a * V);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const T* l = lanes + r * period;
      const T* rest = w + (o0 + r) * so + runs * period;  // the C_in rows after the last whole run
      T* dst = out + (o0 + r) * K;
      int64_t k0 = 0;
      for (; k0 + V <= K; k0 += V) {  // a vector of V columns at a time (3x3: columns 0-7)
        Vec sum = Vec::loadu(l + k0);
        for (int64_t j = 1; j < rows_per_run; ++j) sum = sum + Vec::loadu(l + k0 + K * j);
        for (int64_t i = 0; i < tail; ++i) sum = sum + Vec::loadu(rest + i * K + k0);
        sum.store(dst + k0);
      }
      for (; k0 < K; ++k0) {
        T sum = l[k0];
        for (int64_t j = 1; j < rows_per_run; ++j) sum += l[k0 + K * j];
        for (int64_t i = 0; i < tail; ++i) sum += rest[i * K + k0];
        dst[k0] = sum;
      }
      for (int64_t k = 0; k < K; ++k) dst[k] = mean_from_sum(dst[k], C_in);
    }
  }
}

// Vector accumulators of a run of means_in_runs for this K (up to 9 are kept in registers).
template <typename T>
int64_t vector_runs(int64_t K) {
  return std::lcm(K, static_cast<int64_t>(Vectorized<T>::size())) / Vectorized<T>::size();
}

// means_in_runs for K's run length; false for a K it has no instance for, and for fp16/bf16
// weights (mean_row converts each value to the fp32 accumulator).
template <typename S, typename T>
bool means_of_rows(const S* w, int64_t so, int64_t n, int64_t C_in, int64_t K, T* out) {
  if constexpr (!std::is_same_v<S, T>)
    return false;
  else
    switch (vector_runs<T>(K)) {
      // K dividing the lanes (2, 4, 8) takes 1 vector, 1-D k = 3 takes 3, 3x3 kernels 9
      case 1:
        return means_in_runs<1>(w, so, n, C_in, K, out), true;
      case 2:
        return means_in_runs<2>(w, so, n, C_in, K, out), true;
      case 3:
        return means_in_runs<3>(w, so, n, C_in, K, out), true;
      case 5:
        return means_in_runs<5>(w, so, n, C_in, K, out), true;
      case 7:
        return means_in_runs<7>(w, so, n, C_in, K, out), true;
      case 9:
        return means_in_runs<9>(w, so, n, C_in, K, out), true;
      default:
        return false;
    }
}

// w̄ of output row o of one weight: out[k] = mean_i W[o, i, k].
template <typename scalar_t, typename acc_t>
void mean_row(const scalar_t* w, const WeightView& v, acc_t* out, std::vector<acc_t>& scratch) {
  if (v.sk == 1 && v.K > 1 && v.si != 1) {
    // K contiguous (NCHW weights with k > 1): accumulate whole kernel rows, one C_in slice at a time.
    scratch.assign(v.K, acc_t(0));
    for (int64_t i = 0; i < v.C_in; ++i) {
      const scalar_t* row = w + i * v.si;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        axpy(acc_t(1), row, scratch.data(), v.K);
      } else {
        for (int64_t k = 0; k < v.K; ++k) scratch[k] += static_cast<acc_t>(row[k]);
      }
    }
    for (int64_t k = 0; k < v.K; ++k) out[k] = mean_from_sum(scratch[k], v.C_in);
  } else {
    // C_in contiguous (1x1 convs, channels-last weights) or arbitrary strides: one reduction per k.
    for (int64_t k = 0; k < v.K; ++k)
      out[k] = mean_from_sum(strided_sum<scalar_t, acc_t>(w + k * v.sk, v.C_in, v.si), v.C_in);
  }
}

// Row r of the concatenated (sum C_out) rows belongs to the weight whose row range holds it.
int64_t weight_of_row(const std::vector<int64_t>& row_start, int64_t r) {
  return static_cast<int64_t>(std::upper_bound(row_start.begin(), row_start.end(), r) - row_start.begin()) - 1;
}

at::Tensor weight_mean_cpu(at::TensorList weights_in) {
  check_weights("tsc::weight_mean", weights_in);
  int64_t total = 0;
  const std::vector<int64_t> off = mean_offsets(weights_in, total);
  const auto dtype = weights_in[0].scalar_type();
  at::Tensor out = at::empty({total}, weights_in[0].options().dtype(accumulation_type(dtype)));
  std::vector<at::Tensor> weights;
  std::vector<WeightView> views(weights_in.size());
  // row_start[j]: weight j's first row among the concatenated (sum C_out) rows; row_elems[r]: the
  // number of weight values before row r (the work before it)
  std::vector<int64_t> row_start, row_elems{0};
  for (size_t j = 0; j < weights_in.size(); ++j) {
    weights.push_back(weight_view(weights_in[j], views[j]) ? weights_in[j] : weights_in[j].contiguous());
    if (!weights.back().is_same(weights_in[j])) weight_view(weights.back(), views[j]);
    row_start.push_back(static_cast<int64_t>(row_elems.size()) - 1);
    const int64_t row_numel = views[j].C_in * views[j].K;
    for (int64_t o = 0; o < views[j].C_out; ++o) row_elems.push_back(row_elems.back() + row_numel);
  }
  if (total == 0) return out;
  const int64_t elems = row_elems.back();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "tsc_weight_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* op = out.mutable_data_ptr<acc_t>();
    // Split by values, not rows: the rows of a network's late stages are many times longer than
    // the early ones'. A task takes the rows that start in its value range, each row whole, so
    // every mean is one thread's fixed-order sum.
    at::parallel_for(0, elems, cpu::kGrain, [&](int64_t e0, int64_t e1) {
      const int64_t r1 = std::lower_bound(row_elems.begin(), row_elems.end() - 1, e1) - row_elems.begin();
      int64_t r = std::lower_bound(row_elems.begin(), row_elems.end() - 1, e0) - row_elems.begin();
      std::vector<acc_t> scratch;
      // weight by weight over the task's rows: a weight's pointer and view once, not per row
      // (ResNet-56's 2,016 rows of 16-64 x 9 values: the per-row lookups cost as much as the sums)
      for (int64_t j = r < r1 ? weight_of_row(row_start, r) : 0; r < r1; ++j) {
        const int64_t end = std::min(r1, j + 1 < static_cast<int64_t>(row_start.size()) ? row_start[j + 1] : r1);
        const WeightView& v = views[j];
        const scalar_t* w = weights[j].const_data_ptr<scalar_t>();
        acc_t* dst = op + off[j];
        // rows whose (C_in, K) block is contiguous (NCHW weights with k > 1), all at once
        const int64_t first = r - row_start[j];
        if (v.sk == 1 && v.K > 1 && v.si == v.K &&
            means_of_rows(w + first * v.so, v.so, end - r, v.C_in, v.K, dst + first * v.K)) {
          r = end;
          continue;
        }
        for (; r < end; ++r) {
          const int64_t o = r - row_start[j];
          mean_row<scalar_t, acc_t>(w + o * v.so, v, dst + o * v.K, scratch);
        }
      }
    });
  });
  return out;
}

// dw̄ / C_in of every weight, packed like w̄ (fp32; fp64 for fp64 weights): the autograd formula
// expands each weight's slice over C_in as a stride-0 view, so no full-size dW is ever written.
at::Tensor weight_mean_backward_cpu(const at::Tensor& grad_in, at::TensorList weights) {
  const WeightMeanGrad a = prepare_weight_mean_backward("tsc::weight_mean_backward", grad_in, weights);
  if (a.total == 0) return a.out;
  AT_DISPATCH_FLOATING_TYPES(a.grad.scalar_type(), "tsc_weight_mean_backward_cpu", [&] {
    const scalar_t* gp = a.grad.const_data_ptr<scalar_t>();
    scalar_t* op = a.out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(weights.size()), 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t end = j + 1 < static_cast<int64_t>(weights.size()) ? a.off[j + 1] : a.total;
        const int64_t c_in = weights[j].size(1);  // hoisted: the loop then runs in vector lanes
        for (int64_t e = a.off[j]; e < end; ++e) op[e] = mean_from_sum(gp[e], c_in);
      }
    });
  });
  return a.out;
}

// g (C_out, C_in, K) contiguous: g[o, i, k] += p[o, k]. A row g[o] is C_in repeats of K values,
// added a whole number of vectors at a time from the K values repeated lcm(K, lanes) / K times
// (TensorIterator's add of the stride-0 broadcast runs a scalar loop per K-value row: 3x3 kernels
// 2.3x slower than this pass over the same bytes).
constexpr int64_t kMaxPeriod = 1024;

template <typename T>
void add_over_c_in(T* g, const T* p, int64_t c_out, int64_t c_in, int64_t K) {
  using Vec = Vectorized<T>;
  const int64_t period = std::lcm(K, static_cast<int64_t>(Vec::size())), n = c_in * K;
  const auto next = [K](int64_t k) { return k + 1 == K ? 0 : k + 1; };
  at::parallel_for(0, c_out, std::max<int64_t>(1, cpu::kGrain / std::max<int64_t>(1, n)), [&](int64_t o0, int64_t o1) {
    alignas(64) T pattern[kMaxPeriod];
    for (int64_t o = o0; o < o1; ++o) {
      const T* po = p + o * K;
      T* row = g + o * n;
      int64_t t = 0;
      if (period <= kMaxPeriod) {
        for (int64_t q = 0, k = 0; q < period; ++q, k = next(k)) pattern[q] = po[k];
        for (; t + period <= n; t += period)
          for (int64_t q = 0; q < period; q += Vec::size())
            (Vec::loadu(row + t + q) + Vec::loadu(pattern + q)).store(row + t + q);
      }
      for (; t < n; ++t) g[o * n + t] += p[wbar_grad_index<int64_t>(o * n + t, c_in, K)];
    }
  });
}

}  // namespace

void add_wbar_grad_cpu(at::Tensor& g, const at::Tensor& scaled, int64_t offset) {
  TORCH_INTERNAL_ASSERT(g.is_cpu() && g.is_contiguous() && g.dim() >= 2 && scaled.scalar_type() == g.scalar_type());
  const int64_t K = c10::multiply_integers(g.sizes().begin() + 2, g.sizes().end());
  TORCH_INTERNAL_ASSERT(offset + g.size(0) * K <= scaled.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "tsc_add_wbar_grad_cpu", [&] {
    add_over_c_in(g.mutable_data_ptr<scalar_t>(), scaled.const_data_ptr<scalar_t>() + offset, g.size(0), g.size(1), K);
  });
}

// The schemas of tsc::weight_mean and its backward, the same text as the OpDef in
// tsc_kernels/ops/weight_mean.py (tests/test_op_list.py compares them, parsed).
TORCH_LIBRARY_FRAGMENT(tsc, m) {
  // Weight-mean projection (docs/tsc.md): every given conv weight (C_out, C_in, *k) averaged over
  // C_in, flattened, concatenated into one 1-D tensor (fp32; fp64 for fp64 weights), one launch.
  m.def("weight_mean(Tensor[] weights) -> Tensor");
  // dw̄ / C_in of every weight, packed like w̄, one launch (weights are read for C_in only); the
  // autograd formula expands each slice over C_in (a stride-0 view): dW is never materialised.
  m.def("weight_mean_backward(Tensor grad, Tensor[] weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(tsc, CPU, m) {
  m.impl("weight_mean", &weight_mean_cpu);
  m.impl("weight_mean_backward", &weight_mean_backward_cpu);
}

}  // namespace tsc
