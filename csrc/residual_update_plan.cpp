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
#include <torch/library.h>

#include "launch_geometry.h"
#include "residual_update_layout.h"

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
  const ChannelReduction r = plan_channel_reduction(v, es, true);
  plan.push_back(reduction_launch("residual_backward_kernel", "backward", r, v, es, relu ? 5 : 3, 1, acc));
  if (r.chunks > 1)
    plan.push_back(
        channel_fold_launch("fold_chunks_kernel", "backward", v.channels, r.chunks, 1, acc, v.channels * acc));
  return plan;
}

// Test hook (tests/test_cuda_plans.py): the items every thread of a per-channel reduction over an
// (outer, C, inner) view of element_size-byte values walks (the residual update's and the BatchNorm
// tail's plan, channel groups included), by the very walk_reduction_items / walk_group_items the
// CUDA kernels run: rows (tile, chunk, x, y, channel of the first element, first element, count) in
// walk order (groups: a thread's items in order, each over its samples in order), and the plan
// (lanes, value_lanes, tiles, chunks, chunk, pack, per_plane, items, rows, group).
std::tuple<at::Tensor, at::Tensor> channel_reduction_walk(int64_t outer, int64_t C, int64_t inner,
                                                          int64_t element_size) {
  TORCH_CHECK(outer > 0 && C > 0 && inner > 0 && outer * C * inner <= (int64_t{1} << 24),
              "tsc::_channel_reduction_walk: a small positive (outer, C, inner), got ", outer, ", ", C, ", ", inner);
  const ChannelReduction r = plan_channel_reduction(ChannelView{outer, C, inner}, element_size, true);
  std::vector<int64_t> rows;
  for (int64_t tile = 0; tile < r.tiles; ++tile)
    for (int64_t j = 0; j < r.chunks; ++j)
      for (int64_t x = 0; x < r.lanes; ++x)
        for (int64_t y = 0; y < r.value_lanes; ++y) {
          const int64_t c = reduction_channel(r, tile, x);
          if (c >= C) continue;  // the kernels' idle lanes
          if (r.group) {
            walk_group_items(r, tile, j, x, [&](int64_t s, int64_t n, int64_t o0, int64_t o1) {
              for (int64_t o = o0; o < o1; ++o)
                rows.insert(rows.end(), {tile, j, x, y, c + s / inner, (o * C + c) * inner + s, n});
            });
            continue;
          }
          walk_reduction_items(r, c, j, y, [&](int64_t o, int64_t s, int64_t n) {
            rows.insert(rows.end(), {tile, j, x, y, c, (o * C + c) * inner + s, n});
          });
        }
  const int64_t n = static_cast<int64_t>(rows.size()) / 7;
  at::Tensor walk = at::tensor(rows, at::kLong).reshape({n, 7});
  at::Tensor plan = at::tensor(std::vector<int64_t>{r.lanes, r.value_lanes, r.tiles, r.chunks, r.chunk, r.pack,
                                                    r.per_plane, r.items, r.rows ? 1 : 0, r.group},
                               at::kLong);
  return {walk, plan};
}

}  // namespace

TSC_REGISTER_CUDA_PLANNER(residual_update, plan_residual_update);

}  // namespace tsc

TORCH_LIBRARY_FRAGMENT(tsc, m) {
  m.def("_channel_reduction_walk(int outer, int C, int inner, int element_size) -> (Tensor, Tensor)",
        &tsc::channel_reduction_walk);
}
