// Host-only launch geometry shared by the CUDA launchers (*_cuda.cu) and their planners
// (*_plan.cpp, launch_plan.h): no CUDA headers, so CPU-only builds compile it and the CPU tests
// check the grids the GPU gets.
#pragma once

#include <algorithm>
#include <cstdint>

#include "launch_plan.h"      // Launch (the planners' answer)
#include "residual_layout.h"  // ChannelView

namespace tsc {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of an elementwise grid-stride pass: enough to cover n items once, capped at 32 per SM (the
// loop does the rest). `sms` may only size such caps: a reduction's partition must not depend on it.
inline int64_t elementwise_blocks(int64_t n, int64_t threads, int64_t sms) {
  return std::max<int64_t>(1, std::min(ceil_div(n, threads), 32 * sms));
}

// Accumulation type's size: fp64 for fp64 tensors, fp32 otherwise (at::opmath_type).
inline int64_t acc_size(int64_t element_size) { return element_size == 8 ? 8 : 4; }

// Bytes one warp's loads cover when its 32 lanes read adjacent items of `item_bytes` each.
inline int64_t warp_request(int64_t item_bytes) { return 32 * item_bytes; }

// Depth of a fixed-order tree over `n` values (ceil(log2 n)): one dependent step per level.
inline int64_t tree_depth(int64_t n) {
  int64_t d = 0;
  while ((int64_t{1} << d) < n) ++d;
  return d;
}

// Serial steps of one lane folding `n` values strided by `lanes`, then the tree over the lanes:
// the chain of a fixed-order warp (lanes = 32) or block fold.
inline int64_t fold_chain(int64_t n, int64_t lanes) { return ceil_div(std::max<int64_t>(n, 1), lanes) + tree_depth(lanes); }

// Per-channel reductions over an (outer, C, inner) block (residual_layout.h), shared by the
// BatchNorm tail's statistics and sums, and the ddt reductions of residual_update and scale_concat.
// Blocks are (lanes, value_lanes) threads: planes (inner > 1): 1 x 256 along one channel's values,
// samples and positions flattened (m = o * inner + s, so a 7x7 map keeps all 256 lanes busy);
// channels-last rows (inner == 1): 32 adjacent channels x 8 rows (coalesced rows). Each channel's
// M = outer * inner values are split into `chunks` chunks of `chunk` values: about kTargetBlocks
// blocks in all (a fixed number, not the SM count, so results do not depend on the GPU), at least
// kMinValuesPerThread values per thread, at most kTargetBlocks chunks: the per-channel merge of the
// chunks (a warp each, fold_chain) is then at most 32 + 5 steps long.
struct ChannelReduction {
  int64_t lanes, value_lanes;  // block (x, y)
  int64_t tiles;               // grid x: channel tiles of `lanes` channels
  int64_t chunks;              // grid y: chunks per channel
  int64_t chunk;               // values per chunk (the last one may be shorter)
};

constexpr int64_t kReductionThreads = 256, kRowLanes = 32, kTargetBlocks = 1024, kMinValuesPerThread = 4;

inline ChannelReduction plan_channel_reduction(const ChannelView& v) {
  const bool rows = v.inner == 1;
  const int64_t lanes = rows ? kRowLanes : 1, value_lanes = kReductionThreads / lanes;
  const int64_t M = v.outer * v.inner;
  const int64_t tiles = std::max<int64_t>(1, ceil_div(v.channels, lanes));
  int64_t chunks = std::max<int64_t>(1, kTargetBlocks / tiles);
  chunks = std::min(chunks, std::max<int64_t>(1, M / (value_lanes * kMinValuesPerThread)));
  const int64_t chunk = std::max<int64_t>(1, ceil_div(M, chunks));
  chunks = std::max<int64_t>(1, ceil_div(M, chunk));
  return {lanes, value_lanes, tiles, chunks, chunk};
}

// Chain of a reduction block: its streaming loop (1) and the fixed tree over its value lanes.
inline int64_t channel_reduction_chain(const ChannelReduction& r) { return 1 + tree_depth(r.value_lanes); }

// Contiguous bytes of a reduction block's narrowest busy warp: rows: min(C, 32) adjacent channels;
// planes: 32 consecutive values of a plane (flattened over samples, so every warp is full when M >= 256).
inline int64_t channel_reduction_request(const ChannelReduction& r, const ChannelView& v, int64_t element_size) {
  const int64_t lanes = r.lanes > 1 ? std::min<int64_t>(v.channels, r.lanes) : std::min<int64_t>(32, v.inner);
  return lanes * element_size;
}

// --- Planner helpers (launch_plan.h's Launch from the geometry above) ---

// A grid-stride elementwise pass of 256 threads over numel elements touching `tensors` tensors of
// element_size bytes each, plus extra_bytes (per-channel vectors): 16-byte packs when `packs`
// (cuda_elementwise.cuh; the launchers pass numel / W + 1 items), else one element per thread.
// Chain 1 (independent loads), lanes adjacent: a warp covers 32 packs or 32 elements.
inline Launch elementwise_launch(const char* kernel, const char* phase, int64_t numel, int64_t element_size, int64_t tensors,
                                 int64_t extra_bytes, int64_t sms, bool packs) {
  const int64_t per = packs ? 16 / element_size : 1;
  const int64_t items = packs ? numel / per + 1 : numel;
  return Launch{kernel, phase, {elementwise_blocks(items, 256, sms), 1, 1}, 256, numel * element_size * tensors + extra_bytes, 1,
                warp_request(per * element_size), 0};
}

// A per-channel reduction block grid (plan_channel_reduction) reading `tensors` tensors, writing
// `written` of them and `partials` acc-typed (chunks, C) tables; smem = shared_per_thread per thread.
inline Launch reduction_launch(const char* kernel, const char* phase, const ChannelReduction& r, const ChannelView& v, int64_t element_size,
                               int64_t tensors, int64_t partials, int64_t shared_per_thread) {
  const int64_t numel = v.outer * v.channels * v.inner, acc = acc_size(element_size);
  return Launch{kernel, phase, {r.tiles, r.chunks, 1}, r.lanes * r.value_lanes,
                numel * element_size * tensors + partials * r.chunks * v.channels * acc + v.channels * acc,
                channel_reduction_chain(r), channel_reduction_request(r, v, element_size), r.lanes * r.value_lanes * shared_per_thread};
}

// Kernels folding per-chunk partials run a warp per channel (or per output), kFoldWarps per block.
constexpr int64_t kFoldWarps = 8;
inline int64_t fold_blocks(int64_t outputs) { return ceil_div(outputs, kFoldWarps); }

// A warp per channel folding `chunks` partials of `partials` (chunks, C) tables (warp_fold_sum or
// the BatchNorm moments merge), 8 warps a block; lanes read chunks C apart (acc bytes each, adjacent when C == 1).
inline Launch channel_fold_launch(const char* kernel, const char* phase, int64_t C, int64_t chunks, int64_t partials, int64_t acc,
                                  int64_t extra_bytes) {
  return Launch{kernel, phase, {fold_blocks(C), 1, 1}, 32 * kFoldWarps, partials * chunks * C * acc + extra_bytes, fold_chain(chunks, 32),
                C == 1 ? warp_request(acc) : acc, 0};
}

}  // namespace tsc
