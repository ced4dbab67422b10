// CUDA launch plan of the ODE stage combination (launch_plan.h), from the geometry its launcher
// (ode_combine_cuda.cu) uses: elementwise_blocks and ode_plan::backward_blocks on the same prepared
// arguments. Host code, compiled in every build.
//
// Kernels and how their fields are counted:
//   ode_combine_forward_kernel (elementwise_launch, 16-byte packs): reads z and the S stages, writes
//     out; the S terms are added in order (chain S).
//   ode_combine_backward_kernel: reads grad and the stages, writes the S dk_i and (blocks, S)
//     partials; grid-stride loop over items of ode_plan::pack elements (bf16 / half pairs: a warp
//     reads 32 x 4 bytes) (chain 1), then block_sum's 10 shuffle levels; smem 8 acc.
//   ode_combine_sum_partials_kernel: one block, a warp per stage folding the blocks (fold_chain);
//     lanes read partials S apart.
#include "ode_combine_layout.h"
#include "ode_combine_plan.h"

namespace tsc {
namespace {

// Forward arguments (launch_plan.h order): ints [len(stages)]; tensors z, stages..., coeffs.
std::vector<Launch> plan_ode_combine(const PlanArgs& p) {
  TORCH_CHECK(p.ints.size() == 1 && p.ints[0] >= 0 && static_cast<int64_t>(p.tensors.size()) == p.ints[0] + 2,
              "ode_combine planner: expected ints [len(stages)] and tensors z, stages..., coeffs");
  const std::vector<at::Tensor> stages(p.tensors.begin() + 1, p.tensors.end() - 1);
  const OdeCombineArgs a = prepare_ode_combine("tsc::ode_combine", p.tensors[0], stages, p.tensors.back());
  const int64_t numel = a.z.numel(), es = a.z.element_size(), acc = acc_size(es),
                S = static_cast<int64_t>(stages.size());
  std::vector<Launch> plan;
  if (numel == 0) return plan;
  plan.push_back(elementwise_launch("ode_combine_forward_kernel", "forward", numel, es, S + 2, S * acc, p.sms, true));
  plan.back().chain = S;
  const int64_t blocks = ode_plan::backward_blocks(numel);
  plan.push_back(Launch{"ode_combine_backward_kernel",
                        "backward",
                        {blocks, 1, 1},
                        ode_plan::kThreads,
                        numel * es * (2 * S + 1) + blocks * S * acc,
                        1 + 2 * tree_depth(32),
                        warp_request(ode_plan::pack(es) * es),
                        ode_plan::kThreads / 32 * acc});
  plan.push_back(Launch{"ode_combine_sum_partials_kernel",
                        "backward",
                        {1, 1, 1},
                        32 * S,
                        (blocks + 1) * S * acc,
                        fold_chain(blocks, 32),
                        S == 1 ? warp_request(acc) : acc,
                        0});
  return plan;
}

}  // namespace

TSC_REGISTER_CUDA_PLANNER(ode_combine, plan_ode_combine);

}  // namespace tsc
