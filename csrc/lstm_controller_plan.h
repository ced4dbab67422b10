// Launch planning of the CUDA LSTM controller (issue 22): host code only (no CUDA headers), so the
// launcher (lstm_controller_cuda.cu) and the launch planner (lstm_controller_plan.cpp, compiled in
// every build) run the same functions.
//
// The controller is split into
// - batched products that do not depend on the recurrence, over every block of every stage at once
//   (`lstm_controller_products_kernel`): forward fc_in + ReLU, the input half of the gates
//   x W_ih^T + b_ih + b_hh, fc_out + sigmoid after the recurrence; backward fc_out's input and
//   weight gradients, the input-side gradient dx, the LSTM weight gradients and fc_in's gradients.
//   Each product is a Job: Y[r, c] = epilogue(sum_k a(r, k) b(k, c) + bias[c]), every output
//   element owned by one warp (kDot: k contiguous in both operands, lanes over k, a fixed-order
//   warp tree) or one thread (kAxpy: b contiguous in c, lanes over c, k in order). Weight
//   gradients are sums over blocks in block order: deterministic, no atomics, and the partition
//   does not depend on the GPU.
// - the recurrent cell per stage (`lstm_controller_recurrent_kernel`, backward
//   `lstm_controller_bptt_kernel`): h W_hh^T plus the precomputed input gates and the cell update,
//   one thread block per stage; its chain is the stage's number of blocks (the one exception to
//   the chain rule, docs/gpu.md: the recurrence is sequential).
// Launches: forward 4 (fc_in, input gates, cell, fc_out), backward 4 (fc_out's gradients, BPTT,
// dx and the LSTM weight gradients, fc_in's gradients), more only past kMaxJobs jobs or kMaxStages
// stages per launch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "launch_plan.h"
#include "lstm_controller_layout.h"
#include "lstm_controller_math.h"

namespace tsc {
namespace lstm_plan {

constexpr int64_t kThreads = 256;
constexpr int64_t kWarps = kThreads / 32;
constexpr int64_t kMaxJobs = 20;    // jobs per products launch (their records travel by value)
constexpr int64_t kMaxStages = 16;  // stages per recurrent launch
constexpr int64_t kWarpTreeDepth = 5;

// Where an operand or output lives: the packed buffers (offset in elements) or parameter `index`.
enum Buf : int64_t { kNone = 0, kWbar, kDt, kGradDt, kSaved, kWs, kDwbar, kParam, kParamGrad };
// kOne: the operand is 1 (bias gradients); kSigmoidBwd: sigmoid_backward(grad[i], dt[i]) (ref = kGradDt).
enum OpKind : int64_t { kPlain = 0, kOne, kSigmoidBwd };
enum Epilogue : int64_t { kLinear = 0, kRelu, kSigmoid, kReluBwd };
enum Form : int64_t { kDot = 0, kAxpy };

struct Ref {
  int64_t buf = kNone;
  int64_t index = 0;  // parameter index (kParam, kParamGrad)
  int64_t off = 0;    // element offset into the buffer
};

// a(r, k) = A[r * outer + k * inner]; b(k, c) = B[k * inner + c * outer].
struct Operand {
  Ref ref;
  int64_t kind = kPlain;
  int64_t outer = 0, inner = 0;
};

struct Job {
  int64_t form, rows, cols, K;
  Operand a, b;
  Ref y, y2, bias1, bias2, aux;  // y2: a copy of y (db_hh = db_ih); aux: ReLU output for kReluBwd
  int64_t epilogue;
};

// One kernel launch: the jobs of a products launch, or the stages [stage0, stage0 + nstages) of a
// recurrent one.
struct Step {
  std::string kernel;
  std::string phase;
  std::vector<Job> jobs;
  int64_t stage0 = 0, nstages = 0;
};

// Backward workspace per stage: dh (L, H) from fc_out, dpre (L, 4H) of the gates, dx (L, H) of
// fc_in's output, the BPTT carries dnext (H) and dc (H).
struct WsLayout {
  int64_t dh, dpre, dx, dnext, dc;
};

inline WsLayout ws_layout(const StageDims& s, int64_t base) {
  const int64_t LH = s.L * s.H;
  return {base, base + LH, base + 5 * LH, base + 6 * LH, base + 6 * LH + s.H};
}

inline std::vector<int64_t> ws_offsets(const ControllerDims& dims, int64_t* total) {
  std::vector<int64_t> off;
  int64_t t = 0;
  for (const StageDims& s : dims.stages) {
    off.push_back(t);
    t += 6 * s.L * s.H + 2 * s.H;
  }
  if (total) *total = t;
  return off;
}

inline Ref buf(int64_t b, int64_t off = 0) { return Ref{b, 0, off}; }
inline Ref param(int64_t s, int64_t k) { return Ref{kParam, kParamsPerStage * s + k, 0}; }
inline Ref param_grad(int64_t s, int64_t k) { return Ref{kParamGrad, kParamsPerStage * s + k, 0}; }
inline Operand op(Ref r, int64_t outer, int64_t inner, int64_t kind = kPlain) { return Operand{r, kind, outer, inner}; }
inline Operand one() { return Operand{Ref{}, kOne, 0, 0}; }

// Y (rows, cols) = A (rows, K) B (cols, K)^T, both contiguous in k: a warp per output.
inline Job dot_job(int64_t rows, int64_t cols, int64_t K, Operand a, Operand b, Ref y, int64_t epilogue, Ref bias1 = {},
                   Ref bias2 = {}) {
  return Job{kDot, rows, cols, K, a, b, y, Ref{}, bias1, bias2, Ref{}, epilogue};
}

// Y (rows, cols) = sum_k a(r, k) B[k, c] with B contiguous in c: a thread per output.
inline Job axpy_job(int64_t rows, int64_t cols, int64_t K, Operand a, Operand b, Ref y) {
  return Job{kAxpy, rows, cols, K, a, b, y, Ref{}, Ref{}, Ref{}, Ref{}, kLinear};
}

// saved per stage: x (L, H), gates (L, 4H), c (L, H), h (L, H).
inline int64_t saved_x(const StageDims& s) { return s.saved_off; }
inline int64_t saved_gates(const StageDims& s) { return s.saved_off + s.L * s.H; }
inline int64_t saved_h(const StageDims& s) { return s.saved_off + 6 * s.L * s.H; }

// Products launches: the jobs of every stage, split every kMaxJobs jobs.
inline void add_products(std::vector<Step>& steps, const char* phase, const std::vector<Job>& jobs) {
  for (size_t j0 = 0; j0 < jobs.size(); j0 += kMaxJobs) {
    Step st{"lstm_controller_products_kernel", phase, {}, 0, 0};
    st.jobs.assign(jobs.begin() + j0, jobs.begin() + std::min(jobs.size(), j0 + kMaxJobs));
    steps.push_back(st);
  }
}

inline void add_recurrent(std::vector<Step>& steps, const char* kernel, const char* phase, const ControllerDims& dims) {
  const int64_t S = static_cast<int64_t>(dims.stages.size());
  for (int64_t s0 = 0; s0 < S; s0 += kMaxStages)
    steps.push_back(Step{kernel, phase, {}, s0, std::min(kMaxStages, S - s0)});
}

inline std::vector<Step> forward_steps(const ControllerDims& dims) {
  std::vector<Job> fc_in, gates, fc_out;
  for (int64_t s = 0; s < static_cast<int64_t>(dims.stages.size()); ++s) {
    const StageDims& st = dims.stages[s];
    const int64_t L = st.L, D = st.D, H = st.H, C = st.C;
    // x = relu(w̄ W_in^T + b_in)
    fc_in.push_back(dot_job(L, H, D, op(buf(kWbar, st.wbar_off), D, 1), op(param(s, kFcInW), D, 1),
                            buf(kSaved, saved_x(st)), kRelu, param(s, kFcInB)));
    // gates' input half, x W_ih^T + b_ih + b_hh, into the gates of `saved` (the cell adds h W_hh^T)
    gates.push_back(dot_job(L, 4 * H, H, op(buf(kSaved, saved_x(st)), H, 1), op(param(s, kWih), H, 1),
                            buf(kSaved, saved_gates(st)), kLinear, param(s, kBih), param(s, kBhh)));
    // Δt = sigmoid(h W_out^T + b_out)
    fc_out.push_back(dot_job(L, C, H, op(buf(kSaved, saved_h(st)), H, 1), op(param(s, kFcOutW), H, 1),
                             buf(kDt, st.dt_off), kSigmoid, param(s, kFcOutB)));
  }
  std::vector<Step> steps;
  add_products(steps, "forward", fc_in);
  add_products(steps, "forward", gates);
  add_recurrent(steps, "lstm_controller_recurrent_kernel", "forward", dims);
  add_products(steps, "forward", fc_out);
  return steps;
}

inline std::vector<Step> backward_steps(const ControllerDims& dims) {
  std::vector<int64_t> ws = ws_offsets(dims, nullptr);
  std::vector<Job> out, mid, in;
  for (int64_t s = 0; s < static_cast<int64_t>(dims.stages.size()); ++s) {
    const StageDims& st = dims.stages[s];
    const int64_t L = st.L, D = st.D, H = st.H, C = st.C;
    const WsLayout w = ws_layout(st, ws[s]);
    const Operand gz_rows = op(buf(kGradDt, st.dt_off), C, 1, kSigmoidBwd);  // gz(d, o), d the row
    // fc_out: dh = gz W_out, dW_out = gz^T h, db_out = sum_d gz.
    out.push_back(axpy_job(L, H, C, gz_rows, op(param(s, kFcOutW), 1, H), buf(kWs, w.dh)));
    out.push_back(axpy_job(C, H, L, op(buf(kGradDt, st.dt_off), 1, C, kSigmoidBwd), op(buf(kSaved, saved_h(st)), 1, H),
                           param_grad(s, kFcOutW)));
    out.push_back(axpy_job(1, C, L, one(), op(buf(kGradDt, st.dt_off), 1, C, kSigmoidBwd), param_grad(s, kFcOutB)));
    // dx = relu'(dpre W_ih); dW_ih = dpre^T x; dW_hh = dpre[1:]^T h[:-1]; db_ih = db_hh = sum_d dpre.
    Job dx = axpy_job(L, H, 4 * H, op(buf(kWs, w.dpre), 4 * H, 1), op(param(s, kWih), 1, H), buf(kWs, w.dx));
    dx.epilogue = kReluBwd;
    dx.aux = buf(kSaved, saved_x(st));
    mid.push_back(dx);
    mid.push_back(
        axpy_job(4 * H, H, L, op(buf(kWs, w.dpre), 1, 4 * H), op(buf(kSaved, saved_x(st)), 1, H), param_grad(s, kWih)));
    mid.push_back(axpy_job(4 * H, H, std::max<int64_t>(L - 1, 0), op(buf(kWs, w.dpre + 4 * H), 1, 4 * H),
                           op(buf(kSaved, saved_h(st)), 1, H), param_grad(s, kWhh)));
    Job db = axpy_job(1, 4 * H, L, one(), op(buf(kWs, w.dpre), 1, 4 * H), param_grad(s, kBih));
    db.y2 = param_grad(s, kBhh);
    mid.push_back(db);
    // fc_in: dW_in = dx^T w̄, db_in = sum_d dx, dw̄ = dx W_in.
    in.push_back(axpy_job(H, D, L, op(buf(kWs, w.dx), 1, H), op(buf(kWbar, st.wbar_off), 1, D), param_grad(s, kFcInW)));
    in.push_back(axpy_job(1, H, L, one(), op(buf(kWs, w.dx), 1, H), param_grad(s, kFcInB)));
    in.push_back(axpy_job(L, D, H, op(buf(kWs, w.dx), H, 1), op(param(s, kFcInW), 1, D), buf(kDwbar, st.wbar_off)));
  }
  std::vector<Step> steps;
  add_products(steps, "backward", out);
  add_recurrent(steps, "lstm_controller_bptt_kernel", "backward", dims);
  add_products(steps, "backward", mid);
  add_products(steps, "backward", in);
  return steps;
}

inline int64_t outputs_per_block(const Job& j) { return j.form == kDot ? kWarps : kThreads; }

inline int64_t job_blocks(const Job& j) {
  const int64_t per = outputs_per_block(j);
  return (j.rows * j.cols + per - 1) / per;
}

// Elements an operand reads (rows x K of a, K x cols of b; 2x for sigmoid_backward's two inputs).
inline int64_t operand_numel(const Operand& o, int64_t n) {
  return o.kind == kOne ? 0 : (o.kind == kSigmoidBwd ? 2 * n : n);
}

inline int64_t job_numel(const Job& j) {
  const int64_t out = j.rows * j.cols;
  int64_t n = operand_numel(j.a, j.rows * j.K) + operand_numel(j.b, j.K * j.cols) + out;
  if (j.y2.buf != kNone) n += out;
  if (j.aux.buf != kNone) n += out;
  if (j.bias1.buf != kNone) n += j.cols;
  if (j.bias2.buf != kNone) n += j.cols;
  return n;
}

// The launch's fields (launch_plan.h). Products: one block per kWarps (kDot) or kThreads (kAxpy)
// outputs; chain: the k loop streams (1) plus kDot's warp tree. Recurrent: a block per stage, chain
// = the longest stage's blocks; bytes: W_hh and the stage's slices of saved / workspace.
inline Launch step_launch(const Step& st, const ControllerDims& dims, int64_t elem) {
  Launch l{st.kernel, st.phase, {1, 1, 1}, kThreads, 0, 1, 32 * elem, 0};
  if (!st.jobs.empty()) {
    int64_t blocks = 0;
    for (const Job& j : st.jobs) {
      blocks += job_blocks(j);
      l.bytes += job_numel(j) * elem;
      if (j.form == kDot) l.chain = std::max<int64_t>(l.chain, 1 + kWarpTreeDepth);
      // a warp's lanes walk k (kDot) or c (kAxpy) contiguously, up to 32 of them
      l.request_bytes = std::min(l.request_bytes, std::min<int64_t>(32, j.form == kDot ? j.K : j.cols) * elem);
    }
    l.grid[0] = std::max<int64_t>(blocks, 1);
    return l;
  }
  l.grid[0] = st.nstages;
  for (int64_t s = st.stage0; s < st.stage0 + st.nstages; ++s) {
    const StageDims& sd = dims.stages[s];
    l.chain = std::max(l.chain, sd.L);
    // W_hh's rows (forward, lanes along a row) and columns (BPTT, lanes along j): H contiguous at most
    l.request_bytes = std::min(l.request_bytes, std::min<int64_t>(32, sd.H) * elem);
    // forward: W_hh, gates read and written, c and h written; backward: W_hh, gates, c, dh read, dpre written
    l.bytes += (4 * sd.H * sd.H + 10 * sd.L * sd.H + 2 * sd.H) * elem;
  }
  return l;
}

inline std::vector<Launch> launches(const std::vector<Step>& steps, const ControllerDims& dims, int64_t elem) {
  std::vector<Launch> out;
  for (const Step& st : steps) out.push_back(step_launch(st, dims, elem));
  return out;
}

// ---- A job with its pointers resolved: what the products kernel reads (by value) and what the
// host executor (lstm_controller_plan.cpp, the CPU tests' check of these plans) runs. The element
// semantics are these TSC_HD functions on both sides.
template <typename T>
struct JobOperand {
  const T* p;
  const T* q;  // dt, for kSigmoidBwd
  int64_t kind, outer, inner;
};

template <typename T>
struct JobPtrs {
  JobOperand<T> a, b;
  T* y;
  T* y2;
  const T *bias1, *bias2, *aux;
  int64_t form, rows, cols, K, epilogue, block0;
};

template <typename T>
TSC_HD T operand_at(const JobOperand<T>& o, int64_t i) {
  if (o.kind == kOne) return T(1);
  if (o.kind == kSigmoidBwd) return sigmoid_backward(o.p[i], o.q[i]);
  return o.p[i];
}

// a(r, k) and b(k, c) of job j.
template <typename T>
TSC_HD T a_at(const JobPtrs<T>& j, int64_t r, int64_t k) {
  return operand_at(j.a, r * j.a.outer + k * j.a.inner);
}

template <typename T>
TSC_HD T b_at(const JobPtrs<T>& j, int64_t k, int64_t c) {
  return operand_at(j.b, k * j.b.inner + c * j.b.outer);
}

// sum_k a(r, k) b(k, c), k in order (the kAxpy thread's loop).
template <typename T>
TSC_HD T ordered_sum(const JobPtrs<T>& j, int64_t r, int64_t c) {
  T s = 0;
  for (int64_t k = 0; k < j.K; ++k) s += a_at(j, r, k) * b_at(j, k, c);
  return s;
}

template <typename T>
TSC_HD void store_output(const JobPtrs<T>& j, int64_t r, int64_t c, T s) {
  if (j.bias1) s += j.bias1[c];
  if (j.bias2) s += j.bias2[c];
  const int64_t e = r * j.cols + c;
  if (j.epilogue == kRelu)
    s = relu_forward(s);
  else if (j.epilogue == kSigmoid)
    s = sigmoid(s);
  else if (j.epilogue == kReluBwd)
    s = relu_backward(s, j.aux[e]);
  j.y[e] = s;
  if (j.y2) j.y2[e] = s;
}

// The packed buffers and parameters of one call (host side): resolves a plan Ref to its pointer.
template <typename T>
struct Buffers {
  const T *wbar = nullptr, *dt_in = nullptr, *grad = nullptr;
  T *dt = nullptr, *saved = nullptr, *ws = nullptr, *dwbar = nullptr;
  const std::vector<at::Tensor>* params = nullptr;
  std::vector<at::Tensor>* grads = nullptr;

  T* at(const Ref& r) const {
    switch (r.buf) {
      case kWbar:
        return const_cast<T*>(wbar) + r.off;
      case kDt:
        return (dt ? dt : const_cast<T*>(dt_in)) + r.off;
      case kGradDt:
        return const_cast<T*>(grad) + r.off;
      case kSaved:
        return saved + r.off;
      case kWs:
        return ws + r.off;
      case kDwbar:
        return dwbar + r.off;
      case kParam:
        return const_cast<T*>((*params)[r.index].template const_data_ptr<T>());
      case kParamGrad:
        return (*grads)[r.index].template mutable_data_ptr<T>();
      default:
        return nullptr;
    }
  }

  JobOperand<T> operand(const Operand& o) const {
    // kSigmoidBwd reads grad at ref and dt at the same offset
    return JobOperand<T>{at(o.ref), o.kind == kSigmoidBwd ? at(Ref{kDt, 0, o.ref.off}) : nullptr, o.kind, o.outer,
                         o.inner};
  }

  JobPtrs<T> job(const Job& j, int64_t block0) const {
    return JobPtrs<T>{operand(j.a), operand(j.b), at(j.y), at(j.y2), at(j.bias1), at(j.bias2), at(j.aux),
                      j.form,       j.rows,       j.cols,  j.K,      j.epilogue,  block0};
  }
};

}  // namespace lstm_plan
}  // namespace tsc
