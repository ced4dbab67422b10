// Launch planning of the weight-mean projection's CUDA kernels (host code, no CUDA headers): the
// launcher (weight_mean_cuda.cu) and the planner (weight_mean_plan.cpp, tsc::cuda_launch_plan) call
// these same functions.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "launch_geometry.h"

namespace tsc {
namespace weight_mean_plan {

constexpr int64_t kThreads = 256, kWarps = kThreads / 32;
constexpr int64_t kMaxWeights = 48;  // metadata records per launch (weight_mean_cuda.cu: 48 * 64 B < 4 KiB)

// One launch's slice of the weights: records [first, first + n), work items [begin, end).
struct WeightBatchRange {
  int64_t first, n, begin, end;
};

// Splits the weights (work item starts ascending, one per weight) into launches of at most
// kMaxWeights records; a launch's items run from its first record's start to the next launch's
// first start (or total). Empty ranges launch nothing.
inline std::vector<WeightBatchRange> weight_batches(const std::vector<int64_t>& starts, int64_t total) {
  std::vector<WeightBatchRange> out;
  const int64_t count = static_cast<int64_t>(starts.size());
  for (int64_t j0 = 0; j0 < count; j0 += kMaxWeights) {
    const int64_t n = std::min(kMaxWeights, count - j0);
    const int64_t end = j0 + n < count ? starts[j0 + n] : total;
    if (end > starts[j0]) out.push_back({j0, n, starts[j0], end});
  }
  return out;
}

}  // namespace weight_mean_plan
}  // namespace tsc
