// Host-only launch geometry shared by the CUDA launchers (*_cuda.cu) and their planners
// (*_plan.cpp, launch_plan.h): no CUDA headers, so CPU-only builds compile it and the CPU tests
// check the grids the GPU gets.
#pragma once

#include <algorithm>
#include <cstdint>

#include "launch_plan.h"     // Launch (the planners' answer)
#include "channel_layout.h"  // ChannelView
#include "host_device.h"     // TSC_HD: the reduction walk runs on the host and the device

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
inline int64_t fold_chain(int64_t n, int64_t lanes) {
  return ceil_div(std::max<int64_t>(n, 1), lanes) + tree_depth(lanes);
}

// Per-channel reductions over an (outer, C, inner) block (channel_layout.h), shared by the
// BatchNorm tail's statistics and sums, and the ddt reductions of residual_update and scale_concat.
// Blocks are (lanes, value_lanes) threads: planes (inner > 1): 1 x 256 along one channel's values,
// samples and positions flattened (so a 7x7 map keeps all 256 lanes busy); channels-last rows
// (inner == 1): 32 lanes on adjacent channels x 8 rows (coalesced rows), or, for a narrow row,
// the power of two of lanes covering it x 256 / lanes rows, so a warp reads several whole rows.
//
// Items: a lane loads `pack` adjacent elements at once, so a warp's request is 32 x pack x the
// element size: pack = 2 for 2-byte types (bf16x2 / half2 pairs: 4-byte loads, 128-byte warp
// requests, was 64), 1 for fp32 / fp64. Rows: an item is `pack` adjacent channels of one row (a
// tile is 32 x pack channels; rows pair only when C % pack == 0, so every row starts at a pack
// boundary: else pack = 1). Planes: an item is up to `pack` adjacent positions of one (sample,
// channel) plane, never straddling two planes: the plane starting at element b = (o C + c) inner
// has head h = b % pack; item k covers positions [max(0, k pack - h), min(inner, k pack + pack - h)).
// With pack <= 2 every plane has ceil(inner / pack) items (inner even: b is even, inner / 2 pairs;
// inner odd: (inner - 1) / 2 pairs and one single value, the head when b is odd, else the tail), so
// items still flatten over (sample, item). Pairs start at even elements: 4-byte aligned when the
// tensors are (the launchers check; a misaligned view walks the same items with scalar loads, so
// the order of every sum, and the result, depends on the shape only).
//
// Each channel's `items` items are split into `chunks` chunks of `chunk` items: about kTargetBlocks
// blocks in all (a fixed number, not the SM count, so results do not depend on the GPU), at least
// kMinValuesPerThread items per thread, at most kTargetBlocks chunks: the per-channel merge of the
// chunks (a warp each, fold_chain) is then at most 32 + 5 steps long.
struct ChannelReduction {
  int64_t lanes, value_lanes;  // block (x, y)
  int64_t tiles;               // grid x: channel tiles of `lanes` x `pack` (rows) or 1 (planes) channels
  int64_t chunks;              // grid y: chunks per channel
  int64_t chunk;               // items per chunk (the last one may be shorter)
  int64_t channels, inner;     // the (outer, C, inner) view
  int64_t pack;                // elements per item: 2 (2-byte types) or 1
  int64_t per_plane;           // items per plane: ceil(inner / pack) (planes), 1 (rows), group x inner / pack (groups)
  int64_t items;               // items per channel: outer * per_plane (groups: outer, the samples)
  bool rows;                   // channels-last rows (inner == 1)
  int64_t group;               // planes of groups: channels per tile (0: one channel's planes per block)
};

constexpr int64_t kReductionThreads = 256, kRowLanes = 32, kTargetBlocks = 1024, kMinValuesPerThread = 4;

// Elements per item of a reduction over element_size-byte values: 4-byte loads for 2-byte types.
constexpr int64_t reduction_pack(int64_t element_size) { return element_size == 2 ? 2 : 1; }

// Channel groups (issue 22): a plane shorter than 128 bytes (3x3 maps, bf16 7x7) gives a block walking one
// channel's planes requests of one plane (36 / 18 / 98 bytes), but the planes of adjacent channels of one
// sample are contiguous: a block then covers the run of `group` adjacent channels of each sample (group x
// inner values, a whole number of 32-item warp windows), its 256 threads on items t, t + 256, ... of the
// run (items: `pack` adjacent values of the run, which may straddle two planes: a value per slot, as in
// rows), each summing its item over the chunk's samples in order into a column of shared memory; then
// thread g folds channel g's `inner` columns in order (fixed order, chain inner). Only for kernels that
// implement it (`groups`), a whole group (C >= group), and when the columns fit the shared memory.
constexpr int64_t kGroupSharedBudget = 48 * 1024;

// Channels per group: the fewest whose run is a whole number of warp windows (32 items of `pack` values).
inline int64_t channel_group(int64_t inner, int64_t pack) {
  int64_t g = 1;
  while ((g * inner) % (32 * pack) != 0) g *= 2;
  return g;
}

inline ChannelReduction plan_channel_groups(const ChannelView& v, int64_t element_size) {
  int64_t pack = reduction_pack(element_size);
  if ((v.channels * v.inner) % 2 != 0) pack = 1;  // every sample's run starts at an even element
  const int64_t group = channel_group(v.inner, pack);
  const int64_t run = group * v.inner / pack, per_thread = ceil_div(run, kReductionThreads);
  const int64_t tiles = ceil_div(v.channels, group);
  int64_t chunks = std::max<int64_t>(1, kTargetBlocks / tiles);
  chunks = std::min(chunks, std::max<int64_t>(1, v.outer * per_thread / kMinValuesPerThread));
  const int64_t chunk = std::max<int64_t>(1, ceil_div(v.outer, chunks));
  chunks = std::max<int64_t>(1, ceil_div(v.outer, chunk));
  return {kReductionThreads, 1, tiles, chunks, chunk, v.channels, v.inner, pack, run, v.outer, false, group};
}

// Whether plan_channel_groups applies: planes under 128 bytes, C a whole group, and the largest
// kernel's shared memory (Moments: 3 acc per thread slot and per column) within kGroupSharedBudget.
inline bool use_channel_groups(const ChannelView& v, int64_t element_size) {
  if (v.inner == 1 || v.inner * element_size >= 128 || v.outer == 0) return false;
  const int64_t acc = acc_size(element_size), pack = reduction_pack(element_size);
  const int64_t group = channel_group(v.inner, (v.channels * v.inner) % 2 != 0 ? 1 : pack);
  if (v.channels < group) return false;
  return (kReductionThreads * pack + group * v.inner) * 3 * acc <= kGroupSharedBudget;
}

// groups: the kernel implements channel groups (residual_update, the BatchNorm tail).
inline ChannelReduction plan_channel_reduction(const ChannelView& v, int64_t element_size, bool groups = false) {
  if (groups && use_channel_groups(v, element_size)) return plan_channel_groups(v, element_size);
  const bool rows = v.inner == 1;
  int64_t pack = reduction_pack(element_size);
  if (rows && v.channels % pack != 0) pack = 1;
  // rows: lanes per row = the pack items of a row rounded up to a power of two, at most 32; a warp then
  // covers 32 / lanes whole adjacent rows (C = 16: 8 lanes of bf16 pairs x 4 rows, 128 contiguous bytes)
  int64_t lanes = 1;
  if (rows)
    while (lanes < kRowLanes && lanes * pack < v.channels) lanes *= 2;
  const int64_t value_lanes = kReductionThreads / lanes;
  const int64_t per_plane = rows ? 1 : ceil_div(v.inner, pack), M = v.outer * per_plane;
  const int64_t tiles = std::max<int64_t>(1, ceil_div(v.channels, rows ? lanes * pack : 1));
  int64_t chunks = std::max<int64_t>(1, kTargetBlocks / tiles);
  chunks = std::min(chunks, std::max<int64_t>(1, M / (value_lanes * kMinValuesPerThread)));
  const int64_t chunk = std::max<int64_t>(1, ceil_div(M, chunks));
  chunks = std::max<int64_t>(1, ceil_div(M, chunk));
  return {lanes, value_lanes, tiles, chunks, chunk, v.channels, v.inner, pack, per_plane, M, rows, 0};
}

// Item k of a plane of `inner` values starting at element `base` (pack 1 or 2): its first position
// and count (1 or pack): [max(0, k pack - h), min(inner, k pack + pack - h)) with h = base % pack.
struct PlaneItem {
  int64_t first, count;
};
TSC_HD PlaneItem plane_item(int64_t k, int64_t base, int64_t inner, int64_t pack) {
  const int64_t h = base & (pack - 1);  // pack is 1 or 2
  const int64_t lo = k * pack - h, hi = k * pack + pack - h;
  const int64_t first = lo > 0 ? lo : 0, last = hi < inner ? hi : inner;
  return {first, last - first};
}

// First channel of thread x of channel tile `tile` (its `pack` channels in rows, its one in planes).
// Groups: the group's first channel (the thread's items are at (o C + c) inner + s, s < group x inner).
TSC_HD int64_t reduction_channel(const ChannelReduction& r, int64_t tile, int64_t x) {
  return r.rows ? (tile * r.lanes + x) * r.pack : r.group ? tile * r.group : tile;
}

// Groups: the items thread t of block (tile, j) owns, in order: item(s, n, o0, o1) for the n (1 <= n <= pack)
// adjacent values at run offset s (elements (o C + c) inner + s .. + n - 1, c = the group's first channel)
// of samples o = o0 .. o1 - 1, which the kernel sums in that order into the columns s .. s + n - 1.
template <typename F>
TSC_HD void walk_group_items(const ChannelReduction& r, int64_t tile, int64_t j, int64_t t, F&& item) {
  const int64_t c0 = tile * r.group, left = r.channels - c0;
  const int64_t run = (left < r.group ? left : r.group) * r.inner;  // values of this tile's run
  const int64_t o0 = j * r.chunk, end = (j + 1) * r.chunk, o1 = end < r.items ? end : r.items;
  for (int64_t s = t * r.pack; s < run; s += kReductionThreads * r.pack)
    item(s, run - s < r.pack ? run - s : r.pack, o0, o1);
}

// The items thread (x, y) of block (tile, j) walks, in order, for its channel c = reduction_channel:
// f(o, s, n) for the n (1 <= n <= pack) adjacent elements starting at (o C + c) inner + s (rows:
// o is the row, s = 0, n = pack channels c .. c + n - 1; planes: o the sample, s the position, n
// values of channel c). (o, item) advance incrementally: no division per item. Host and device:
// the CUDA kernels run it, tsc::_channel_reduction_walk runs it on the host for the tests.
template <typename F>
TSC_HD void walk_reduction_items(const ChannelReduction& r, int64_t c, int64_t j, int64_t y, F&& f) {
  const int64_t q0 = j * r.chunk + y, end = (j + 1) * r.chunk, q1 = end < r.items ? end : r.items, step = r.value_lanes;
  if (r.rows) {
    for (int64_t q = q0; q < q1; q += step) f(q, int64_t{0}, r.pack);
    return;
  }
  const int64_t K = r.per_plane, P = r.pack, step_o = step / K, step_k = step % K;
  int64_t o = q0 / K, k = q0 % K;
  for (int64_t q = q0; q < q1; q += step) {
    const PlaneItem it = plane_item(k, (o * r.channels + c) * r.inner, r.inner, P);
    f(o, it.first, it.count);
    o += step_o;
    k += step_k;
    if (k >= K) {
      k -= K;
      ++o;
    }
  }
}

// Chain of a reduction block: its streaming loop (1) and the fixed tree over its value lanes.
// Groups: the streaming loop, then channel g's thread folding its `inner` columns in a row.
inline int64_t channel_reduction_chain(const ChannelReduction& r) {
  return r.group ? 1 + (r.inner - 1) : 1 + tree_depth(r.value_lanes);
}

// Dynamic shared memory of a group block: a column of slot_bytes per value of the run (0 without groups).
inline int64_t group_shared_bytes(const ChannelReduction& r, int64_t slot_bytes) {
  return r.group * r.inner * slot_bytes;
}

// Contiguous bytes of a reduction block's narrowest busy warp: rows: 32 / lanes rows of
// min(C, lanes pack) adjacent channels (whole rows, so adjacent in memory, when lanes < 32); planes:
// 32 items of a plane, min(32 pack, inner) values (flattened over samples, so every warp is full
// when there are >= 256 items).
// Groups: 32 items of a run (a whole number of warp windows), 32 pack values.
inline int64_t channel_reduction_request(const ChannelReduction& r, int64_t element_size) {
  if (r.group) return warp_request(r.pack * element_size);
  const int64_t values = r.rows ? kRowLanes / r.lanes * std::min<int64_t>(r.channels, r.lanes * r.pack)
                                : std::min<int64_t>(32 * r.pack, r.inner);
  return values * element_size;
}

// --- Planner helpers (launch_plan.h's Launch from the geometry above) ---

// A grid-stride elementwise pass of 256 threads over numel elements touching `tensors` tensors of
// element_size bytes each, plus extra_bytes (per-channel vectors): 16-byte packs when `packs`
// (cuda_elementwise.cuh; the launchers pass numel / W + 1 items), else one element per thread.
// Chain 1 (independent loads), lanes adjacent: a warp covers 32 packs or 32 elements.
// packed_launch: the same with packs of `per` elements (the launchers pass numel / per + 1 items).
inline Launch packed_launch(const char* kernel, const char* phase, int64_t numel, int64_t element_size, int64_t tensors,
                            int64_t extra_bytes, int64_t sms, int64_t per) {
  const int64_t items = per > 1 ? numel / per + 1 : numel;
  return Launch{kernel,
                phase,
                {elementwise_blocks(items, 256, sms), 1, 1},
                256,
                numel * element_size * tensors + extra_bytes,
                1,
                warp_request(per * element_size),
                0};
}

inline Launch elementwise_launch(const char* kernel, const char* phase, int64_t numel, int64_t element_size,
                                 int64_t tensors, int64_t extra_bytes, int64_t sms, bool packs) {
  return packed_launch(kernel, phase, numel, element_size, tensors, extra_bytes, sms, packs ? 16 / element_size : 1);
}

// A per-channel reduction block grid (plan_channel_reduction) reading and writing `tensors` tensors
// and `partials` acc-typed (chunks, C) tables; smem = shared_per_thread per channel slot of a thread
// (the kernels keep a slot per element of a pack: pack slots, only the first used in planes), plus a
// column of shared_per_thread per value of a group's run (group_shared_bytes).
inline Launch reduction_launch(const char* kernel, const char* phase, const ChannelReduction& r, const ChannelView& v,
                               int64_t element_size, int64_t tensors, int64_t partials, int64_t shared_per_thread) {
  const int64_t numel = v.outer * v.channels * v.inner, acc = acc_size(element_size);
  return Launch{kernel,
                phase,
                {r.tiles, r.chunks, 1},
                r.lanes * r.value_lanes,
                numel * element_size * tensors + partials * r.chunks * v.channels * acc + v.channels * acc,
                channel_reduction_chain(r),
                channel_reduction_request(r, element_size),
                r.lanes * r.value_lanes * shared_per_thread * reduction_pack(element_size) +
                    group_shared_bytes(r, shared_per_thread)};
}

// Kernels folding per-chunk partials run a warp per channel (or per output), kFoldWarps per block.
constexpr int64_t kFoldWarps = 8;
inline int64_t fold_blocks(int64_t outputs) { return ceil_div(outputs, kFoldWarps); }

// A warp per channel folding `chunks` partials of `partials` (chunks, C) tables (warp_fold_sum or
// the BatchNorm moments merge), 8 warps a block; lanes read chunks C apart (acc bytes each, adjacent when C == 1).
// Per-channel passes over at most one chunk (the BatchNorm tail's, channel_pass_blocks): a thread per
// channel, so a warp reads 32 adjacent channels of the partial row and the per-channel vectors (was: a
// warp per channel reading one 4-byte value, C = 2^20: 131072 blocks of 4-byte requests); chain 1.
constexpr int64_t kPassThreads = 256;
inline int64_t channel_pass_blocks(int64_t C, int64_t chunks) {
  return chunks <= 1 ? ceil_div(C, kPassThreads) : fold_blocks(C);
}
inline Launch channel_fold_launch(const char* kernel, const char* phase, int64_t C, int64_t chunks, int64_t partials,
                                  int64_t acc, int64_t extra_bytes) {
  return Launch{kernel,
                phase,
                {fold_blocks(C), 1, 1},
                32 * kFoldWarps,
                partials * chunks * C * acc + extra_bytes,
                fold_chain(chunks, 32),
                C == 1 ? warp_request(acc) : acc,
                0};
}

inline Launch channel_pass_launch(const char* kernel, const char* phase, int64_t C, int64_t chunks, int64_t partials,
                                  int64_t acc, int64_t extra_bytes) {
  if (chunks > 1) return channel_fold_launch(kernel, phase, C, chunks, partials, acc, extra_bytes);
  return Launch{kernel,
                phase,
                {channel_pass_blocks(C, chunks), 1, 1},
                kPassThreads,
                partials * chunks * C * acc + extra_bytes,
                1,
                warp_request(acc),
                0};
}

}  // namespace tsc
