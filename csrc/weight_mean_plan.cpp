// CUDA launch plan of the weight-mean projection (launch_plan.h), from the split and grids its
// launcher (weight_mean_cuda.cu) uses: weight_mean_plan::weight_batches and elementwise_blocks.
// Host code, compiled in every build.
//
// Kernels and how their fields are counted (one launch per batch of up to 48 weights):
//   weight_mean_kernel: a warp per output element, lanes stride C_in (si elements apart: 32
//     adjacent values only for 1x1 kernels); chain: the binary search over the batch's records
//     (ceil(log2 n) dependent loads), the streaming loop (1) and the 5-level warp sum.
//   weight_mean_backward_kernel: grid-stride over the batch's items, chain binary search + 1.
#include "weight_mean_layout.h"
#include "weight_mean_plan.h"

namespace tsc {
namespace {

// Forward arguments (launch_plan.h order): ints [len(weights)]; tensors the weights.
std::vector<Launch> plan_weight_mean(const PlanArgs& p) {
  TORCH_CHECK(p.ints.size() == 1 && static_cast<int64_t>(p.tensors.size()) == p.ints[0],
              "weight_mean planner: expected ints [len(weights)] and the weights");
  check_weights("tsc::weight_mean", p.tensors);
  int64_t total = 0;
  const std::vector<int64_t> off = mean_offsets(p.tensors, total);
  const int64_t es = p.tensors[0].element_size(), acc = acc_size(es);
  std::vector<Launch> forward, backward;
  for (const weight_mean_plan::WeightBatchRange& r : weight_mean_plan::weight_batches(off, total)) {
    int64_t bytes = 0, request = 32 * es;
    for (int64_t j = r.first; j < r.first + r.n; ++j) {
      WeightView v;
      const at::Tensor& w = p.tensors[j];
      if (!weight_view(w, v)) weight_view(w.contiguous(), v);  // the launcher reads a contiguous copy then
      bytes += w.numel() * es;
      request = std::min(request, v.si == 1 ? 32 * es : es);
    }
    const int64_t items = r.end - r.begin, search = tree_depth(r.n);
    forward.push_back(Launch{"weight_mean_kernel",
                             "forward",
                             {elementwise_blocks(items, weight_mean_plan::kWarps, p.sms), 1, 1},
                             weight_mean_plan::kThreads,
                             bytes + items * acc,
                             search + 1 + tree_depth(32),
                             request,
                             0});
    backward.push_back(Launch{"weight_mean_backward_kernel",
                              "backward",
                              {elementwise_blocks(items, weight_mean_plan::kThreads, p.sms), 1, 1},
                              weight_mean_plan::kThreads,
                              2 * items * acc,
                              search + 1,
                              warp_request(acc),
                              0});
  }
  forward.insert(forward.end(), backward.begin(), backward.end());
  return forward;
}

}  // namespace

TSC_REGISTER_CUDA_PLANNER(weight_mean, plan_weight_mean);

}  // namespace tsc
