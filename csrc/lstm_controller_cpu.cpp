// CPU kernels of the batched TSC_LSTM controller (docs/tsc.md, docs/ops.md), registered for the CPU
// dispatch key.
//
// lstm_controller: every stage in one call (stage after stage, each stage's products split across
// threads): fc_in + ReLU, the LSTM recurrence over the stage's blocks, fc_out + sigmoid; backward
// is BPTT over the blocks. Arithmetic per element is lstm_controller_math.h (shared with the CUDA
// kernels); the matrix-vector products are at::vec lanes here. Every reduction runs in a fixed
// order on one thread: results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/all.h>

#include <algorithm>
#include <vector>

#include "cpu_vec.h"
#include "lstm_controller_layout.h"
#include "lstm_controller_math.h"

namespace tsc {
namespace {

using at::vec::Vectorized;
using cpu::axpy;

// sum_i a[i] * b[i] in two vector accumulators.
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t kStep = 2 * Vec::size();
  Vec s0(T(0)), s1(T(0));
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    s0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), s0);
    s1 = at::vec::fmadd(Vec::loadu(a + i + Vec::size()), Vec::loadu(b + i + Vec::size()), s1);
  }
  T s = at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, s0 + s1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[0, n) = sum_{d < L} a[d * a_stride] * rows[d * row_stride + (0, n)]: a weight gradient row
// (an outer product summed over the blocks) or a block's w̄ gradient (a row of dx times W_in's
// rows) written once, instead of a fill and L read-modify-write passes (fc_in's gradient alone is
// 2.6 MB in ResNet-50's last stage). Same order as those passes: d ascending, one fused
// multiply-add each. Four vectors at a time: four independent chains of L fused multiply-adds
// where one chain waited on each add's latency (the backward 66 -> 54 us at ResNet-56's sizes).
template <typename T>
void weighted_rows(const T* a, int64_t a_stride, const T* rows, int64_t row_stride, int64_t L, T* out, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t kVecs = 4;  // independent chains: one per vector, L fused multiply-adds long
  int64_t i = 0;
  for (; i + kVecs * Vec::size() <= n; i += kVecs * Vec::size()) {
    Vec acc[kVecs];
    for (int64_t q = 0; q < kVecs; ++q) acc[q] = Vec(T(0));
    for (int64_t d = 0; d < L; ++d) {
      const Vec ad(a[d * a_stride]);
      for (int64_t q = 0; q < kVecs; ++q)
        acc[q] = at::vec::fmadd(ad, Vec::loadu(rows + d * row_stride + i + q * Vec::size()), acc[q]);
    }
    for (int64_t q = 0; q < kVecs; ++q) acc[q].store(out + i + q * Vec::size());
  }
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec acc(T(0));
    for (int64_t d = 0; d < L; ++d)
      acc = at::vec::fmadd(Vec(a[d * a_stride]), Vec::loadu(rows + d * row_stride + i), acc);
    acc.store(out + i);
  }
  for (; i < n; ++i) {
    T acc = 0;
    for (int64_t d = 0; d < L; ++d) acc += a[d * a_stride] * rows[d * row_stride + i];
    out[i] = acc;
  }
}

// sum_{d < L} a[d * stride], in order.
template <typename T>
T strided_total(const T* a, int64_t stride, int64_t L) {
  T b = 0;
  for (int64_t d = 0; d < L; ++d) b += a[d * stride];
  return b;
}

template <typename T>
struct StageParams {
  const T *win, *bin, *wih, *whh, *bih, *bhh, *wout, *bout;
};

template <typename T>
StageParams<T> stage_params(const std::vector<at::Tensor>& p, int64_t s) {
  const at::Tensor* q = p.data() + kParamsPerStage * s;
  return {q[kFcInW].const_data_ptr<T>(),  q[kFcInB].const_data_ptr<T>(), q[kWih].const_data_ptr<T>(),
          q[kWhh].const_data_ptr<T>(),    q[kBih].const_data_ptr<T>(),   q[kBhh].const_data_ptr<T>(),
          q[kFcOutW].const_data_ptr<T>(), q[kFcOutB].const_data_ptr<T>()};
}

// Runs fn(i0, i1) over [0, n) items of `cost` multiply-adds each, split across threads only when
// a thread's share pays for waking the pool (small controllers, e.g. under gradcheck, stay on
// the calling thread). Every output element is computed by one thread in a fixed order, so the
// results do not depend on the thread count.
constexpr int64_t kParallelMacs = 1 << 18;

template <typename F>
void par(int64_t n, int64_t cost, const F& fn) {
  at::parallel_for(0, n, std::max<int64_t>(1, kParallelMacs / std::max<int64_t>(1, cost)), fn);
}

// Column blocks for the transposed products (W^T v): each thread owns a slice of the output.
constexpr int64_t kCols = 64;

int64_t col_blocks(int64_t n) { return (n + kCols - 1) / kCols; }

// Stages run one after the other; the products inside a stage are split across threads (the
// largest stage holds most of the work: ResNet-50's last stage is ~60% of it).
template <typename T>
void stage_forward(const StageDims& s, const StageParams<T>& p, const T* wbar, T* dt, T* saved) {
  const int64_t L = s.L, D = s.D, H = s.H, C = s.C;
  T* x = saved;              // (L, H)
  T* gates = x + L * H;      // (L, 4H)
  T* c = gates + 4 * L * H;  // (L, H)
  T* h = c + L * H;          // (L, H)
  // Every weight row is read from memory once: the products that do not depend on the recurrence
  // (fc_in, the input half of the gates, fc_out) loop over a row's blocks while the row is in L1.
  par(H, L * D, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t d = 0; d < L; ++d) x[d * H + j] = relu_forward(dot(p.win + j * D, wbar + d * D, D) + p.bin[j]);
  });
  par(4 * H, L * H, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t d = 0; d < L; ++d) gates[d * 4 * H + k] = dot(p.wih + k * H, x + d * H, H) + p.bih[k] + p.bhh[k];
  });
  for (int64_t d = 0; d < L; ++d) {
    T* gd = gates + d * 4 * H;
    if (d > 0) {  // the recurrence: W_hh h_{d-1}, one pass over W_hh per block
      par(4 * H, H, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) gd[k] += dot(p.whh + k * H, h + (d - 1) * H, H);
      });
    }
    for (int64_t j = 0; j < H; ++j) {
      const T c_prev = d > 0 ? c[(d - 1) * H + j] : T(0);
      lstm_cell_forward(gd[j], gd[H + j], gd[2 * H + j], gd[3 * H + j], c_prev, c[d * H + j], h[d * H + j]);
    }
  }
  par(C, L * H, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t d = 0; d < L; ++d) dt[d * C + m] = sigmoid(dot(p.wout + m * H, h + d * H, H) + p.bout[m]);
  });
}

// Gradients of a linear layer (out x in) that the L blocks of a stage share: dW[r] = sum_d g[d, r] in[d]
// and db[r] = sum_d g[d, r], for g (L, out) and in (L, in); rows split across threads.
template <typename T>
void shared_linear_grads(const T* g, int64_t out, const T* in, int64_t in_features, int64_t L, T* dw, T* db) {
  par(out, L * in_features, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      weighted_rows(g + r, out, in, in_features, L, dw + r * in_features, in_features);
      db[r] = strided_total(g + r, out, L);
    }
  });
}

template <typename T>
struct StageGrads {
  T *win, *bin, *wih, *whh, *bih, *bhh, *wout, *bout;
};

template <typename T>
void stage_backward(const StageDims& s, const StageParams<T>& p, const StageGrads<T>& gr, const T* wbar, const T* gdt,
                    const T* dt, const T* saved, T* dwbar) {
  const int64_t L = s.L, D = s.D, H = s.H, C = s.C;
  const T* x = saved;
  const T* gates = x + L * H;
  const T* c = gates + 4 * L * H;
  const T* h = c + L * H;
  std::vector<T> gz(L * C), dh(L * H, T(0)), dpre(L * 4 * H), dnext(H, T(0)), dc(H, T(0)), dx(L * H, T(0));
  // fc_out + sigmoid: gz = dL/d(pre-sigmoid); dWout = gz^T h, dbout = sum_d gz, dh = gz Wout.
  for (int64_t e = 0; e < L * C; ++e) gz[e] = sigmoid_backward(gdt[e], dt[e]);
  shared_linear_grads(gz.data(), C, h, H, L, gr.wout, gr.bout);
  par(col_blocks(H), L * C * kCols, [&](int64_t b0, int64_t b1) {
    const int64_t j0 = b0 * kCols, n = std::min(H, b1 * kCols) - j0;
    for (int64_t m = 0; m < C; ++m)  // a row slice of W_out meets every block while it is in L1
      for (int64_t d = 0; d < L; ++d) axpy(gz[d * C + m], p.wout + m * H + j0, dh.data() + d * H + j0, n);
  });
  // BPTT over the blocks: dnext carries dL/dh_{d-1} through W_hh, dc carries dL/dc_{d-1}.
  for (int64_t d = L - 1; d >= 0; --d) {
    const T* gd = gates + d * 4 * H;
    T* dp = dpre.data() + d * 4 * H;
    for (int64_t j = 0; j < H; ++j) {
      const T c_prev = d > 0 ? c[(d - 1) * H + j] : T(0);
      dc[j] = lstm_cell_backward(dh[d * H + j] + dnext[j], dc[j], gd[j], gd[H + j], gd[2 * H + j], gd[3 * H + j],
                                 c[d * H + j], c_prev, dp[j], dp[H + j], dp[2 * H + j], dp[3 * H + j]);
    }
    if (d == 0) break;  // nothing flows to h_{-1}
    par(col_blocks(H), 4 * H * kCols, [&](int64_t b0, int64_t b1) {
      const int64_t j0 = b0 * kCols, n = std::min(H, b1 * kCols) - j0;
      std::fill(dnext.begin() + j0, dnext.begin() + j0 + n, T(0));
      for (int64_t k = 0; k < 4 * H; ++k) axpy(dp[k], p.whh + k * H + j0, dnext.data() + j0, n);
    });
  }
  // dx = dpre W_ih for every block after the recurrence: one pass over W_ih.
  par(col_blocks(H), 4 * L * H * kCols, [&](int64_t b0, int64_t b1) {
    const int64_t j0 = b0 * kCols, n = std::min(H, b1 * kCols) - j0;
    for (int64_t k = 0; k < 4 * H; ++k)
      for (int64_t d = 0; d < L; ++d) axpy(dpre[d * 4 * H + k], p.wih + k * H + j0, dx.data() + d * H + j0, n);
  });
  // LSTM weight grads: dWih = dpre^T x, dWhh = dpre[1:]^T h[:-1], both biases = sum_d dpre.
  par(4 * H, 2 * L * H, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      weighted_rows(dpre.data() + k, 4 * H, x, H, L, gr.wih + k * H, H);
      // h_{d-1} meets dpre_d: L - 1 terms from block 1 on (none, and no pointer past dpre, for L <= 1)
      weighted_rows(dpre.data() + (L > 1 ? 4 * H : 0) + k, 4 * H, h, H, L - 1, gr.whh + k * H, H);
      gr.bih[k] = gr.bhh[k] = strided_total(dpre.data() + k, 4 * H, L);
    }
  });
  // fc_in + ReLU: dxr = dx masked by x > 0; dWin = dxr^T wbar, dbin = sum_d dxr, dwbar = dxr Win.
  for (int64_t e = 0; e < L * H; ++e) dx[e] = relu_backward(dx[e], x[e]);
  shared_linear_grads(dx.data(), H, wbar, D, L, gr.win, gr.bin);
  par(col_blocks(D), L * H * kCols, [&](int64_t b0, int64_t b1) {
    const int64_t i0 = b0 * kCols, n = std::min(D, b1 * kCols) - i0;
    // a column slice of W_in (H rows of kCols values) stays in L1 while every block meets it
    for (int64_t d = 0; d < L; ++d) weighted_rows(dx.data() + d * H, 1, p.win + i0, D, H, dwbar + d * D + i0, n);
  });
}

std::tuple<at::Tensor, at::Tensor> lstm_controller_cpu(const at::Tensor& wbar_in, at::IntArrayRef blocks,
                                                       at::TensorList params_in) {
  const ControllerDims dims = controller_dims("tsc::lstm_controller", wbar_in, blocks, params_in);
  TORCH_CHECK(wbar_in.device().is_cpu(), "tsc::lstm_controller: CPU kernel got a ", wbar_in.device(), " tensor");
  const at::Tensor wbar = wbar_in.contiguous();
  const std::vector<at::Tensor> params = contiguous_all(params_in);
  at::Tensor dt = at::empty({dims.dt_numel}, wbar.options());
  at::Tensor saved = at::empty({dims.saved_numel}, wbar.options());
  AT_DISPATCH_FLOATING_TYPES(wbar.scalar_type(), "tsc_lstm_controller_cpu", [&] {
    const scalar_t* wp = wbar.const_data_ptr<scalar_t>();
    scalar_t* dtp = dt.mutable_data_ptr<scalar_t>();
    scalar_t* sp = saved.mutable_data_ptr<scalar_t>();
    for (size_t s = 0; s < dims.stages.size(); ++s) {
      const StageDims& st = dims.stages[s];
      stage_forward(st, stage_params<scalar_t>(params, s), wp + st.wbar_off, dtp + st.dt_off, sp + st.saved_off);
    }
  });
  return {dt, saved};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> lstm_controller_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& dt_in, const at::Tensor& wbar_in, at::IntArrayRef blocks,
    at::TensorList params_in, const at::Tensor& saved_in) {
  const ControllerDims dims =
      controller_backward_dims("tsc::lstm_controller_backward", grad_in, dt_in, wbar_in, blocks, params_in, saved_in);
  const at::Tensor wbar = wbar_in.contiguous(), grad = grad_in.contiguous(), dt = dt_in.contiguous(),
                   saved = saved_in.contiguous();
  const std::vector<at::Tensor> params = contiguous_all(params_in);
  at::Tensor dwbar = at::empty({dims.wbar_numel}, wbar.options());
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  for (const auto& p : params) grads.push_back(at::empty_like(p));
  AT_DISPATCH_FLOATING_TYPES(wbar.scalar_type(), "tsc_lstm_controller_backward_cpu", [&] {
    using T = scalar_t;
    for (size_t s = 0; s < dims.stages.size(); ++s) {
      const StageDims& st = dims.stages[s];
      at::Tensor* g = grads.data() + kParamsPerStage * s;
      const StageGrads<T> gr{g[kFcInW].mutable_data_ptr<T>(),  g[kFcInB].mutable_data_ptr<T>(),
                             g[kWih].mutable_data_ptr<T>(),    g[kWhh].mutable_data_ptr<T>(),
                             g[kBih].mutable_data_ptr<T>(),    g[kBhh].mutable_data_ptr<T>(),
                             g[kFcOutW].mutable_data_ptr<T>(), g[kFcOutB].mutable_data_ptr<T>()};
      stage_backward(st, stage_params<T>(params, s), gr, wbar.const_data_ptr<T>() + st.wbar_off,
                     grad.const_data_ptr<T>() + st.dt_off, dt.const_data_ptr<T>() + st.dt_off,
                     saved.const_data_ptr<T>() + st.saved_off, dwbar.mutable_data_ptr<T>() + st.wbar_off);
    }
  });
  return {dwbar, grads};
}

}  // namespace

// The schemas of tsc::lstm_controller and its backward, the same text as the OpDef in
// tsc_kernels/ops/lstm_controller.py (tests/test_op_list.py compares them, parsed).
TORCH_LIBRARY_FRAGMENT(tsc, m) {
  // Batched TSC_LSTM controller: every stage in one launch. wbar_packed: 1-D, stage s's (L_s, D_s)
  // rows back to back; blocks: L_s; params: 8 per stage (fc_in.weight, fc_in.bias, weight_ih,
  // weight_hh, bias_ih, bias_hh, fc_out.weight, fc_out.bias). Returns dt_packed (1-D, stage s's
  // (L_s, C_s) rows back to back) and saved (x, gates, c, h per stage, for backward).
  m.def("lstm_controller(Tensor wbar_packed, int[] blocks, Tensor[] params) -> (Tensor, Tensor)");
  // BPTT over every stage in one launch: (grad of wbar_packed, grads of params in params' order).
  m.def(
      "lstm_controller_backward(Tensor grad, Tensor dt_packed, Tensor wbar_packed, int[] blocks, Tensor[] params, Tensor saved) -> (Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(tsc, CPU, m) {
  m.impl("lstm_controller", &lstm_controller_cpu);
  m.impl("lstm_controller_backward", &lstm_controller_backward_cpu);
}

}  // namespace tsc
