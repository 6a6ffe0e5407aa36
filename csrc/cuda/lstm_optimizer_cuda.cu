// CUDA kernels of lstm_optimizer_step: one thread per coordinate runs the shared math of
// pymeta/lstm_optimizer.h (state loads and stores are coalesced thanks to the feature-major
// [4, H, N] layout; weight loads are uniform over a warp, i.e. broadcasts from L1).
// Backward = three launches:
//   1. per coordinate: recompute, backpropagate, write d_grad, d_state and the workspace rows;
//   2. per (tile of weight-gradient entries, chunk of kLstmOptCudaChunk coordinates): a tiled
//      sum over the chunk into that chunk's partial sums (no atomics);
//   3. per weight-gradient entry: the sum over chunks in order.
#include <cuda_runtime.h>

#include <type_traits>

#include "pymeta/lstm_optimizer.h"

namespace pymeta {
namespace {

constexpr int kThreads = 128;
constexpr int kTile = 32;  // weight-gradient tile: kTile x kTile entries per block

template <typename T>
struct Params {
  LstmOptWeights<T> W;
  LstmOptScalars<T> s;
};

template <typename T>
Params<T> params_of(const LstmOptLaunch& L) {
  Params<T> P;
  const T* const* w = reinterpret_cast<const T* const*>(L.w);
  P.W = {w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9]};
  P.s.H = L.H;
  P.s.n_in = L.n_in;
  P.s.preproc = L.preproc;
  P.s.inv_p = static_cast<T>(1.0 / L.p);
  P.s.exp_p = static_cast<T>(std::exp(L.p));
  P.s.threshold = static_cast<T>(std::exp(-L.p));
  P.s.out_scale = static_cast<T>(L.out_scale);
  return P;
}

template <typename T, int HMAX>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const __grid_constant__ LstmOptLaunch L, const __grid_constant__ Params<T> P) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= L.N) return;
  lstm_opt_forward_coord<HMAX, T, T>(P.W, P.s, static_cast<const T*>(L.grad),
                                     static_cast<const T*>(L.state), static_cast<T*>(L.update),
                                     static_cast<T*>(L.new_state), Col{L.N, n, 1});
}

template <typename T, int HMAX>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const __grid_constant__ LstmOptLaunch L, const __grid_constant__ Params<T> P) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= L.N) return;
  const Col col{L.N, n, 1};
  lstm_opt_backward_coord<HMAX, T, T>(
      P.W, P.s, static_cast<const T*>(L.grad), static_cast<const T*>(L.state),
      static_cast<const T*>(L.d_update), static_cast<const T*>(L.d_new_state),
      static_cast<T*>(L.d_grad), static_cast<T*>(L.d_state), static_cast<T*>(L.workspace), col,
      col);
}

struct WgradPlan {
  LstmOptPairs pairs;
  LstmOptRows rows;
  int tile_start[4];  // tiles of pair q: [tile_start[q], tile_start[q + 1])
  int tiles_b[3];     // tiles along B rows of pair q
  int64_t partial_offset;  // elements from the workspace start to the partial sums
  int64_t chunks;
};

// Row k of B_q (see lstm_opt_pairs); nullptr is the row of ones.
template <typename T>
__device__ const T* b_row(const WgradPlan& p, int q, int k, const T* ws, const T* state,
                          int H, int n_in, int64_t N) {
  const LstmOptRows& R = p.rows;
  if (q == 0) return k < n_in ? ws + (R.x + k) * N : k < n_in + H ? state + int64_t(k - n_in) * N : nullptr;
  if (q == 1) return k < H ? ws + (R.h1 + k) * N : k < 2 * H ? state + int64_t(2 * H + k - H) * N : nullptr;
  return k < H ? ws + (R.h2 + k) * N : nullptr;
}

// Block (kTile, 8): thread (tx, ty) owns entries (a0 + ty + 8 i, b0 + tx), i < 4.
template <typename T>
__global__ void __launch_bounds__(kTile * 8)
wgrad_kernel(const __grid_constant__ LstmOptLaunch L, const __grid_constant__ WgradPlan p) {
  __shared__ T As[kTile][kTile + 1];
  __shared__ T Bs[kTile][kTile + 1];
  const int tile = blockIdx.x;
  const int q = tile < p.tile_start[1] ? 0 : tile < p.tile_start[2] ? 1 : 2;
  const int local = tile - p.tile_start[q];
  const int a0 = (local / p.tiles_b[q]) * kTile, b0 = (local % p.tiles_b[q]) * kTile;
  const int ma = p.pairs.ma[q], mb = p.pairs.mb[q];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t N = L.N;
  const T* ws = static_cast<const T*>(L.workspace);
  const T* state = static_cast<const T*>(L.state);
  const int arow0 = q == 0 ? p.rows.dz1 : q == 1 ? p.rows.dz2 : p.rows.du;

  const T* arow[4];
  const T* brow[4];
  bool bones[4], bvalid[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int a = a0 + ty + 8 * i, b = b0 + ty + 8 * i;
    arow[i] = a < ma ? ws + int64_t(arow0 + a) * N : nullptr;
    bvalid[i] = b < mb;
    brow[i] = bvalid[i] ? b_row<T>(p, q, b, ws, state, L.H, L.n_in, N) : nullptr;
    bones[i] = bvalid[i] && brow[i] == nullptr;
  }
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * kLstmOptCudaChunk;
  const int64_t n_end = n_begin + kLstmOptCudaChunk < N ? n_begin + kLstmOptCudaChunk : N;
  T acc[4] = {0, 0, 0, 0};
  for (int64_t n = n_begin; n < n_end; n += kTile) {
    const int64_t nn = n + tx;
    const bool in = nn < n_end;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      As[ty + 8 * i][tx] = in && arow[i] ? arow[i][nn] : T(0);
      Bs[ty + 8 * i][tx] = !in ? T(0) : bones[i] ? T(1) : brow[i] ? brow[i][nn] : T(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kTile; ++k) {
      const T b = Bs[tx][k];
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] += As[ty + 8 * i][k] * b;
    }
    __syncthreads();
  }
  T* partial = static_cast<T*>(L.workspace) + p.partial_offset +
               static_cast<int64_t>(blockIdx.y) * p.pairs.off[3];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int a = a0 + ty + 8 * i, b = b0 + tx;
    if (a < ma && b < mb) partial[p.pairs.off[q] + int64_t(a) * mb + b] = acc[i];
  }
}

struct FinishPlan {
  LstmOptSegment seg[10];
  int64_t seg_start[11];
  int64_t partial_offset, P, chunks;
};

template <typename T>
__global__ void finish_kernel(const __grid_constant__ LstmOptLaunch L, const __grid_constant__ FinishPlan f) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= f.seg_start[10]) return;
  int d = 0;
  while (e >= f.seg_start[d + 1]) ++d;
  const int64_t local = e - f.seg_start[d];
  const int64_t i = local / f.seg[d].cols, j = local % f.seg[d].cols;
  const T* part = static_cast<const T*>(L.workspace) + f.partial_offset + f.seg[d].src_off +
                  i * f.seg[d].src_stride + j;
  T acc = 0;
  for (int64_t c = 0; c < f.chunks; ++c) acc += part[c * f.P];
  static_cast<T*>(L.d_w[d])[local] = acc;
}

template <typename F>
int dispatch(const LstmOptLaunch& L, F&& f) {
  auto by_h = [&](auto tag) {
    using T = decltype(tag);
    if (L.H <= 16) return f(tag, std::integral_constant<int, 16>{});
    if (L.H <= 24) return f(tag, std::integral_constant<int, 24>{});
    if (L.H <= 32) return f(tag, std::integral_constant<int, 32>{});
    return f(T{}, std::integral_constant<int, 64>{});
  };
  return L.dtype == DType::Float64 ? by_h(double{}) : by_h(float{});
}

int64_t ws_rows_bytes(const LstmOptLaunch& L) {
  const int64_t elem = L.dtype == DType::Float64 ? 8 : 4;
  const int64_t bytes = int64_t(lstm_opt_rows(L.H, L.n_in).total) * L.N * elem;
  return (bytes + 255) / 256 * 256;
}

int64_t num_chunks(int64_t N) { return (N + kLstmOptCudaChunk - 1) / kLstmOptCudaChunk; }

}  // namespace

int64_t lstm_opt_workspace_bytes_cuda(const LstmOptLaunch& L) {
  const int64_t elem = L.dtype == DType::Float64 ? 8 : 4;
  return ws_rows_bytes(L) + num_chunks(L.N) * lstm_opt_pairs(L.H, L.n_in).off[3] * elem;
}

int lstm_opt_forward_cuda(const LstmOptLaunch& L, CUstream_st* stream) {
  if (L.N == 0) return 0;
  const unsigned blocks = static_cast<unsigned>((L.N + kThreads - 1) / kThreads);
  return dispatch(L, [&](auto tag, auto hmax) {
    using T = decltype(tag);
    forward_kernel<T, decltype(hmax)::value><<<blocks, kThreads, 0, stream>>>(L, params_of<T>(L));
    return static_cast<int>(cudaGetLastError());
  });
}

int lstm_opt_backward_cuda(const LstmOptLaunch& L, CUstream_st* stream) {
  if (L.N == 0) return 0;
  const unsigned blocks = static_cast<unsigned>((L.N + kThreads - 1) / kThreads);
  return dispatch(L, [&](auto tag, auto hmax) {
    using T = decltype(tag);
    backward_kernel<T, decltype(hmax)::value><<<blocks, kThreads, 0, stream>>>(L, params_of<T>(L));
    int err = static_cast<int>(cudaGetLastError());
    if (err) return err;

    WgradPlan p{};
    p.pairs = lstm_opt_pairs(L.H, L.n_in);
    p.rows = lstm_opt_rows(L.H, L.n_in);
    p.tile_start[0] = 0;
    for (int q = 0; q < 3; ++q) {
      p.tiles_b[q] = (p.pairs.mb[q] + kTile - 1) / kTile;
      p.tile_start[q + 1] = p.tile_start[q] + ((p.pairs.ma[q] + kTile - 1) / kTile) * p.tiles_b[q];
    }
    p.partial_offset = ws_rows_bytes(L) / static_cast<int64_t>(sizeof(T));
    p.chunks = num_chunks(L.N);
    wgrad_kernel<T><<<dim3(p.tile_start[3], static_cast<unsigned>(p.chunks)), dim3(kTile, 8), 0,
                      stream>>>(L, p);
    err = static_cast<int>(cudaGetLastError());
    if (err) return err;

    FinishPlan f{};
    f.seg_start[0] = 0;
    for (int d = 0; d < 10; ++d) {
      f.seg[d] = lstm_opt_segment(d, L.H, L.n_in);
      f.seg_start[d + 1] = f.seg_start[d] + int64_t(f.seg[d].rows) * f.seg[d].cols;
    }
    f.partial_offset = p.partial_offset;
    f.P = p.pairs.off[3];
    f.chunks = p.chunks;
    const unsigned fblocks = static_cast<unsigned>((f.seg_start[10] + 255) / 256);
    finish_kernel<T><<<fblocks, 256, 0, stream>>>(L, f);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace pymeta
