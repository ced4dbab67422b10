// CUDA launch plan of scale_concat (launch_plan.h), from the geometry its launcher
// (scale_concat_cuda.cu) uses: elementwise_blocks and plan_channel_reduction of launch_geometry.h
// on the same prepared arguments. Host code, compiled in every build.
//
// Kernels and how their fields are counted:
//   scale_concat_forward_kernel (packed_launch, scale_concat_pack elements per thread: 16-byte
//     packs, or bf16 / half pairs, never straddling x and f): every out element read once from x
//     or f and written; chain 1.
//   scale_concat_backward_kernel (reduction_launch over f's (outer, k, inner) view): reads grad's
//     last k channels and f, writes df and a (chunks, k) partial table; streaming loop (chain 1),
//     then a fixed tree over the value lanes; smem: one acc per thread.
//   fold_chunks_kernel (channel_fold_launch, only with more than one chunk): a warp per channel.
#include "launch_geometry.h"
#include "scale_concat_layout.h"

namespace tsc {
namespace {

// Forward arguments (launch_plan.h order): tensors x, f, dt.
std::vector<Launch> plan_scale_concat(const PlanArgs& p) {
  TORCH_CHECK(p.tensors.size() == 3, "scale_concat planner: expected 3 tensors");
  const ScaleConcatForward a = prepare_scale_concat_forward(p.tensors[0], p.tensors[1], p.tensors[2]);
  const int64_t numel = a.out.numel(), es = a.out.element_size(), acc = acc_size(es), k = a.shape.k;
  std::vector<Launch> plan;
  if (numel == 0) return plan;
  plan.push_back(packed_launch("scale_concat_forward_kernel", "forward", numel, es, 2, k * acc, p.sms,
                               scale_concat_pack(a.shape, es)));
  // Backward of a gradient shaped (and laid out) like out.
  const ScaleConcatBackward b = prepare_scale_concat_backward(a.out, a.f, a.dt);
  if (b.f.numel() == 0) return plan;
  const ChannelView v = scale_concat_f_view(b.shape);
  const ChannelReduction r = plan_channel_reduction(v, es);
  plan.push_back(reduction_launch("scale_concat_backward_kernel", "backward", r, v, es, 3, 1, acc));
  if (r.chunks > 1) plan.push_back(channel_fold_launch("fold_chunks_kernel", "backward", k, r.chunks, 1, acc, k * acc));
  return plan;
}

}  // namespace

TSC_REGISTER_CUDA_PLANNER(scale_concat, plan_scale_concat);

}  // namespace tsc
