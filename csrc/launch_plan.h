// Launch plans (tsc_kernels.profiling.launch_plan, docs/gpu.md): the CUDA kernels an op launches for
// given arguments, computed by the very host code the CUDA launchers run. Plans are host code only
// (no CUDA headers), compiled into every build, so the CPU tests check the GPU's grids, chains and
// request sizes at real ResNet shapes on meta tensors.
//
// An op's planner is registered with TSC_REGISTER_CUDA_PLANNER(op, fn) in a .cpp file beside its
// kernels; tsc::cuda_launch_plan calls it. Its arguments are the op's forward arguments flattened in
// schema order by tsc_kernels/_launch_plan.py: Tensor / Tensor? -> tensors (None: undefined);
// Tensor[] -> ints gets the length, tensors the elements; int / bool -> ints; int[] -> ints gets the
// length, then the values; float -> floats.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace tsc {

struct Launch {
  std::string kernel;  // the __global__ function's name
  std::string phase;   // "forward" or "backward"
  std::array<int64_t, 3> grid;
  int64_t threads;        // per block
  int64_t bytes;          // global memory the launch reads and writes
  int64_t chain;          // longest run of dependent steps in one thread (serial merges, recurrences)
  int64_t request_bytes;  // contiguous bytes one warp's main loads cover
  int64_t smem;           // shared memory per block, bytes
};

struct PlanArgs {
  std::vector<at::Tensor> tensors;  // undefined for None
  std::vector<int64_t> ints;
  std::vector<double> floats;
  int64_t sms;  // streaming multiprocessors of the GPU planned for
};

using Planner = std::vector<Launch> (*)(const PlanArgs&);

bool register_cuda_planner(const char* op, Planner fn);

}  // namespace tsc

#define TSC_REGISTER_CUDA_PLANNER(op, fn) \
  static const bool tsc_cuda_planner_##op = ::tsc::register_cuda_planner(#op, fn)
