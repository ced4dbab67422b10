// MetaBatch: per-launch metadata records passed to a CUDA kernel BY VALUE (weight_mean_cuda.cu:
// one record per weight; lstm_controller_cuda.cu: one per stage).
//
// Metadata (per-weight pointer, offsets, sizes, strides; per-stage pointers and sizes) travels BY
// VALUE as a __grid_constant__ kernel parameter of up to N records (under the 4 KiB parameter
// limit: each user static_asserts its batch fits); more records take more launches of the same
// kernel, each on its own slice. No host-to-device copy, no pageable memory, no sync: every call is
// CUDA-graph capturable, and a captured graph holds the metadata in its kernel nodes (the pointers in
// it are the parameters' and the graph pool's, fixed for the graph's lifetime).
#pragma once

#include <cstdint>

namespace tsc {

// A slice of up to N metadata records passed by value (kernel parameter space, read directly by
// every thread through __grid_constant__: no local copy even with a runtime index).
template <typename M, int N>
struct MetaBatch {
  M m[N];
  int64_t n;      // records used
  int64_t begin;  // first work item (output element) of this slice
  int64_t end;    // one past its last
};

}  // namespace tsc
