// CUDA launch plan of the fused BatchNorm tail (launch_plan.h), from the geometry its launcher
// (batch_norm_residual_update_cuda.cu) uses: plan_channel_reduction and fold_blocks of
// launch_geometry.h, on the same prepared arguments. Host code, compiled in every build.
//
// Kernels and how their fields are counted:
//   bn_stats_kernel / bn_backward_sums_kernel (reduction_launch): each thread streams its values
//     (chain 1), then a fixed tree over the block's value lanes (log2 of 256 / lanes steps); smem = the
//     per-thread Moments (3 acc) / Sums (2 acc) slots (one per channel of a bf16 / half pair); a warp
//     reads 32 adjacent items of a plane or 32 / lanes rows of min(C, 32 pack) adjacent channels
//     (launch_geometry.h channel_reduction_request).
//   bn_forward_channels_kernel / bn_backward_channels_kernel (channel_pass_launch): a warp per
//     channel, lanes merge chunks j = lane, lane + 32, ... then a 5-level shuffle tree; with at most one
//     chunk (eval, C = 2^20) a thread per channel, a warp on 32 adjacent channels (chain 1).
//   Planes under 128 bytes (3x3 maps, bf16 7x7): the reductions run channel groups
//     (launch_geometry.h plan_channel_groups): dynamic shared memory of a column per value of the run.
//   bn_apply_kernel / bn_backward_apply_kernel (elementwise_launch): 16-byte packs.
// Also tsc::_bn_merge_chunks: the GPU's fixed merge order run on the host (tests/test_cuda_plans.py), and
// tsc::_bn_shifted_moments: a statistics thread's per-value sums and its one conversion to moments.
#include <torch/library.h>

#include "batch_norm_residual_update_layout.h"
#include "batch_norm_residual_update_math.h"
#include "launch_geometry.h"

namespace tsc {
namespace {

std::optional<at::Tensor> opt(const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; }

// Forward arguments (launch_plan.h order): tensors y, x, dt, running_mean, running_var, weight,
// bias; ints training, relu; floats momentum, eps.
std::vector<Launch> plan_batch_norm_residual_update(const PlanArgs& p) {
  TORCH_CHECK(p.tensors.size() == 7 && p.ints.size() == 2,
              "batch_norm_residual_update planner: expected 7 tensors and 2 ints");
  const bool training = p.ints[0] != 0, relu = p.ints[1] != 0;
  const BnForwardArgs a = prepare_bn_forward(p.tensors[0], p.tensors[1], p.tensors[2], opt(p.tensors[3]),
                                             opt(p.tensors[4]), opt(p.tensors[5]), opt(p.tensors[6]), training);
  const ChannelView v = a.view;
  const int64_t C = v.channels, numel = a.y.numel(), es = a.y.element_size(), acc = acc_size(es);
  std::vector<Launch> plan;
  if (C == 0) return plan;
  const ChannelReduction r = plan_channel_reduction(v, es, true);
  if (training) plan.push_back(reduction_launch("bn_stats_kernel", "forward", r, v, es, 1, 3, 3 * acc));
  // per channel: partials (training) or running statistics, dt / weight / bias, running update, save_* and coef
  plan.push_back(
      channel_pass_launch("bn_forward_channels_kernel", "forward", C, training ? r.chunks : 0, 3, acc, 11 * C * acc));
  if (numel > 0)
    plan.push_back(elementwise_launch("bn_apply_kernel", "forward", numel, es, 3, 3 * C * acc, p.sms, true));
  // Backward of a gradient shaped like out, with the saved statistics (and out as relu_out).
  if (numel > 0)
    plan.push_back(reduction_launch("bn_backward_sums_kernel", "backward", r, v, es, relu ? 3 : 2, 2, 2 * acc));
  plan.push_back(channel_pass_launch("bn_backward_channels_kernel", "backward", C, numel > 0 ? r.chunks : 0, 2, acc,
                                     11 * C * acc));
  if (numel > 0)
    plan.push_back(
        elementwise_launch("bn_backward_apply_kernel", "backward", numel, es, relu ? 5 : 3, 4 * C * acc, p.sms, true));
  return plan;
}

// partial: (3, chunks) count, mean, m2 of each chunk -> (3,) merged as the CUDA per-channel kernel merges them.
at::Tensor bn_merge_chunks(const at::Tensor& partial) {
  TORCH_CHECK(partial.dim() == 2 && partial.size(0) == 3, "tsc::_bn_merge_chunks: partial must be (3, chunks), got ",
              partial.sizes());
  TORCH_CHECK(partial.device().is_cpu() && at::isFloatingType(partial.scalar_type()),
              "tsc::_bn_merge_chunks: partial must be a CPU float tensor");
  const at::Tensor p = partial.to(at::kDouble).contiguous();
  const auto q = p.accessor<double, 2>();
  at::Tensor out = at::empty({3}, p.options());
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "tsc_bn_merge_chunks", [&] {
    const Moments<scalar_t> m = merge_chunks_like_gpu<scalar_t>(p.size(1), [&](int64_t j) {
      return Moments<scalar_t>{static_cast<scalar_t>(q[0][j]), static_cast<scalar_t>(q[1][j]),
                               static_cast<scalar_t>(q[2][j])};
    });
    out[0] = static_cast<double>(m.count);
    out[1] = static_cast<double>(m.mean);
    out[2] = static_cast<double>(m.m2);
  });
  return out.to(partial.scalar_type());
}

// values: (n,) one thread's values in order -> (3,) count, mean, m2 as bn_stats_kernel's thread computes them
// (push_shifted around the first value, then shifted_to_moments), in values' dtype.
at::Tensor bn_shifted_moments(const at::Tensor& values) {
  TORCH_CHECK(values.dim() == 1 && values.device().is_cpu() && at::isFloatingType(values.scalar_type()),
              "tsc::_bn_shifted_moments: values must be a 1-D CPU float tensor, got ", values.sizes());
  const at::Tensor p = values.to(at::kDouble).contiguous();
  const auto q = p.accessor<double, 1>();
  at::Tensor out = at::empty({3}, p.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "tsc_bn_shifted_moments", [&] {
    const scalar_t k = p.size(0) > 0 ? static_cast<scalar_t>(q[0]) : scalar_t(0);
    ShiftedSums<scalar_t> a{scalar_t(0), scalar_t(0), scalar_t(0)};
    for (int64_t i = 0; i < p.size(0); ++i) push_shifted(a, static_cast<scalar_t>(q[i]), k);
    const Moments<scalar_t> m = shifted_to_moments(a, k);
    out[0] = static_cast<double>(m.count);
    out[1] = static_cast<double>(m.mean);
    out[2] = static_cast<double>(m.m2);
  });
  return out.to(values.scalar_type());
}

}  // namespace

TSC_REGISTER_CUDA_PLANNER(batch_norm_residual_update, plan_batch_norm_residual_update);

}  // namespace tsc

TORCH_LIBRARY_FRAGMENT(tsc, m) {
  // Test hook (tests/test_cuda_plans.py): chunks' moments merged in the CUDA per-channel kernel's order.
  m.def("_bn_merge_chunks(Tensor partial) -> Tensor", &tsc::bn_merge_chunks);
  // Test hook: one statistics thread's shifted sums converted to moments (tests/test_cuda_plans.py).
  m.def("_bn_shifted_moments(Tensor values) -> Tensor", &tsc::bn_shifted_moments);
}
