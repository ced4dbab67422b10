// The CUDA launch planner of tsc::lstm_controller (launch_plan.h): the launches
// lstm_controller_cuda.cu makes, from the same host functions (lstm_controller_plan.h). Compiled in
// every build: the CPU tests check the GPU's launches at ResNet-50/152 and CIFAR-1202 controllers.
#include "lstm_controller_plan.h"

#include <torch/library.h>

#include <cmath>

namespace tsc {
namespace {

// Arguments (launch_plan.h's flattening of (Tensor wbar_packed, int[] blocks, Tensor[] params)):
// tensors = wbar_packed, params...; ints = len(blocks), blocks..., len(params).
std::vector<Launch> lstm_controller_planner(const PlanArgs& args) {
  TORCH_CHECK(!args.ints.empty() && !args.tensors.empty(), "lstm_controller planner: malformed arguments");
  const int64_t S = args.ints[0];
  TORCH_CHECK(static_cast<int64_t>(args.ints.size()) == S + 2, "lstm_controller planner: malformed blocks");
  const std::vector<int64_t> blocks(args.ints.begin() + 1, args.ints.begin() + 1 + S);
  const std::vector<at::Tensor> params(args.tensors.begin() + 1, args.tensors.end());
  const ControllerDims dims = controller_dims("tsc::lstm_controller", args.tensors[0], blocks, params);
  const int64_t elem = static_cast<int64_t>(args.tensors[0].element_size());
  std::vector<Launch> plan = lstm_plan::launches(lstm_plan::forward_steps(dims), dims, elem);
  for (const Launch& l : lstm_plan::launches(lstm_plan::backward_steps(dims), dims, elem)) plan.push_back(l);
  return plan;
}

}  // namespace
}  // namespace tsc

TSC_REGISTER_CUDA_PLANNER(lstm_controller, &tsc::lstm_controller_planner);

// ---- The host executor of the CUDA plan: runs forward_steps / backward_steps on CPU tensors, job by
// job (the products kernel's element functions: a_at, b_at, store_output; kDot's k order is serial
// here, a warp tree on the GPU) and stage by stage (the cell kernels' loops with the shared cell
// math). The CPU tests compare it with the reference: the offsets, strides and buffer layout the
// CUDA launcher sends cannot drift unseen on machines without a GPU.
// tsc::_lstm_controller_cuda_plan_on_cpu(wbar_packed, blocks, params, grad) -> (dt, saved, dwbar, grads).
namespace tsc {
namespace {

template <typename T>
void run_products(const lstm_plan::Step& st, const lstm_plan::Buffers<T>& b) {
  for (const lstm_plan::Job& job : st.jobs) {
    const lstm_plan::JobPtrs<T> j = b.job(job, 0);
    for (int64_t r = 0; r < j.rows; ++r)
      for (int64_t c = 0; c < j.cols; ++c) lstm_plan::store_output(j, r, c, lstm_plan::ordered_sum(j, r, c));
  }
}

template <typename T>
T row_dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
void run_cells_forward(const StageDims& sd, const T* whh, T* saved) {
  const int64_t L = sd.L, H = sd.H;
  T* gates = saved + sd.saved_off + L * H;
  T* c = gates + 4 * L * H;
  T* h = c + L * H;
  for (int64_t d = 0; d < L; ++d) {
    T* gd = gates + d * 4 * H;
    if (d > 0)
      for (int64_t k = 0; k < 4 * H; ++k) gd[k] += row_dot(whh + k * H, h + (d - 1) * H, H);
    for (int64_t j = 0; j < H; ++j)
      lstm_cell_forward(gd[j], gd[H + j], gd[2 * H + j], gd[3 * H + j], d > 0 ? c[(d - 1) * H + j] : T(0), c[d * H + j],
                        h[d * H + j]);
  }
}

template <typename T>
void run_cells_backward(const StageDims& sd, const lstm_plan::WsLayout& w, const T* whh, const T* saved, T* ws) {
  const int64_t L = sd.L, H = sd.H;
  const T* gates = saved + sd.saved_off + L * H;
  const T* c = gates + 4 * L * H;
  T *dh = ws + w.dh, *dpre = ws + w.dpre, *dnext = ws + w.dnext, *dc = ws + w.dc;
  for (int64_t j = 0; j < H; ++j) dnext[j] = dc[j] = T(0);
  for (int64_t d = L - 1; d >= 0; --d) {
    const T* gd = gates + d * 4 * H;
    T* dp = dpre + d * 4 * H;
    for (int64_t j = 0; j < H; ++j)
      dc[j] = lstm_cell_backward(dh[d * H + j] + dnext[j], dc[j], gd[j], gd[H + j], gd[2 * H + j], gd[3 * H + j],
                                 c[d * H + j], d > 0 ? c[(d - 1) * H + j] : T(0), dp[j], dp[H + j], dp[2 * H + j],
                                 dp[3 * H + j]);
    for (int64_t j = 0; j < H && d > 0; ++j) {
      T s = 0;
      for (int64_t k = 0; k < 4 * H; ++k) s += dp[k] * whh[k * H + j];
      dnext[j] = s;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> plan_on_cpu(const at::Tensor& wbar_in,
                                                                                    at::IntArrayRef blocks,
                                                                                    at::TensorList params_in,
                                                                                    const at::Tensor& grad_in) {
  const ControllerDims dims = controller_dims("tsc::_lstm_controller_cuda_plan_on_cpu", wbar_in, blocks, params_in);
  TORCH_CHECK(wbar_in.device().is_cpu() && grad_in.numel() == dims.dt_numel,
              "_lstm_controller_cuda_plan_on_cpu: CPU tensors, grad like dt");
  const at::Tensor wbar = wbar_in.contiguous(), grad = grad_in.to(wbar.scalar_type()).contiguous();
  const std::vector<at::Tensor> params = contiguous_all(params_in);
  at::Tensor dt = at::empty({dims.dt_numel}, wbar.options()), saved = at::empty({dims.saved_numel}, wbar.options());
  at::Tensor dwbar = at::empty({dims.wbar_numel}, wbar.options());
  int64_t ws_total = 0;
  const std::vector<int64_t> ws_off = lstm_plan::ws_offsets(dims, &ws_total);
  at::Tensor ws = at::full({ws_total}, std::nan(""), wbar.options());  // a value read before it is written shows
  std::vector<at::Tensor> grads;
  for (const auto& p : params) grads.push_back(at::full_like(p, std::nan("")));
  AT_DISPATCH_FLOATING_TYPES(wbar.scalar_type(), "lstm_controller_cuda_plan_on_cpu", [&] {
    using T = scalar_t;
    lstm_plan::Buffers<T> b;
    b.wbar = wbar.const_data_ptr<T>();
    b.dt = dt.mutable_data_ptr<T>();
    b.saved = saved.mutable_data_ptr<T>();
    b.params = &params;
    for (const lstm_plan::Step& st : lstm_plan::forward_steps(dims)) {
      if (!st.jobs.empty()) run_products(st, b);
      for (int64_t s = st.stage0; s < st.stage0 + st.nstages; ++s)
        run_cells_forward(dims.stages[s], params[kParamsPerStage * s + kWhh].const_data_ptr<T>(), b.saved);
    }
    b.dt = nullptr;  // the backward reads the forward's dt
    b.dt_in = dt.const_data_ptr<T>();
    b.grad = grad.const_data_ptr<T>();
    b.ws = ws.mutable_data_ptr<T>();
    b.dwbar = dwbar.mutable_data_ptr<T>();
    b.grads = &grads;
    for (const lstm_plan::Step& st : lstm_plan::backward_steps(dims)) {
      if (!st.jobs.empty()) run_products(st, b);
      for (int64_t s = st.stage0; s < st.stage0 + st.nstages; ++s)
        run_cells_backward(dims.stages[s], lstm_plan::ws_layout(dims.stages[s], ws_off[s]),
                           params[kParamsPerStage * s + kWhh].const_data_ptr<T>(), b.saved, b.ws);
    }
  });
  return {dt, saved, dwbar, grads};
}

}  // namespace
}  // namespace tsc

TORCH_LIBRARY_FRAGMENT(tsc, m) {
  // Test support (tests/test_controller_plans.py): the CUDA launcher's plan of lstm_controller and
  // its backward, run on CPU tensors (host executor above). Not a public op.
  m.def(
      "_lstm_controller_cuda_plan_on_cpu(Tensor wbar_packed, int[] blocks, Tensor[] params, Tensor grad) -> (Tensor, Tensor, Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(tsc, CPU, m) { m.impl("_lstm_controller_cuda_plan_on_cpu", &tsc::plan_on_cpu); }
