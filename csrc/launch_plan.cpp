// tsc::cuda_launch_plan: the registry of the ops' CUDA planners (launch_plan.h) and the op that
// answers tsc_kernels/_launch_plan.py. Compiled into every build (CPU-only too): plans are host code.
#include "launch_plan.h"

#include <torch/library.h>

#include <map>
#include <tuple>

namespace tsc {
namespace {

std::map<std::string, Planner>& planners() {
  static std::map<std::string, Planner> map;
  return map;
}

// (kernel names as "phase:kernel", 8 ints per launch: grid x, y, z, threads, bytes, chain, request_bytes, smem)
std::tuple<std::vector<std::string>, std::vector<int64_t>> cuda_launch_plan(
    c10::string_view op, const c10::List<std::optional<at::Tensor>>& tensors, at::IntArrayRef ints,
    at::ArrayRef<double> floats, int64_t sms) {
  const auto it = planners().find(std::string(op));
  TORCH_CHECK(it != planners().end(), "tsc::cuda_launch_plan: no CUDA planner for op '", op, "'");
  TORCH_CHECK(sms > 0, "tsc::cuda_launch_plan: sms must be positive, got ", sms);
  PlanArgs args;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::optional<at::Tensor> t = tensors.get(i);
    args.tensors.push_back(t.has_value() ? *t : at::Tensor());
  }
  args.ints.assign(ints.begin(), ints.end());
  args.floats.assign(floats.begin(), floats.end());
  args.sms = sms;
  std::vector<std::string> names;
  std::vector<int64_t> fields;
  for (const Launch& l : it->second(args)) {
    names.push_back(l.phase + ":" + l.kernel);
    fields.insert(fields.end(),
                  {l.grid[0], l.grid[1], l.grid[2], l.threads, l.bytes, l.chain, l.request_bytes, l.smem});
  }
  return {names, fields};
}

}  // namespace

bool register_cuda_planner(const char* op, Planner fn) {
  planners()[op] = fn;
  return true;
}

}  // namespace tsc

TORCH_LIBRARY_FRAGMENT(tsc, m) {
  // The CUDA kernels `op` launches for these (flattened) forward arguments on a GPU with `sms` SMs,
  // forward and backward (docs/gpu.md, launch plans). Host code only: answers in CPU-only builds too.
  m.def("cuda_launch_plan(str op, Tensor?[] tensors, int[] ints, float[] floats, int sms) -> (str[], int[])",
        &tsc::cuda_launch_plan);
}
