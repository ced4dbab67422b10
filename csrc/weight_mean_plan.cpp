// CUDA launch plan of the weight-mean projection (launch_plan.h), from the split and grids its
// launcher (weight_mean_cuda.cu) uses: weight_runs, weight_mean_plan::weight_batches and
// elementwise_blocks. Host code, compiled in every build.
//
// Kernels and how their fields are counted (one launch per batch of up to 48 weights):
//   weight_mean_kernel: a warp per row of contiguous values (weight_mean_layout.h RunView), lanes
//     on adjacent 16-byte packs: a request is the step's V x P x groups values or the whole row if
//     shorter (period P > 32: the K adjacent values of a C_in step, up to 32); chain: the binary
//     search over the batch's records (ceil(log2 n) dependent loads), the streaming loop (1), the
//     tree over the lane groups and the fold of the V packs (P > 32: the loop only).
//   weight_mean_backward_kernel: grid-stride over the batch's items, chain binary search + 1.
//   add_wbar_grads_kernel (tsc::_weight_mean_aliased, a training step's backward after
//     weight_mean_backward_kernel): grid-stride over every value of the batch's conv gradients
//     (read and written once, in order), chain binary search + 1.
#include "weight_mean_layout.h"
#include "weight_mean_plan.h"

namespace tsc {
namespace {

// Forward arguments (launch_plan.h order): ints [len(weights)]; tensors the weights.
// The forward's request (bytes one warp's load covers) and chain after the search, on one weight.
struct RowCost {
  int64_t request, chain;
};

RowCost row_cost(const RunView& v, int64_t es) {
  if (v.period > 32) return {std::min<int64_t>(v.period, 32) * es, 1};
  const int64_t V = run_pack_values(es), groups = run_lane_groups(v.period);
  return {std::min(v.run, V * v.period * groups) * es, 1 + tree_depth(groups) + V};
}

// Forward arguments (launch_plan.h order): ints [len(weights)]; tensors the weights. `aliased`: a
// training step's (tsc::_weight_mean_aliased), whose backward also adds into the convs' gradients.
std::vector<Launch> weight_mean_launches(const PlanArgs& p, bool aliased) {
  TORCH_CHECK(p.ints.size() == 1 && static_cast<int64_t>(p.tensors.size()) == p.ints[0],
              "weight_mean planner: expected ints [len(weights)] and the weights");
  check_weights("tsc::weight_mean", p.tensors);
  int64_t total = 0;
  const std::vector<int64_t> off = mean_offsets(p.tensors, total);
  const int64_t es = p.tensors[0].element_size(), acc = acc_size(es);
  std::vector<RunView> views(p.tensors.size());
  std::vector<int64_t> row_off;
  int64_t rows = 0;
  for (size_t j = 0; j < p.tensors.size(); ++j) {
    weight_runs(p.tensors[j], views[j]);  // the launcher's view (of a contiguous copy when it makes one)
    row_off.push_back(rows);
    rows += views[j].rows;
  }
  std::vector<Launch> plan;
  for (const weight_mean_plan::WeightBatchRange& r : weight_mean_plan::weight_batches(row_off, rows)) {
    int64_t bytes = 0, outputs = 0, request = 512, chain = 1;
    for (int64_t j = r.first; j < r.first + r.n; ++j) {
      const RowCost c = row_cost(views[j], es);
      bytes += p.tensors[j].numel() * es;
      outputs += views[j].rows * views[j].period;
      request = std::min(request, c.request);
      chain = std::max(chain, c.chain);
    }
    plan.push_back(Launch{"weight_mean_kernel",
                          "forward",
                          {elementwise_blocks(r.end - r.begin, weight_mean_plan::kWarps, p.sms), 1, 1},
                          weight_mean_plan::kThreads,
                          bytes + outputs * acc,
                          tree_depth(r.n) + chain,
                          request,
                          weight_mean_plan::kWarps * 32 * run_pack_values(es) * acc});
  }
  // the backward's grid-stride launches over `starts` (one per weight, ascending), each item read
  // and written once: chain the binary search + 1
  const auto grid_stride = [&](const char* kernel, const std::vector<int64_t>& starts, int64_t items_total,
                               int64_t item_bytes) {
    for (const weight_mean_plan::WeightBatchRange& r : weight_mean_plan::weight_batches(starts, items_total)) {
      const int64_t items = r.end - r.begin;
      plan.push_back(Launch{kernel,
                            "backward",
                            {elementwise_blocks(items, weight_mean_plan::kThreads, p.sms), 1, 1},
                            weight_mean_plan::kThreads,
                            2 * items * item_bytes,
                            tree_depth(r.n) + 1,
                            warp_request(item_bytes),
                            0});
    }
  };
  grid_stride("weight_mean_backward_kernel", off, total, acc);
  if (aliased) {  // then every value of the convs' gradients
    std::vector<int64_t> value_off;
    int64_t values = 0;
    for (const at::Tensor& w : p.tensors) {
      value_off.push_back(values);
      values += w.numel();
    }
    grid_stride("add_wbar_grads_kernel", value_off, values, es);
  }
  return plan;
}

std::vector<Launch> plan_weight_mean(const PlanArgs& p) { return weight_mean_launches(p, false); }
std::vector<Launch> plan_weight_mean_aliased(const PlanArgs& p) { return weight_mean_launches(p, true); }

}  // namespace

TSC_REGISTER_CUDA_PLANNER(weight_mean, plan_weight_mean);
TSC_REGISTER_CUDA_PLANNER(_weight_mean_aliased, plan_weight_mean_aliased);

}  // namespace tsc
