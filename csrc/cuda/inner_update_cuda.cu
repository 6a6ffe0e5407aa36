// CUDA kernels of inner_update: indexing and memory layout only; the math is in
// pymeta/inner_update.h. Each thread owns VEC columns of a tile (one 16-byte load per row
// when the tensor allows it) and walks the tile's rows (tasks).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "multi_tensor.cuh"
#include "pymeta/inner_update.h"

namespace pymeta {
namespace {

template <typename scalar_t> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename scalar_t>
constexpr int vec_width() { return 16 / static_cast<int>(sizeof(scalar_t)); }

template <typename F>
int dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

template <typename scalar_t, int N>
__device__ __forceinline__ Vec<scalar_t, N> load_vec(const scalar_t* p) {
  return *reinterpret_cast<const Vec<scalar_t, N>*>(p);
}

// The learning rate of the VEC (or 1) columns starting at c, with stride `stride`.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t lr_at(const InnerUpdateLaunch& L, const InnerUpdateTensor& e,
                                       int64_t c) {
  switch (static_cast<LrKind>(e.lr_kind)) {
    case LrKind::Scalar: return static_cast<acc_t>(L.lr_scalar);
    case LrKind::Tensor0d: return static_cast<acc_t>(static_cast<const scalar_t*>(e.lr)[0]);
    default: return static_cast<acc_t>(static_cast<const scalar_t*>(e.lr)[c]);
  }
}

// ---- forward: out[t, c] = param[(t,) c] - lr[c] * grad[t, c] --------------------------

template <typename scalar_t>
struct ForwardTile {
  __device__ void operator()(const InnerUpdateLaunch& L, const Tile& tile) const {
    using acc_t = typename Acc<scalar_t>::type;
    constexpr int V = vec_width<scalar_t>();
    const InnerUpdateTensor& e = L.t[tile.tensor];
    const int64_t n = L.map.n[tile.tensor];
    const auto* p = static_cast<const scalar_t*>(e.in0);
    const auto* g = static_cast<const scalar_t*>(e.grad);
    auto* out = static_cast<scalar_t*>(e.out);
    if (e.vec_ok) {
      const int64_t c = tile.col0 + static_cast<int64_t>(threadIdx.x) * V;
      if (c >= n) return;
      acc_t lr[V];
#pragma unroll
      for (int k = 0; k < V; ++k) lr[k] = lr_at<acc_t, scalar_t>(L, e, c + k);
      Vec<scalar_t, V> pv;
      if (e.shared) pv = load_vec<scalar_t, V>(p + c);
#pragma unroll 4
      for (int64_t r = tile.row0; r < tile.row1; ++r) {
        const Vec<scalar_t, V> gv = load_vec<scalar_t, V>(g + r * n + c);
        if (!e.shared) pv = load_vec<scalar_t, V>(p + r * n + c);
        Vec<scalar_t, V> ov;
#pragma unroll
        for (int k = 0; k < V; ++k)
          ov.v[k] = static_cast<scalar_t>(sgd_step<acc_t>(
              static_cast<acc_t>(pv.v[k]), lr[k], static_cast<acc_t>(gv.v[k])));
        *reinterpret_cast<Vec<scalar_t, V>*>(out + r * n + c) = ov;
      }
    } else {
      // Unaligned or ragged tensor: V scalar columns per thread, strided by the block so
      // that each warp access stays coalesced.
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t c = tile.col0 + threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
        if (c >= n) break;
        const acc_t lr = lr_at<acc_t, scalar_t>(L, e, c);
        for (int64_t r = tile.row0; r < tile.row1; ++r) {
          const scalar_t pv = e.shared ? p[c] : p[r * n + c];
          out[r * n + c] = static_cast<scalar_t>(
              sgd_step<acc_t>(static_cast<acc_t>(pv), lr, static_cast<acc_t>(g[r * n + c])));
        }
      }
    }
  }
};

// ---- backward: dgrad, and sums over tasks for dparam and dlr --------------------------

template <typename scalar_t>
struct BackwardTile {
  __device__ void operator()(const InnerUpdateLaunch& L, const Tile& tile) const {
    using acc_t = typename Acc<scalar_t>::type;
    constexpr int V = vec_width<scalar_t>();
    const InnerUpdateTensor& e = L.t[tile.tensor];
    const int64_t n = L.map.n[tile.tensor];
    const auto* dout = static_cast<const scalar_t*>(e.in0);
    const auto* g = static_cast<const scalar_t*>(e.grad);
    auto* dg = static_cast<scalar_t*>(e.out);
    auto* dp = static_cast<scalar_t*>(e.dparam);
    const bool want_dlr = e.dlr != nullptr;
    const auto kind = static_cast<LrKind>(e.lr_kind);
    acc_t dl_total = 0;  // this thread's share of a Tensor0d lr's gradient
    if (e.vec_ok) {
      const int64_t c = tile.col0 + static_cast<int64_t>(threadIdx.x) * V;
      if (c < n) {
        acc_t lr[V], sp[V], sl[V];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          lr[k] = lr_at<acc_t, scalar_t>(L, e, c + k);
          sp[k] = 0;
          sl[k] = 0;
        }
#pragma unroll 4
        for (int64_t r = tile.row0; r < tile.row1; ++r) {
          const Vec<scalar_t, V> dv = load_vec<scalar_t, V>(dout + r * n + c);
          if (dg) {
            Vec<scalar_t, V> ov;
#pragma unroll
            for (int k = 0; k < V; ++k)
              ov.v[k] = static_cast<scalar_t>(
                  sgd_step_dgrad<acc_t>(lr[k], static_cast<acc_t>(dv.v[k])));
            *reinterpret_cast<Vec<scalar_t, V>*>(dg + r * n + c) = ov;
          }
#pragma unroll
          for (int k = 0; k < V; ++k) sp[k] += static_cast<acc_t>(dv.v[k]);
          if (want_dlr) {
            const Vec<scalar_t, V> gv = load_vec<scalar_t, V>(g + r * n + c);
#pragma unroll
            for (int k = 0; k < V; ++k)
              sl[k] += sgd_step_dlr<acc_t>(static_cast<acc_t>(gv.v[k]),
                                           static_cast<acc_t>(dv.v[k]));
          }
        }
#pragma unroll
        for (int k = 0; k < V; ++k) {
          if (dp) dp[c + k] = static_cast<scalar_t>(sp[k]);
          if (want_dlr && kind == LrKind::Full)
            static_cast<scalar_t*>(e.dlr)[c + k] = static_cast<scalar_t>(sl[k]);
          dl_total += sl[k];
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t c = tile.col0 + threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
        if (c >= n) break;
        const acc_t lr = lr_at<acc_t, scalar_t>(L, e, c);
        acc_t sp = 0, sl = 0;
        for (int64_t r = tile.row0; r < tile.row1; ++r) {
          const acc_t d = static_cast<acc_t>(dout[r * n + c]);
          if (dg) dg[r * n + c] = static_cast<scalar_t>(sgd_step_dgrad<acc_t>(lr, d));
          sp += d;
          if (want_dlr) sl += sgd_step_dlr<acc_t>(static_cast<acc_t>(g[r * n + c]), d);
        }
        if (dp) dp[c] = static_cast<scalar_t>(sp);
        if (want_dlr && kind == LrKind::Full) static_cast<scalar_t*>(e.dlr)[c] = static_cast<scalar_t>(sl);
        dl_total += sl;
      }
    }
    if (want_dlr && kind == LrKind::Tensor0d) {  // uniform over the block
      const acc_t s = block_sum(dl_total);
      if (threadIdx.x == 0) static_cast<acc_t*>(e.dlr)[tile.col_block] = s;
    }
  }
};

template <typename scalar_t>
__global__ void lr_finish_kernel(const __grid_constant__ LrFinishLaunch L) {
  using acc_t = typename Acc<scalar_t>::type;
  const int k = blockIdx.x;
  const auto* part = static_cast<const acc_t*>(L.partials[k]);
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < L.count[k]; i += blockDim.x) s += part[i];
  s = block_sum(s);
  if (threadIdx.x == 0) *static_cast<scalar_t*>(L.dlr[k]) = static_cast<scalar_t>(s);
}

}  // namespace

int inner_update_forward_cuda(const InnerUpdateLaunch& L, int threads, CUstream_st* stream) {
  return dispatch_dtype(L.dtype, [&](auto tag) {
    return launch_multi_tensor(L, threads, stream, ForwardTile<decltype(tag)>{});
  });
}

int inner_update_backward_cuda(const InnerUpdateLaunch& L, int threads, CUstream_st* stream) {
  return dispatch_dtype(L.dtype, [&](auto tag) {
    return launch_multi_tensor(L, threads, stream, BackwardTile<decltype(tag)>{});
  });
}

int inner_update_lr_finish_cuda(const LrFinishLaunch& L, CUstream_st* stream) {
  if (L.num == 0) return 0;
  return dispatch_dtype(L.dtype, [&](auto tag) {
    lr_finish_kernel<decltype(tag)><<<L.num, 256, 0, stream>>>(L);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace pymeta
