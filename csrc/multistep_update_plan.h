// Launch planning of the multi-step update's CUDA kernels (host code, no CUDA headers): the
// launcher (multistep_update_cuda.cu) and the planner (multistep_update_plan.cpp,
// tsc::cuda_launch_plan) call these same functions.
#pragma once

#include <cstdint>

#include "launch_geometry.h"
#include "multistep_layout.h"

namespace tsc {
namespace multistep_plan {

// Backward block: 32 x 8 threads. Channels-last: lanes on 32 adjacent channels, 8 positions (a row
// of channels is contiguous); channel-first: a warp per channel (8 channels), lanes on 32 adjacent
// positions of its plane, so a warp reads 32 consecutive elements either way (was: 32 channels one
// plane apart, S elements, for channel-first tensors too).
constexpr int64_t kLanes = 32, kRows = 8;

// Channel tiles of one sample.
inline int64_t channel_tiles(const MultistepView& v) { return ceil_div(v.C, v.channels_last ? kLanes : kRows); }

// Positions of a sample are split into `chunks` chunks of `per` positions when N * tiles alone would
// leave the GPU idle (a small batch of a late stage, a channels-last C = 32: N blocks): about
// kTargetBlocks blocks in all, each chunk at least kMinPositions positions. Shape-only (deterministic).
// Blocks: (sample, chunk, tile) flattened on grid.x (< 2^31: no 65535 cap); the tables have
// N * chunks rows (row = sample * chunks + chunk) of C partial sums.
constexpr int64_t kMinPositions = 64;

struct BackwardSplit {
  int64_t tiles, chunks, per;
};

inline BackwardSplit backward_split(const MultistepView& v) {
  const int64_t tiles = channel_tiles(v);
  const int64_t by_blocks = ceil_div(kTargetBlocks, std::max<int64_t>(1, v.N * tiles));
  const int64_t by_work = std::max<int64_t>(1, v.S / kMinPositions);
  const int64_t per = std::max<int64_t>(1, ceil_div(v.S, std::max<int64_t>(1, std::min(by_blocks, by_work))));
  return {tiles, std::max<int64_t>(1, ceil_div(v.S, per)), per};
}

inline int64_t backward_blocks(const MultistepView& v) {
  const BackwardSplit b = backward_split(v);
  return v.N * b.chunks * b.tiles;
}

// Fold of the (N * chunks, C) tables: fold_blocks(C) blocks of a warp per channel (dk's and ddt's
// column sums over the rows), then, with keep, a block per sample (dkeep: its chunks x C values).
inline int64_t fold_grid(const MultistepView& v, bool keep) { return fold_blocks(v.C) + (keep ? v.N : 0); }

}  // namespace multistep_plan
}  // namespace tsc
