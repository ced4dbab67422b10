// CPU kernels of the weight-mean projection and the batched TSC_LSTM controller (docs/tsc.md, docs/ops.md),
// registered for the CPU dispatch key.
//
// weight_mean: one pass over every conv weight of the network (parallel over output rows of all
// weights), writing the packed w̄; its backward writes every dW = broadcast(dw̄) / C_in in one pass.
// lstm_controller: every stage in one call (stage after stage, each stage's products split across
// threads): fc_in + ReLU, the LSTM recurrence
// over the stage's blocks, fc_out + sigmoid; backward is BPTT over the blocks. Arithmetic per
// element is controller_math.h (shared with the CUDA kernels); the matrix-vector products are
// at::vec lanes here. Every reduction runs in a fixed order on one thread: results do not depend
// on the thread count.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/all.h>

#include <algorithm>
#include <vector>

#include "controller_layout.h"
#include "controller_math.h"

namespace tsc {
namespace {

using at::vec::Vectorized;

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

// y[i] += alpha * x[i].
template <typename T>
void axpy(T alpha, const T* x, T* y, int64_t n) {
  using Vec = Vectorized<T>;
  const Vec av(alpha);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) at::vec::fmadd(av, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// ---------------------------------------------------------------- weight mean

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
    for (int64_t k = 0; k < v.K; ++k) out[k] = mean_from_sum(strided_sum<scalar_t, acc_t>(w + k * v.sk, v.C_in, v.si), v.C_in);
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
  std::vector<int64_t> row_start;
  int64_t rows = 0, elems = 0;
  for (size_t j = 0; j < weights_in.size(); ++j) {
    weights.push_back(weight_view(weights_in[j], views[j]) ? weights_in[j] : weights_in[j].contiguous());
    if (!weights.back().is_same(weights_in[j])) weight_view(weights.back(), views[j]);
    row_start.push_back(rows);
    rows += views[j].C_out;
    elems += weights_in[j].numel();
  }
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "tsc_weight_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* op = out.mutable_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elems / std::max<int64_t>(1, rows)));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> scratch;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t j = weight_of_row(row_start, r), o = r - row_start[j];
        const WeightView& v = views[j];
        mean_row<scalar_t, acc_t>(weights[j].const_data_ptr<scalar_t>() + o * v.so, v, op + off[j] + o * v.K, scratch);
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
        for (int64_t e = a.off[j]; e < end; ++e) op[e] = mean_from_sum(gp[e], weights[j].size(1));
      }
    });
  });
  return a.out;
}

// ---------------------------------------------------------------- LSTM controller

template <typename T>
struct StageParams {
  const T *win, *bin, *wih, *whh, *bih, *bhh, *wout, *bout;
};

template <typename T>
StageParams<T> stage_params(const std::vector<at::Tensor>& p, int64_t s) {
  const at::Tensor* q = p.data() + kParamsPerStage * s;
  return {q[kFcInW].const_data_ptr<T>(), q[kFcInB].const_data_ptr<T>(), q[kWih].const_data_ptr<T>(),
          q[kWhh].const_data_ptr<T>(), q[kBih].const_data_ptr<T>(), q[kBhh].const_data_ptr<T>(),
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

int64_t col_blocks(int64_t n) {
  return (n + kCols - 1) / kCols;
}

std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

// Stages run one after the other; the products inside a stage are split across threads (the
// largest stage holds most of the work: ResNet-50's last stage is ~60% of it).
template <typename T>
void stage_forward(const StageDims& s, const StageParams<T>& p, const T* wbar, T* dt, T* saved) {
  const int64_t L = s.L, D = s.D, H = s.H, C = s.C;
  T* x = saved;                 // (L, H)
  T* gates = x + L * H;         // (L, 4H)
  T* c = gates + 4 * L * H;     // (L, H)
  T* h = c + L * H;             // (L, H)
  par(L * H, D, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t d = r / H, j = r % H;
      x[r] = relu_forward(dot(p.win + j * D, wbar + d * D, D) + p.bin[j]);
    }
  });
  for (int64_t d = 0; d < L; ++d) {
    T* gd = gates + d * 4 * H;
    par(4 * H, 2 * H, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        T pre = dot(p.wih + k * H, x + d * H, H) + p.bih[k] + p.bhh[k];
        if (d > 0) pre += dot(p.whh + k * H, h + (d - 1) * H, H);
        gd[k] = pre;
      }
    });
    for (int64_t j = 0; j < H; ++j) {
      const T c_prev = d > 0 ? c[(d - 1) * H + j] : T(0);
      lstm_cell_forward(gd[j], gd[H + j], gd[2 * H + j], gd[3 * H + j], c_prev, c[d * H + j], h[d * H + j]);
    }
  }
  par(L * C, H, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t d = r / C, m = r % C;
      dt[r] = sigmoid(dot(p.wout + m * H, h + d * H, H) + p.bout[m]);
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
  par(C, L * H, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      std::fill(gr.wout + m * H, gr.wout + (m + 1) * H, T(0));
      T b = 0;
      for (int64_t d = 0; d < L; ++d) {
        axpy(gz[d * C + m], h + d * H, gr.wout + m * H, H);
        b += gz[d * C + m];
      }
      gr.bout[m] = b;
    }
  });
  par(col_blocks(H), L * C * kCols, [&](int64_t b0, int64_t b1) {
    const int64_t j0 = b0 * kCols, n = std::min(H, b1 * kCols) - j0;
    for (int64_t d = 0; d < L; ++d)
      for (int64_t m = 0; m < C; ++m) axpy(gz[d * C + m], p.wout + m * H + j0, dh.data() + d * H + j0, n);
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
    par(col_blocks(H), 8 * H * kCols, [&](int64_t b0, int64_t b1) {
      const int64_t j0 = b0 * kCols, n = std::min(H, b1 * kCols) - j0;
      std::fill(dnext.begin() + j0, dnext.begin() + j0 + n, T(0));
      for (int64_t k = 0; k < 4 * H; ++k) {
        axpy(dp[k], p.whh + k * H + j0, dnext.data() + j0, n);
        axpy(dp[k], p.wih + k * H + j0, dx.data() + d * H + j0, n);
      }
    });
  }
  // LSTM weight grads: dWih = dpre^T x, dWhh = dpre[1:]^T h[:-1], both biases = sum_d dpre.
  par(4 * H, 2 * L * H, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      std::fill(gr.wih + k * H, gr.wih + (k + 1) * H, T(0));
      std::fill(gr.whh + k * H, gr.whh + (k + 1) * H, T(0));
      T b = 0;
      for (int64_t d = 0; d < L; ++d) {
        const T g = dpre[d * 4 * H + k];
        axpy(g, x + d * H, gr.wih + k * H, H);
        if (d > 0) axpy(g, h + (d - 1) * H, gr.whh + k * H, H);
        b += g;
      }
      gr.bih[k] = b;
      gr.bhh[k] = b;
    }
  });
  // fc_in + ReLU: dxr = dx masked by x > 0; dWin = dxr^T wbar, dbin = sum_d dxr, dwbar = dxr Win.
  for (int64_t e = 0; e < L * H; ++e) dx[e] = relu_backward(dx[e], x[e]);
  par(H, L * D, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      std::fill(gr.win + j * D, gr.win + (j + 1) * D, T(0));
      T b = 0;
      for (int64_t d = 0; d < L; ++d) {
        axpy(dx[d * H + j], wbar + d * D, gr.win + j * D, D);
        b += dx[d * H + j];
      }
      gr.bin[j] = b;
    }
  });
  par(col_blocks(D), L * H * kCols, [&](int64_t b0, int64_t b1) {
    const int64_t i0 = b0 * kCols, n = std::min(D, b1 * kCols) - i0;
    for (int64_t d = 0; d < L; ++d) {
      std::fill(dwbar + d * D + i0, dwbar + d * D + i0 + n, T(0));
      for (int64_t j = 0; j < H; ++j) axpy(dx[d * H + j], p.win + j * D + i0, dwbar + d * D + i0, n);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> lstm_controller_cpu(const at::Tensor& wbar_in, at::IntArrayRef blocks, at::TensorList params_in) {
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
  const char* op = "tsc::lstm_controller_backward";
  const ControllerDims dims = controller_dims(op, wbar_in, blocks, params_in);
  TORCH_CHECK(grad_in.numel() == dims.dt_numel && dt_in.numel() == dims.dt_numel, op, ": grad and dt must hold ", dims.dt_numel, " values");
  TORCH_CHECK(saved_in.numel() == dims.saved_numel, op, ": saved must hold ", dims.saved_numel, " values, got ", saved_in.numel());
  TORCH_CHECK(grad_in.scalar_type() == wbar_in.scalar_type() && dt_in.scalar_type() == wbar_in.scalar_type() && saved_in.scalar_type() == wbar_in.scalar_type(),
              op, ": grad, dt and saved must have wbar_packed's dtype");
  const at::Tensor wbar = wbar_in.contiguous(), grad = grad_in.contiguous(), dt = dt_in.contiguous(), saved = saved_in.contiguous();
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
      const StageGrads<T> gr{g[kFcInW].mutable_data_ptr<T>(), g[kFcInB].mutable_data_ptr<T>(), g[kWih].mutable_data_ptr<T>(),
                             g[kWhh].mutable_data_ptr<T>(), g[kBih].mutable_data_ptr<T>(), g[kBhh].mutable_data_ptr<T>(),
                             g[kFcOutW].mutable_data_ptr<T>(), g[kFcOutB].mutable_data_ptr<T>()};
      stage_backward(st, stage_params<T>(params, s), gr, wbar.const_data_ptr<T>() + st.wbar_off,
                     grad.const_data_ptr<T>() + st.dt_off, dt.const_data_ptr<T>() + st.dt_off,
                     saved.const_data_ptr<T>() + st.saved_off, dwbar.mutable_data_ptr<T>() + st.wbar_off);
    }
  });
  return {dwbar, grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, CPU, m) {
  m.impl("weight_mean", &weight_mean_cpu);
  m.impl("weight_mean_backward", &weight_mean_backward_cpu);
  m.impl("lstm_controller", &lstm_controller_cpu);
  m.impl("lstm_controller_backward", &lstm_controller_backward_cpu);
}

}  // namespace tsc
