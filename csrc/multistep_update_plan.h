// Launch planning of the multi-step update's CUDA kernels (host code, no CUDA headers): the
// launcher (multistep_update_cuda.cu) and the planner (multistep_update_plan.cpp,
// tsc::cuda_launch_plan) call these same functions.
#pragma once

#include <cstdint>

#include "launch_geometry.h"
#include "multistep_update_layout.h"

namespace tsc {
namespace multistep_plan {

// Backward block: 32 x 8 threads. Channels-last: lanes on 32 adjacent channel items, 8 positions (a
// row of channels is contiguous); channel-first: a warp per channel (8 channels), lanes on 32 adjacent
// position items of its plane, so a warp reads 32 consecutive items either way (was: 32 channels one
// plane apart, S elements, for channel-first tensors too).
constexpr int64_t kLanes = 32, kRows = 8;

// Positions of a sample are split into `chunks` chunks of `per` items when N * tiles alone would
// leave the GPU idle (a small batch of a late stage, a channels-last C = 32: N blocks): about
// kTargetBlocks blocks in all, each chunk at least kMinPositions items. Shape-only (deterministic).
// Blocks: (sample, chunk, tile) flattened on grid.x (< 2^31: no 65535 cap); the tables have
// N * chunks rows (row = sample * chunks + chunk) of C partial sums.
// Items (bf16 / half: pack = 2, 4-byte loads, 128-byte warp requests; else 1): channel-first, up to
// `pack` adjacent positions of a plane (launch_geometry.h plane_item: a plane starting at an odd
// element has its first value alone, an even one of odd size its last), ceil(S / pack) per plane;
// channels-last, `pack` adjacent channels of a position (when C % pack == 0, else pack = 1), a
// tile being 32 x pack channels, S items (positions) per sample.
constexpr int64_t kMinPositions = 64;

struct BackwardSplit {
  int64_t tiles, chunks, per;  // channel tiles, chunks per sample, items per chunk
  int64_t pack, items;         // elements per item, items per sample (per channel or channel tile)
  int64_t group;               // channel groups: channels per tile (0: none)
};

// Channel groups (issue 22, as launch_geometry.h plan_channel_groups): channel-first planes under 128 bytes
// (LM-ResNet-50's bf16 7x7: 98 bytes) put a block on the contiguous run of `group` adjacent channels of one
// sample (channel_group: a whole number of 32-item warp windows, 128-byte requests), its 256 threads on the
// run's items t, t + 256, ... (pack values, which may straddle two planes); each value's two terms go to a
// column of dynamic shared memory (2 x group x S acc), then thread g adds channel g's S columns in order
// (chain S). One chunk per sample. Only where C is a whole group and the columns fit 48 KB.
inline int64_t group_pack(const MultistepView& v, int64_t element_size) {
  return (v.C * v.S) % 2 != 0 ? 1 : reduction_pack(element_size);  // every run starts at an even element
}

inline bool use_groups(const MultistepView& v, int64_t element_size) {
  if (v.channels_last || v.S <= 1 || v.S * element_size >= 128) return false;
  const int64_t group = channel_group(v.S, group_pack(v, element_size));
  return v.C >= group && 2 * group * v.S * acc_size(element_size) <= kGroupSharedBudget;
}

// Dynamic shared memory of a backward block (the groups' columns; 0 without groups).
inline int64_t backward_shared_bytes(const MultistepView& v, int64_t group, int64_t acc) {
  return 2 * group * v.S * acc;
}

inline BackwardSplit backward_split(const MultistepView& v, int64_t element_size) {
  if (use_groups(v, element_size)) {
    const int64_t pack = group_pack(v, element_size), group = channel_group(v.S, pack), run = group * v.S / pack;
    return {ceil_div(v.C, group), 1, run, pack, run, group};
  }
  int64_t pack = reduction_pack(element_size);
  if (v.channels_last && v.C % pack != 0) pack = 1;
  const int64_t tiles = ceil_div(v.C, v.channels_last ? kLanes * pack : kRows);
  const int64_t items = v.channels_last ? v.S : ceil_div(v.S, pack);
  const int64_t by_blocks = ceil_div(kTargetBlocks, std::max<int64_t>(1, v.N * tiles));
  const int64_t by_work = std::max<int64_t>(1, items / kMinPositions);
  const int64_t per = std::max<int64_t>(1, ceil_div(items, std::max<int64_t>(1, std::min(by_blocks, by_work))));
  return {tiles, std::max<int64_t>(1, ceil_div(items, per)), per, pack, items, 0};
}

inline int64_t backward_blocks(const MultistepView& v, int64_t element_size) {
  const BackwardSplit b = backward_split(v, element_size);
  return v.N * b.chunks * b.tiles;
}

// Fold of the (N * chunks, C) tables: fold_blocks(C) blocks of a warp per channel (dk's and ddt's
// column sums over the rows), then, with keep, a block per sample (dkeep: its chunks x C values).
inline int64_t fold_grid(const MultistepView& v, bool keep) { return fold_blocks(v.C) + (keep ? v.N : 0); }

}  // namespace multistep_plan
}  // namespace tsc
