// CUDA launch plan of the residual update (launch_plan.h), from the geometry its launcher
// (residual_update_cuda.cu) uses: elementwise_blocks and plan_channel_reduction of launch_geometry.h
// on the same prepared arguments. Host code, compiled in every build.
//
// Kernels and how their fields are counted:
//   residual_forward_kernel (elementwise_launch): reads y, f, writes out in 16-byte packs; chain 1.
//   residual_backward_kernel (reduction_launch): reads grad, f (and relu_out, writing dy), writes df
//     and a (chunks, C) partial table; each thread streams its values (chain 1), then a fixed tree
//     over the value lanes (8 levels for 256, 3 for 8); smem: one acc per thread.
//   fold_chunks_kernel (channel_fold_launch, only with more than one chunk): a warp per channel.
#include "launch_geometry.h"
#include "residual_layout.h"

namespace tsc {
namespace {

// Forward arguments (launch_plan.h order): tensors y, f, dt; ints relu.
std::vector<Launch> plan_residual_update(const PlanArgs& p) {
  TORCH_CHECK(p.tensors.size() == 3 && p.ints.size() == 1, "residual_update planner: expected 3 tensors and 1 int");
  const bool relu = p.ints[0] != 0;
  const ForwardArgs a = prepare_forward(p.tensors[0], p.tensors[1], p.tensors[2]);
  const ChannelView v = a.view;
  const int64_t numel = a.y.numel(), es = a.y.element_size(), acc = acc_size(es);
  std::vector<Launch> plan;
  if (numel == 0) return plan;
  plan.push_back(elementwise_launch("residual_forward_kernel", "forward", numel, es, 3, v.channels * acc, p.sms, true));
  // Backward of a gradient shaped like out (and out as relu_out).
  const ChannelReduction r = plan_channel_reduction(v);
  plan.push_back(reduction_launch("residual_backward_kernel", "backward", r, v, es, relu ? 5 : 3, 1, acc));
  if (r.chunks > 1) plan.push_back(channel_fold_launch("fold_chunks_kernel", "backward", v.channels, r.chunks, 1, acc, v.channels * acc));
  return plan;
}

}  // namespace

TSC_REGISTER_CUDA_PLANNER(residual_update, plan_residual_update);

}  // namespace tsc
