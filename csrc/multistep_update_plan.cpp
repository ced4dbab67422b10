// CUDA launch plan of the multi-step update (launch_plan.h), from the geometry its launcher
// (multistep_update_cuda.cu) uses: multistep_update_plan.h and launch_geometry.h on the same
// prepared arguments. Host code, compiled in every build.
//
// Kernels and how their fields are counted:
//   multistep_forward_kernel (elementwise_launch): reads u, u_prev, f, writes out, 16-byte packs.
//   multistep_backward_kernel: reads grad, u, u_prev, f (relu_out), writes du, du_prev, df and the
//     two (N, C) tables. Each thread streams its items (chain 1), then channel-first: a warp
//     sum (5 shuffles), a warp reading 32 adjacent items (min(S, 32 pack) values) of a plane (planes
//     under 128 bytes: channel groups, multistep_update_plan.h, 32 items of a run, chain S, 2 x group x S acc smem);
//     channels-last: 7 serial adds over the 8 rows in shared memory (2 x 8 x 32 x pack-slot acc), a
//     warp reading min(C, 32 pack) adjacent channels (pack = 2 for bf16 / half: 4-byte loads).
//   multistep_fold_kernel: a warp per channel folds the N * chunks rows of the tables
//     (fold_chain(rows, 32)); with keep, a block per sample folds its chunks x C values
//     (ceil(chunks * C / 256), then block_sum's 10 shuffle levels).
//   multistep_dk_kernel: one block folds the C column sums (ceil(C / 256) + 10).
#include "multistep_update_plan.h"

namespace tsc {
namespace {

std::optional<at::Tensor> opt(const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; }

int64_t block_fold_chain(int64_t n) { return ceil_div(std::max<int64_t>(n, 1), 256) + 2 * tree_depth(32); }

// Forward arguments (launch_plan.h order): tensors u, u_prev, f, k, dt, keep; ints relu.
std::vector<Launch> plan_multistep_update(const PlanArgs& p) {
  TORCH_CHECK(p.tensors.size() == 6 && p.ints.size() == 1, "multistep_update planner: expected 6 tensors and 1 int");
  const bool relu = p.ints[0] != 0;
  const MultistepForwardArgs a = prepare_multistep_forward(p.tensors[0], p.tensors[1], p.tensors[2], p.tensors[3],
                                                           opt(p.tensors[4]), opt(p.tensors[5]));
  const MultistepView v = a.view;
  const int64_t numel = a.u.numel(), es = a.u.element_size(), acc = acc_size(es);
  const bool keep = a.keep.defined();
  std::vector<Launch> plan;
  if (numel > 0)
    plan.push_back(
        elementwise_launch("multistep_forward_kernel", "forward", numel, es, 4, (v.C + v.N) * acc, p.sms, true));
  // Backward of a gradient shaped like out (and out as relu_out).
  const multistep_plan::BackwardSplit split = multistep_plan::backward_split(v, es);
  const int64_t rows = v.N * split.chunks, table = 2 * rows * v.C * acc;
  if (numel > 0) {
    // a warp's 32 items: 32 pack adjacent channels of a row, or 32 pack values of a plane
    // (groups: 32 items of a run of adjacent channels' planes, chain 1 + the S - 1 adds of a channel's columns)
    const int64_t values = split.group
                               ? multistep_plan::kLanes * split.pack
                               : std::min<int64_t>(v.channels_last ? v.C : v.S, multistep_plan::kLanes * split.pack);
    const int64_t chain =
        split.group ? 1 + (v.S - 1) : 1 + (v.channels_last ? multistep_plan::kRows - 1 : tree_depth(32));
    plan.push_back(Launch{"multistep_backward_kernel",
                          "backward",
                          {multistep_plan::backward_blocks(v, es), 1, 1},
                          multistep_plan::kLanes * multistep_plan::kRows,
                          numel * es * (relu ? 8 : 7) + table,
                          chain,
                          values * es,
                          v.channels_last
                              ? 2 * multistep_plan::kRows * multistep_plan::kLanes * acc * reduction_pack(es)
                              : multistep_plan::backward_shared_bytes(v, split.group, acc)});
  }
  const int64_t fold = multistep_plan::fold_grid(v, keep);
  if (fold > 0) {
    const int64_t chain = std::max(fold_chain(rows, 32), keep ? block_fold_chain(split.chunks * v.C) : int64_t{0});
    plan.push_back(Launch{"multistep_fold_kernel",
                          "backward",
                          {fold, 1, 1},
                          256,
                          table + (3 * v.C + 2 * v.N) * acc,
                          chain,
                          v.C == 1 ? warp_request(acc) : acc,
                          keep ? 8 * acc : 0});
  }
  plan.push_back(Launch{"multistep_dk_kernel",
                        "backward",
                        {1, 1, 1},
                        256,
                        (v.C + 1) * acc,
                        block_fold_chain(v.C),
                        warp_request(acc),
                        8 * acc});
  return plan;
}

}  // namespace

TSC_REGISTER_CUDA_PLANNER(multistep_update, plan_multistep_update);

}  // namespace tsc
