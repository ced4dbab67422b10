// CUDA kernels of the linear multi-step update (docs/ops.md, multistep_update), CUDA dispatch key.
// The arithmetic is multistep_update_math.h's, the same functions the CPU kernels run.
//
// Forward: one grid-stride pass (reads u, u_prev, f; writes out). k, dt and keep are read on the
// device (k is a 0-d device tensor: no host sync).
// Backward: one launch with a block per (sample, position chunk, channel tile) (multistep_update_plan.h: warps
// along a plane's positions for channel-first tensors, lanes on adjacent channels for channels-last
// ones; bf16 / half lanes move pairs: 4-byte loads): it writes du, du_prev, df and the (N, C) partial sums of
// g'(u_prev - u) and g'f; then multistep_fold_kernel (a warp per channel: dk's column sums and ddt; a block per
// sample: dkeep) and multistep_dk_kernel (one block: dk) reduce the tables in a fixed order: deterministic, every
// chain ceil(n / 32) + 5 or ceil(n / 256) + 10 long instead of N * C / 256, N or C.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include "cuda_elementwise.cuh"
#include "multistep_update_layout.h"
#include "multistep_update_math.h"
#include "multistep_update_plan.h"

namespace tsc {
namespace {

constexpr int kThreads = 256;
constexpr int kLanes = static_cast<int>(multistep_plan::kLanes), kRows = static_cast<int>(multistep_plan::kRows);

template <typename T>
const T* optional_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <int W, typename index_t, typename scalar_t, typename acc_t>
__global__ void multistep_forward_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ up,
                                         const scalar_t* __restrict__ f, const acc_t* __restrict__ kp,
                                         const acc_t* __restrict__ dt, const acc_t* __restrict__ keep,
                                         scalar_t* __restrict__ out, index_t numel, ChannelIndex<index_t> ci,
                                         bool relu) {
  const acc_t k = *kp;
  for_each_pack<W>(numel, [&]<int P>(index_t i) {
    const Pack<scalar_t, P> uv = load_pack<P>(u + i), pv = load_pack<P>(up + i), fv = load_pack<P>(f + i);
    Pack<scalar_t, P> o;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const acc_t scale = multistep_scale(dt, keep, ci.sample(i + j), ci.channel(i + j));
      const acc_t r = multistep_forward(static_cast<acc_t>(uv.v[j]), static_cast<acc_t>(pv.v[j]),
                                        static_cast<acc_t>(fv.v[j]), k, scale);
      o.v[j] = static_cast<scalar_t>(relu ? relu_forward(r) : r);
    }
    store_pack<P>(out + i, o);
  });
}

// grid = N * chunks * tiles (row = sample * chunks + chunk major, multistep_update_plan.h), block =
// (32, 8); a block covers items [chunk * per, (chunk + 1) * per) of its sample. kPlanes (channel-first,
// index (n C + c) S + s): warp y owns channel tile * 8 + y, its lanes items x, x + 32, ... of the
// plane (plane_item: bf16 / half pairs, the plane's odd head or tail value alone); channels-last
// (index (n S + s) C + c): lanes own the `pack` channels (tile * 32 + x) * pack.., the 8 rows positions
// y, y + 8, ... W: channel slots per thread and widest item; Vec: items loaded as W-element vectors.
// Channel groups (split.group, channel-first planes under 128 bytes): the block's 256 threads on the items of
// the contiguous run of `group` adjacent channels of sample n, a column per value, a thread per channel.
template <bool kPlanes, int W, bool Vec, typename scalar_t, typename acc_t>
__global__ void multistep_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ u,
                                          const scalar_t* __restrict__ up, const scalar_t* __restrict__ f,
                                          const scalar_t* __restrict__ relu_out, const acc_t* __restrict__ kp,
                                          const acc_t* __restrict__ dt, const acc_t* __restrict__ keep,
                                          scalar_t* __restrict__ du, scalar_t* __restrict__ dup,
                                          scalar_t* __restrict__ df, acc_t* __restrict__ pk, acc_t* __restrict__ pf,
                                          int64_t C, int64_t S, multistep_plan::BackwardSplit split) {
  const int64_t row = blockIdx.x / split.tiles, tile = blockIdx.x % split.tiles;
  const int64_t n = row / split.chunks, chunk = row % split.chunks;
  const int64_t end = (chunk + 1) * split.per, q1 = end < split.items ? end : split.items;
  const int64_t c = kPlanes ? tile * kRows + threadIdx.y : (tile * kLanes + threadIdx.x) * split.pack;
  const int64_t q0 = chunk * split.per + (kPlanes ? threadIdx.x : threadIdx.y), dq = kPlanes ? kLanes : kRows;
  const bool slots = !kPlanes || split.group;  // a slot per value of an item (else every value is of channel c)
  Slots<acc_t, W> sk{}, sf{};
  acc_t scale[W];
  const acc_t k = *kp;
  {
    auto body = [&]<int P>(int64_t i, int64_t) {
      const Pack<scalar_t, P> gv = load_items<P, Vec>(g + i), uv = load_items<P, Vec>(u + i),
                              pv = load_items<P, Vec>(up + i), fv = load_items<P, Vec>(f + i);
      Pack<scalar_t, P> ov, duv, dpv, dfv;
      if (relu_out) ov = load_items<P, Vec>(relu_out + i);
#pragma unroll
      for (int j = 0; j < P; ++j) {
        acc_t gi = static_cast<acc_t>(gv.v[j]);
        if (relu_out) gi = relu_backward(gi, static_cast<acc_t>(ov.v[j]));
        const int slot = slots ? j : 0;
        const auto r = multistep_backward(gi, static_cast<acc_t>(uv.v[j]), static_cast<acc_t>(pv.v[j]),
                                          static_cast<acc_t>(fv.v[j]), k, scale[slot]);
        duv.v[j] = static_cast<scalar_t>(r.du);
        dpv.v[j] = static_cast<scalar_t>(r.du_prev);
        dfv.v[j] = static_cast<scalar_t>(r.df);
        sk.v[slot] += r.dk_term;
        sf.v[slot] += r.gf_term;
      }
      store_items<P, Vec>(du + i, duv);
      store_items<P, Vec>(dup + i, dpv);
      store_items<P, Vec>(df + i, dfv);
    };
    if constexpr (kPlanes) {
      if (split.group) {  // channel groups: a column per value of the run, then a thread per channel
        acc_t* colk = group_columns<acc_t>();
        acc_t* colf = colk + split.group * S;
        const int64_t c0 = tile * split.group, left = C - c0, t = threadIdx.y * kLanes + threadIdx.x;
        const int64_t run = (left < split.group ? left : split.group) * S, base = (n * C + c0) * S;
        for (int64_t s = t * split.pack; s < run; s += kLanes * kRows * split.pack) {
          const int64_t cnt = run - s < split.pack ? run - s : split.pack;
#pragma unroll
          for (int j = 0; j < W; ++j) {
            scale[j] = multistep_scale(dt, keep, n, c0 + (s + (j < cnt ? j : 0)) / S);  // value j's channel
            sk.v[j] = sf.v[j] = acc_t(0);
          }
          reduction_item<W>(base + s, 0, cnt, body);
#pragma unroll
          for (int j = 0; j < W; ++j)
            if (j < cnt) {
              colk[s + j] = sk.v[j];
              colf[s + j] = sf.v[j];
            }
        }
        __syncthreads();
        if (t < split.group && c0 + t < C) {
          acc_t tk = colk[t * S], tf = colf[t * S];
          for (int64_t q = 1; q < S; ++q) {
            tk += colk[t * S + q];
            tf += colf[t * S + q];
          }
          pk[row * C + c0 + t] = tk;
          pf[row * C + c0 + t] = tf;
        }
        return;
      }
    }
    if (c < C) {
#pragma unroll
      for (int j = 0; j < W; ++j) scale[j] = multistep_scale(dt, keep, n, !kPlanes && c + j < C ? c + j : c);
    }
    for (int64_t q = q0; q < q1 && c < C; q += dq) {
      if constexpr (kPlanes) {
        const int64_t base = (n * C + c) * S;
        const PlaneItem it = plane_item(q, base, S, split.pack);
        reduction_item<W>(base + it.first, 0, it.count, body);
      } else {
        reduction_item<W>((n * S + q) * C + c, 0, split.pack, body);
      }
    }
  }
  if constexpr (kPlanes) {
    const acc_t tk = warp_sum(sk.v[0]), tf = warp_sum(sf.v[0]);  // c is uniform in a warp: every lane takes part
    if (threadIdx.x == 0 && c < C) {
      pk[row * C + c] = tk;
      pf[row * C + c] = tf;
    }
  } else {
    __shared__ Slots<acc_t, W> shared_k[kRows][kLanes];
    __shared__ Slots<acc_t, W> shared_f[kRows][kLanes];
    shared_k[threadIdx.y][threadIdx.x] = sk;
    shared_f[threadIdx.y][threadIdx.x] = sf;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        if (j > 0 && j >= split.pack) break;
        acc_t tk = sk.v[j], tf = sf.v[j];
        for (int y = 1; y < kRows; ++y) {
          tk += shared_k[y][threadIdx.x].v[j];
          tf += shared_f[y][threadIdx.x].v[j];
        }
        pk[row * C + c + j] = tk;
        pf[row * C + c + j] = tf;
      }
    }
  }
}

// Tables of R = N * chunks rows (row = n * chunks + chunk). Blocks [0, fold_blocks(C)): a warp per
// channel c: colk[c] = sum_row pk[row, c] and, with dt, ddt[c] = sum_row keep[n] pf[row, c]
// (warp_fold_sum over the rows). Blocks after: one per sample n (only with keep): dkeep[n] =
// sum over its chunks' rows and c of dt[c] pf[row, c] (threads stride the contiguous chunks x C
// values, coalesced; then block_sum). Fixed order.
template <typename acc_t>
__global__ void multistep_fold_kernel(const acc_t* __restrict__ pk, const acc_t* __restrict__ pf,
                                      const acc_t* __restrict__ dt, const acc_t* __restrict__ keep,
                                      acc_t* __restrict__ colk, acc_t* __restrict__ ddt, acc_t* __restrict__ dkeep,
                                      int64_t N, int64_t C, int64_t chunks, int64_t channel_blocks) {
  if (blockIdx.x >= channel_blocks) {
    __shared__ acc_t shared[kThreads / 32];
    const int64_t n = blockIdx.x - channel_blocks;
    const acc_t* p = pf + n * chunks * C;
    acc_t s = 0;
    for (int64_t j = threadIdx.x; j < chunks * C; j += blockDim.x) s += (dt ? dt[j % C] : acc_t(1)) * p[j];
    s = block_sum(s, shared);
    if (threadIdx.x == 0) dkeep[n] = s;
    return;
  }
  const int64_t c = blockIdx.x * kFoldWarps + threadIdx.x / 32;
  if (c >= C) return;  // whole warps leave
  const int64_t rows = N * chunks;
  const acc_t sk = warp_fold_sum<acc_t>(rows, [&](int64_t r) { return pk[r * C + c]; });
  if (threadIdx.x % 32 == 0) colk[c] = sk;
  if (ddt) {
    const acc_t sf =
        warp_fold_sum<acc_t>(rows, [&](int64_t r) { return (keep ? keep[r / chunks] : acc_t(1)) * pf[r * C + c]; });
    if (threadIdx.x % 32 == 0) ddt[c] = sf;
  }
}

// One block: dk = sum_c colk[c] (threads stride c, then block_sum): fixed order.
template <typename acc_t>
__global__ void multistep_dk_kernel(const acc_t* __restrict__ colk, acc_t* __restrict__ dk, int64_t C) {
  __shared__ acc_t shared[kThreads / 32];
  acc_t s = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += colk[c];
  s = block_sum(s, shared);
  if (threadIdx.x == 0) *dk = s;
}

at::Tensor multistep_update_cuda(const at::Tensor& u_in, const at::Tensor& u_prev_in, const at::Tensor& f_in,
                                 const at::Tensor& k_in, const std::optional<at::Tensor>& dt_in,
                                 const std::optional<at::Tensor>& keep_in, bool relu) {
  const c10::cuda::CUDAGuard guard(u_in.device());
  MultistepForwardArgs a = prepare_multistep_forward(u_in, u_prev_in, f_in, k_in, dt_in, keep_in);
  const MultistepView v = a.view;
  if (a.u.numel() == 0) return a.out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.u.scalar_type(), "tsc_multistep_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *up = a.u.const_data_ptr<scalar_t>(), *pp = a.u_prev.const_data_ptr<scalar_t>(),
                   *fp = a.f.const_data_ptr<scalar_t>();
    scalar_t* op = a.out.mutable_data_ptr<scalar_t>();
    const int64_t numel = a.u.numel();
    dispatch_elementwise<scalar_t>(numel, {up, pp, fp, op}, [&]<int W, typename index_t>() {
      multistep_forward_kernel<W, index_t, scalar_t, acc_t>
          <<<elementwise_grid(numel / W + 1, kThreads), kThreads, 0, stream>>>(
              up, pp, fp, a.k.const_data_ptr<acc_t>(), optional_ptr<acc_t>(a.dt), optional_ptr<acc_t>(a.keep), op,
              static_cast<index_t>(numel), ChannelIndex<index_t>(v.channels_last ? 1 : v.S, v.C, v.C * v.S), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return a.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multistep_update_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& u_in, const at::Tensor& u_prev_in, const at::Tensor& f_in,
    const at::Tensor& k_in, const std::optional<at::Tensor>& dt_in, const std::optional<at::Tensor>& keep_in,
    const std::optional<at::Tensor>& relu_out) {
  const c10::cuda::CUDAGuard guard(u_in.device());
  MultistepBackwardArgs a = prepare_multistep_backward(grad_in, u_in, u_prev_in, f_in, k_in, dt_in, keep_in, relu_out);
  const MultistepView v = a.view;
  const multistep_plan::BackwardSplit split = multistep_plan::backward_split(v, a.u.element_size());
  const int64_t blocks = multistep_plan::backward_blocks(v, a.u.element_size());
  TORCH_CHECK(blocks < (int64_t{1} << 31),
              "tsc::multistep_update_backward (CUDA): N * channel tiles must be below 2^31, got ", blocks);
  const int64_t channel_blocks = fold_blocks(v.C), fold_grid = multistep_plan::fold_grid(v, a.keep.defined());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.u.scalar_type(), "tsc_multistep_update_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::Tensor tables = at::empty({2, v.N * split.chunks * v.C}, a.k.options());
        at::Tensor colk = at::empty({v.C}, a.k.options());
        if (a.u.numel() > 0) {
          const scalar_t *gp = a.g.const_data_ptr<scalar_t>(), *uptr = a.u.const_data_ptr<scalar_t>(),
                         *pp = a.u_prev.const_data_ptr<scalar_t>(), *fp = a.f.const_data_ptr<scalar_t>(),
                         *op = a.relu ? a.relu_out.const_data_ptr<scalar_t>() : nullptr;
          scalar_t *dup = a.du.mutable_data_ptr<scalar_t>(), *dpp = a.du_prev.mutable_data_ptr<scalar_t>(),
                   *dfp = a.df.mutable_data_ptr<scalar_t>();
          constexpr int W = static_cast<int>(reduction_pack(sizeof(scalar_t)));
          bool vec = split.pack == W;
          for (const void* p :
               {static_cast<const void*>(gp), static_cast<const void*>(uptr), static_cast<const void*>(pp),
                static_cast<const void*>(fp), static_cast<const void*>(op), static_cast<const void*>(dup),
                static_cast<const void*>(dpp), static_cast<const void*>(dfp)})
            vec = vec && reinterpret_cast<std::uintptr_t>(p) % (W * sizeof(scalar_t)) == 0;
          const auto cols = static_cast<unsigned>(multistep_plan::backward_shared_bytes(v, split.group, sizeof(acc_t)));
          const auto launch = [&](auto kernel) {
            kernel<<<static_cast<unsigned>(blocks), dim3(kLanes, kRows), cols, stream>>>(
                gp, uptr, pp, fp, op, a.k.const_data_ptr<acc_t>(), optional_ptr<acc_t>(a.dt),
                optional_ptr<acc_t>(a.keep), dup, dpp, dfp, tables[0].mutable_data_ptr<acc_t>(),
                tables[1].mutable_data_ptr<acc_t>(), v.C, v.S, split);
          };
          // Vec = false only where pairs exist (W > 1): a misaligned view walks the same items with scalar accesses
          if (v.channels_last) {
            if (vec)
              launch(multistep_backward_kernel<false, W, true, scalar_t, acc_t>);
            else
              launch(multistep_backward_kernel<false, W, W == 1, scalar_t, acc_t>);
          } else {
            if (vec)
              launch(multistep_backward_kernel<true, W, true, scalar_t, acc_t>);
            else
              launch(multistep_backward_kernel<true, W, W == 1, scalar_t, acc_t>);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          tables.zero_();
        }
        if (fold_grid > 0) {
          multistep_fold_kernel<acc_t><<<static_cast<unsigned>(fold_grid), kThreads, 0, stream>>>(
              tables[0].const_data_ptr<acc_t>(), tables[1].const_data_ptr<acc_t>(), optional_ptr<acc_t>(a.dt),
              optional_ptr<acc_t>(a.keep), colk.mutable_data_ptr<acc_t>(),
              a.dt.defined() ? a.ddt.mutable_data_ptr<acc_t>() : nullptr,
              a.keep.defined() ? a.dkeep.mutable_data_ptr<acc_t>() : nullptr, v.N, v.C, split.chunks, channel_blocks);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        multistep_dk_kernel<acc_t>
            <<<1, kThreads, 0, stream>>>(colk.const_data_ptr<acc_t>(), a.dk.mutable_data_ptr<acc_t>(), v.C);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {a.du, a.du_prev, a.df, a.dk, a.ddt, a.dkeep};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsc, CUDA, m) {
  m.impl("multistep_update", &multistep_update_cuda);
  m.impl("multistep_update_backward", &multistep_update_backward_cuda);
}

}  // namespace tsc
