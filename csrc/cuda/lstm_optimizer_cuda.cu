// CUDA kernels of lstm_optimizer_step. One thread per coordinate (state loads and stores
// are coalesced thanks to the feature-major [4, H, N] layout).
// Main path (when the staged weights fit in shared memory): persistent blocks stage the
// weights once into shared memory, in the padded layout of lstm_optimizer_thread.cuh (16-byte
// vector loads, no per-k guards, no register spills), then loop over tiles of coordinates.
// Fallback (double at H > 32, or a GPU with less shared memory): the header's per-coordinate
// math with weights read from global memory.
// Backward = three launches:
//   1. per coordinate: recompute, backpropagate, write d_grad, d_state and the workspace rows;
//   2. per (32 x 32 tile of weight-gradient entries, chunk of kLstmOptCudaChunk coordinates):
//      a register-tiled sum over the chunk (4 x 4 entries per thread) into that chunk's
//      partial sums (no atomics); or, by default for float at H <= 32 (PYMETA_LSTM_WG_MMA=0
//      opts out), one block per chunk for all entries on the tensor cores (wgrad_mma_kernel);
//   3. per weight-gradient entry: the sum over chunks in a fixed order.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <type_traits>
#include <vector>

#include "lstm_optimizer_mma.cuh"
#include "lstm_optimizer_thread.cuh"
#include "pymeta/lstm_optimizer.h"

namespace pymeta {
namespace {

constexpr int kThreads = 128;  // the fallback kernels

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

// ---- shared-memory kernels ------------------------------------------------------------------
// Threads per block and coordinates per thread of the shared-memory kernels, by padded H.
// HP = 64: the float weights take 201 KB, one block per SM, so a bigger block.
template <int HP>
constexpr int smem_threads() { return HP >= 64 ? 256 : 128; }
template <typename T, int HP>
constexpr int fwd_coords() { return 1; }

// The block's weights, staged into dynamic shared memory (lstm_optimizer_thread.cuh layout).
template <typename T, int HP>
__device__ __forceinline__ T* staged_weights(const Params<T>& P) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sw = reinterpret_cast<T*>(smem_raw);
  lstm_stage_weights<HP>(sw, P.W, P.s.H, P.s.n_in, threadIdx.x, blockDim.x);
  __syncthreads();
  return sw;
}

template <typename T, int HP>
__global__ void __launch_bounds__(smem_threads<HP>())
forward_smem_kernel(const __grid_constant__ LstmOptLaunch L, const __grid_constant__ Params<T> P) {
  T* sw = staged_weights<T, HP>(P);
  constexpr int C = fwd_coords<T, HP>();
  const int64_t N = L.N;
  const int64_t tile = int64_t(blockDim.x) * C;
  for (int64_t base = int64_t(blockIdx.x) * tile; base < N; base += int64_t(gridDim.x) * tile) {
    int64_t n[C];
    bool valid[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int64_t m = base + int64_t(c) * blockDim.x + threadIdx.x;
      valid[c] = m < N;
      n[c] = valid[c] ? m : base + threadIdx.x;  // an invalid slot repeats slot 0
    }
    if (!valid[0]) break;  // slot 0 out of range: so are all later tiles of this block
    lstm_smem_forward_thread<HP, C, T>(sw, P.s, static_cast<const T*>(L.grad),
                                       static_cast<const T*>(L.state), static_cast<T*>(L.update),
                                       static_cast<T*>(L.new_state), N, n, valid);
  }
}

// The backward's CUDA-core pass, in two forms with the same arithmetic (the same bits):
// backward_smem_kernel runs lstm_smem_backward_thread's plain loops (106 registers at HP = 20,
// 4 blocks per SM); backward_smem_ahead_kernel loads each unit's inputs one unit ahead, held
// to 128 registers for 4 blocks per SM (uncapped it takes 150, 3 blocks per SM, and measured
// no faster). The ahead form is the default for float at HP <= 20 (timed at H = 20 only; at
// HP = 16 it fits in 127 registers too); PYMETA_LSTM_BWD_AHEAD=0 / 1 forces the plain / ahead
// form (HP <= 32). H100, N = 1M, 2026-11-26 (bench/RESULTS.md run 12): at H = 20 the pass took
// 1.517 ms ahead vs 1.576 plain (1.588 uncapped); at H = 32 the ahead form spills (160 B) and
// took 3.18 ms vs 3.09 plain.
// kOff32: 32-bit offsets (PYMETA_LSTM_OFF32=1 where the workspace rows, R.total N elements,
// are fewer than 2^31; float only).
// St: the state's storage type, T or uint16_t (bfloat16 bits, T = float; L.state_bf16): the
// pass reads and writes it directly, with its float copies in the workspace's shadow rows
// (lstm_opt_shadow_rows), where the weight-gradient kernels read them.
template <typename T, int HP, bool kAhead, bool kOff32 = false, typename St = T>
__device__ __forceinline__ void backward_smem_body(const LstmOptLaunch& L, const Params<T>& P) {
  T* sw = staged_weights<T, HP>(P);
  const int64_t N = L.N;
  T* sh = nullptr;
  if constexpr (!std::is_same<St, T>::value)
    sh = static_cast<T*>(L.workspace) + int64_t(lstm_opt_rows(L.H, L.n_in).total) * N;
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += int64_t(gridDim.x) * blockDim.x) {
    lstm_smem_backward_thread<HP, T, kAhead, kOff32, St>(
        sw, P.s, static_cast<const T*>(L.grad), static_cast<const St*>(L.state),
        static_cast<const T*>(L.d_update), static_cast<const St*>(L.d_new_state),
        static_cast<T*>(L.d_grad), static_cast<St*>(L.d_state), static_cast<T*>(L.workspace), N, n,
        sh);
  }
}

// (no minimum of blocks per SM here: an explicit minimum of 1 let ptxas take 196 registers at
// HP = 20, against 106 without)
template <typename T, int HP, bool kOff32 = false>
__global__ void __launch_bounds__(smem_threads<HP>())
backward_smem_kernel(const __grid_constant__ LstmOptLaunch L, const __grid_constant__ Params<T> P) {
  backward_smem_body<T, HP, false, kOff32>(L, P);
}

template <typename T, int HP, bool kOff32 = false>
__global__ void __launch_bounds__(smem_threads<HP>(), 4)
backward_smem_ahead_kernel(const __grid_constant__ LstmOptLaunch L,
                           const __grid_constant__ Params<T> P) {
  backward_smem_body<T, HP, true, kOff32>(L, P);
}

// The pass for a bfloat16 state (float math): the float kernels' default form of each HP, the
// loads ahead at HP <= 20 (4 blocks per SM), else the plain loops. Its bfloat16 loads can't
// alias the float workspace stores, so ptxas, unbounded, lifted them early in the plain loops
// and took 252 / 254 registers at HP = 24 / 32 (sm_90; float: 130 / 142), 2 blocks per SM; held
// to the float kernel's 3 there (HP = 64: 1 block of 256 threads, as float).
template <int HP>
__global__ void __launch_bounds__(smem_threads<HP>(), HP <= 20 ? 4 : HP <= 32 ? 3 : 1)
backward_smem_bf16_kernel(const __grid_constant__ LstmOptLaunch L,
                          const __grid_constant__ Params<float> P) {
  backward_smem_body<float, HP, (HP <= 20), false, uint16_t>(L, P);
}

// The plain loops held to 80 registers, 6 blocks (24 warps) per SM: opt-in
// (PYMETA_LSTM_BWD_WIDE=1), float at HP <= 20 only. ptxas -v (sm_90): 88 B of spills at HP =
// 20. The pass waits on L1TEX for half its cycles at 4 warps per scheduler (ncu, run 12); 6
// may hide more than the spills cost. Not run on a GPU yet (tenth session). The same bits as
// the other forms.
template <typename T, int HP>
__global__ void __launch_bounds__(smem_threads<HP>(), 6)
backward_smem_wide_kernel(const __grid_constant__ LstmOptLaunch L,
                          const __grid_constant__ Params<T> P) {
  backward_smem_body<T, HP, false>(L, P);
}

// ---- tensor-core forward (float, H <= 32, sm_80+): lstm_optimizer_mma.cuh ----------------
// St: the state's storage type, float or uint16_t (bfloat16 bits, L.state_bf16). kOff32:
// 32-bit element offsets (the state has fewer than 2^31 elements; forward_off32).
// kBlk: the blocked state layout (L.blocked; lstm_mma_state_at), at HB = 20 and 32 only.
template <int HB, typename St, bool kOff32 = false, bool kBlk = false>
__global__ void __launch_bounds__(LstmMmaShape<HB>::kThreads, LstmMmaShape<HB>::kMinBlocks)
forward_mma_kernel(const __grid_constant__ LstmOptLaunch L, const __grid_constant__ Params<float> P) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sm = reinterpret_cast<float*>(smem_raw);
  lstm_mma_stage<HB>(sm, P.W, P.s.H, P.s.n_in, threadIdx.x, blockDim.x);
  __syncthreads();
  const int warps = blockDim.x / 32;
  const int64_t step = LstmMmaShape<HB>::kCoords;
  const float b_out = P.W.b_out[0];
  for (int64_t base = (int64_t(blockIdx.x) * warps + threadIdx.x / 32) * step; base < L.N;
       base += int64_t(gridDim.x) * warps * step)  // warp-uniform: the mma needs all 32 lanes
    lstm_mma_forward_warp<HB, St, kOff32, kBlk>(sm, P.s, b_out, static_cast<const float*>(L.grad),
                                  static_cast<const St*>(L.state), static_cast<float*>(L.update),
                                  static_cast<St*>(L.new_state), L.N, base);
}

// The same forward with each warp's next step copied into shared memory (cp.async) while the
// current one computes: lstm_mma_forward_staged. Shared memory: the staged weights (b_out
// among their constants, read where it is used: lstm_mma_b_out), then the warps' staging
// buffers (16-byte aligned). kOff32: 32-bit offsets for the stores (forward_off32).
// kSync (forward_mma_staged_sync_kernel): the block's warps in barrier groups of sync_warps
// (named barrier 1 + group), each group walking its steps together with a barrier per step,
// so that the group's copies of a state row reach DRAM as one run of 64 x sync_warps bytes
// (float32) where free-running warps leave 64-byte pieces at unrelated times
// (bench/NOTES_lstm.md, thirteenth and fourteenth sessions). Where and why each is the
// default: staged_launch.
template <int HB, typename St, bool kOff32, bool kSync, bool kBlk>
__device__ __forceinline__ void forward_mma_staged_body(const LstmOptLaunch& L,
                                                        const Params<float>& P, int buf_bytes,
                                                        bool vec, int sync_warps) {
  using S = LstmMmaShape<HB>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sm = reinterpret_cast<float*>(smem_raw);
  lstm_mma_stage<HB>(sm, P.W, P.s.H, P.s.n_in, threadIdx.x, blockDim.x);
  __syncthreads();
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  unsigned char* bufs = smem_raw + sizeof(float) * S::kTotal + size_t(2 * warp) * buf_bytes;
  const int64_t step = S::kCoords;
  const LstmSyncGroup g = kSync ? lstm_sync_group(warp, warps, sync_warps) : LstmSyncGroup{};
  lstm_mma_forward_staged<HB, St, kOff32, kSync, kBlk>(
      sm, bufs, buf_bytes, P.s, lstm_mma_b_out_at<HB>(sm), static_cast<const float*>(L.grad),
      static_cast<const St*>(L.state), static_cast<float*>(L.update),
      static_cast<St*>(L.new_state), L.N, (int64_t(blockIdx.x) * warps + warp) * step,
      int64_t(gridDim.x) * warps * step, vec, g.lead * step, g.bar_id, g.bar_threads);
}

template <int HB, typename St, bool kOff32 = false, bool kBlk = false>
__global__ void __launch_bounds__(LstmMmaShape<HB>::kStagedThreads, 1)
forward_mma_staged_kernel(const __grid_constant__ LstmOptLaunch L,
                          const __grid_constant__ Params<float> P, int buf_bytes, bool vec,
                          int sync_warps) {
  forward_mma_staged_body<HB, St, kOff32, false, kBlk>(L, P, buf_bytes, vec, sync_warps);
}

// A kernel of its own (not a template flag of the one above): the tests, the profiler checks
// and gpu_check.sh's ncu filter find it by name. At HB = 20 only: float32 with 64-bit offsets
// (the default there), bfloat16 with 32-bit offsets (opt-in). ptxas (sm_90): float32 128
// registers, 20 / 24 B of spill stores / loads; bfloat16 128 registers, 12 / 12 B.
template <int HB, typename St, bool kOff32 = false, bool kBlk = false>
__global__ void __launch_bounds__(LstmMmaShape<HB>::kStagedThreads, 1)
forward_mma_staged_sync_kernel(const __grid_constant__ LstmOptLaunch L,
                               const __grid_constant__ Params<float> P, int buf_bytes, bool vec,
                               int sync_warps) {
  forward_mma_staged_body<HB, St, kOff32, true, kBlk>(L, P, buf_bytes, vec, sync_warps);
}

// Opt-in (PYMETA_LSTM_MMA_BWD=1). Its first form measured slower than the CUDA-core pass at
// N >= 200k (H100, 2026-11-26: 2.317 vs 2.013 ms for the backward op at N = 1M, H = 20): at 255
// registers only 8 warps fit per SM. Since the tenth session it keeps each step's row offsets
// and shared-memory reads where they are used and re-reads c1_prev, so that at H <= 20 it fits
// 128 registers, two blocks per SM (16 warps): 124 B of spills at HB = 20 (capped at 128
// before, it spilled 512 B). HB = 24 / 32 stay at one block (255 registers; 152 / 236 B of
// spills, were 188 / 272). Not run on a GPU yet: the next gpu_check.sh measures it
// (bench/NOTES_lstm.md, tenth session).
constexpr int kMmaBwdThreads = 256;
template <int HB>
constexpr int mma_bwd_min_blocks() { return HB <= 20 ? 2 : 1; }

template <int HB>
__global__ void __launch_bounds__(kMmaBwdThreads, mma_bwd_min_blocks<HB>())
backward_mma_kernel(const __grid_constant__ LstmOptLaunch L, const __grid_constant__ Params<float> P) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sm = reinterpret_cast<float*>(smem_raw);
  lstm_mma_stage<HB>(sm, P.W, P.s.H, P.s.n_in, threadIdx.x, blockDim.x);
  lstm_mma_stage_transposed<HB>(sm, P.W, P.s.H, threadIdx.x, blockDim.x);
  __syncthreads();
  const int warps = blockDim.x / 32;
  const int64_t step = LstmMmaShape<HB>::kCoords;
  for (int64_t base = (int64_t(blockIdx.x) * warps + threadIdx.x / 32) * step; base < L.N;
       base += int64_t(gridDim.x) * warps * step)  // warp-uniform
    lstm_mma_backward_warp<HB>(
        sm, P.s, static_cast<const float*>(L.grad), static_cast<const float*>(L.state),
        static_cast<const float*>(L.d_update), static_cast<const float*>(L.d_new_state),
        static_cast<float*>(L.d_grad), static_cast<float*>(L.d_state),
        static_cast<float*>(L.workspace), L.N, base);
}

// ---- fallback kernels: weights from global memory --------------------------------------------
template <typename T, int HMAX>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const __grid_constant__ LstmOptLaunch L, const __grid_constant__ Params<T> P) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= L.N) return;
  lstm_opt_forward_coord<HMAX, T, T>(P.W, P.s, static_cast<const T*>(L.grad),
                                     static_cast<const T*>(L.state), static_cast<T*>(L.update),
                                     static_cast<T*>(L.new_state), Col{L.N, n});
}

template <typename T, int HMAX>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const __grid_constant__ LstmOptLaunch L, const __grid_constant__ Params<T> P) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= L.N) return;
  const Col col{L.N, n};
  lstm_opt_backward_coord<HMAX, T, T>(
      P.W, P.s, static_cast<const T*>(L.grad), static_cast<const T*>(L.state),
      static_cast<const T*>(L.d_update), static_cast<const T*>(L.d_new_state),
      static_cast<T*>(L.d_grad), static_cast<T*>(L.d_state), static_cast<T*>(L.workspace), col,
      col);
}

// ---- weight gradients -----------------------------------------------------------------------
// One block: a kLstmWgTile x kLstmWgTile tile of C_q summed over one chunk of coordinates
// (lstm_wgrad_* in lstm_optimizer_thread.cuh; the host emulation runs the same functions).
template <typename T>
__global__ void __launch_bounds__(kLstmWgThreads)
wgrad_kernel(const __grid_constant__ LstmOptLaunch L, const __grid_constant__ LstmWgradPlan p) {
  __shared__ __align__(16) T As[kLstmWgTile][kLstmWgTileK + 4];
  __shared__ __align__(16) T Bs[kLstmWgTile][kLstmWgTileK + 4];
  const LstmWgradTile tl = lstm_wgrad_tile(p, blockIdx.x, blockIdx.y, L.N);
  const T* ws = static_cast<const T*>(L.workspace);
  const T* state = static_cast<const T*>(L.state);
  LstmWgradRows<T> rows;
  lstm_wgrad_rows(p, tl, ws, state, L.H, L.n_in, L.N, threadIdx.x, rows);
  T acc[4][4];
  lstm_wgrad_zero(acc);
  for (int64_t n = tl.n_begin; n < tl.n_end; n += kLstmWgTileK) {
    lstm_wgrad_load(tl, rows, n, As, Bs, threadIdx.x);
    __syncthreads();
    lstm_wgrad_accumulate(As, Bs, acc, threadIdx.x);
    __syncthreads();
  }
  lstm_wgrad_store(p, tl, acc, static_cast<T*>(L.workspace), threadIdx.x);
}

// The tensor-core version (float, H <= 32, sm_80+; the default, PYMETA_LSTM_WG_MMA=0 opts out;
// H100, 2026-11-26, N = 1M: 0.40 vs 1.04 ms at H = 20, 0.96 vs 2.16 at H = 32): one block per
// chunk for all three C_q, each row read once (lstm_wg_mma_block in lstm_optimizer_mma.cuh).
template <int HB>
__global__ void __launch_bounds__(32 * kLstmWgWarps, HB <= 24 ? 2 : 1)
wgrad_mma_kernel(const __grid_constant__ LstmOptLaunch L, const __grid_constant__ LstmWgMmaPlan p,
                 bool vec) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  lstm_wg_mma_block<HB>(p, static_cast<const float*>(L.workspace),
                        static_cast<const float*>(L.state), static_cast<float*>(L.workspace),
                        reinterpret_cast<float*>(smem_raw), blockIdx.x, threadIdx.x, vec);
}

// The sum over chunks (lstm_finish_* in lstm_optimizer_thread.cuh): a block takes 32
// consecutive entries, warp w sums chunks w, w + 8, ... of its lane's entry (a warp reads 32
// consecutive partial sums per chunk), then warp 0 adds the 8 group sums in order.
template <typename T>
__global__ void __launch_bounds__(32 * kLstmFinishGroups)
finish_kernel(const __grid_constant__ LstmOptLaunch L, const __grid_constant__ LstmFinishPlan f) {
  __shared__ T sums[kLstmFinishGroups][32];
  const int lane = threadIdx.x & 31, grp = threadIdx.x >> 5;
  const int64_t e = int64_t(blockIdx.x) * 32 + lane;
  const bool valid = e < f.seg_start[10];
  int d = 0;
  int64_t local = 0;
  T acc = T(0);
  if (valid) {
    const int64_t src = lstm_finish_entry(f, e, d, local);
    acc = lstm_finish_group_sum(f, static_cast<const T*>(L.workspace), src, grp);
  }
  sums[grp][lane] = acc;
  __syncthreads();
  if (grp == 0 && valid) {
    T g[kLstmFinishGroups];
    for (int w = 0; w < kLstmFinishGroups; ++w) g[w] = sums[w][lane];
    static_cast<T*>(L.d_w[d])[local] = lstm_finish_total(g);
  }
}

// ---- dispatch -------------------------------------------------------------------------------
// f(T{}, HP) for the shared-memory kernels: H padded to a multiple of 4 (16, 20, 24, 32, 64).
template <typename F>
int dispatch(const LstmOptLaunch& L, F&& f) {
  auto by_h = [&](auto tag) {
    using T = decltype(tag);
    if (L.H <= 16) return f(tag, std::integral_constant<int, 16>{});
    if (L.H <= 20) return f(tag, std::integral_constant<int, 20>{});
    if (L.H <= 24) return f(tag, std::integral_constant<int, 24>{});
    if (L.H <= 32) return f(tag, std::integral_constant<int, 32>{});
    return f(T{}, std::integral_constant<int, 64>{});
  };
  return L.dtype == DType::Float64 ? by_h(double{}) : by_h(float{});
}

// Makes `kernel` launchable with `smem` bytes of dynamic shared memory on device `dev` and,
// when per_sm is given, returns its resident blocks per SM at `threads` threads. Each CUDA
// call is made once and remembered: cudaFuncSetAttribute and the occupancy query took ~5-9
// and ~4 us per call on an H100 host (torch.profiler, bench/RESULTS.md run 11), as much as a
// 10k-coordinate step's kernel. The attribute is only ever raised, so that a remembered launch
// stays valid after a smaller one. Keyed by device, not context: PyTorch keeps each device's
// primary context for the process; a cudaDeviceReset in between would void the memo.
struct KernelMemo {
  struct Attr { const void* fn; int dev; size_t smem; };
  struct Occupancy { const void* fn; int dev; int threads; size_t smem; int per_sm; };
  std::mutex mu;
  std::vector<Attr> attrs;
  std::vector<Occupancy> occupancy;
};

template <typename K>
cudaError_t kernel_smem(K kernel, int dev, int threads, size_t smem, int* per_sm) {
  static KernelMemo& memo = *new KernelMemo;  // never destroyed: launches at exit stay safe
  const void* fn = reinterpret_cast<const void*>(kernel);
  std::lock_guard<std::mutex> lock(memo.mu);
  KernelMemo::Attr* attr = nullptr;
  for (auto& a : memo.attrs)
    if (a.fn == fn && a.dev == dev) attr = &a;
  if (!attr || attr->smem < smem) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err) return err;
    if (attr)
      attr->smem = smem;
    else
      memo.attrs.push_back({fn, dev, smem});
  }
  if (!per_sm) return cudaSuccess;
  for (const auto& o : memo.occupancy)
    if (o.fn == fn && o.dev == dev && o.threads == threads && o.smem == smem) {
      *per_sm = o.per_sm;
      return cudaSuccess;
    }
  const cudaError_t err =
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, threads, smem);
  if (err) return err;
  memo.occupancy.push_back({fn, dev, threads, smem, *per_sm});
  return cudaSuccess;
}

// How a shared-memory kernel is launched: blocks (0: it does not fit, use the fallback).
struct SmemLaunch {
  unsigned blocks;
  int threads;
  size_t smem;
};

template <typename K>
int plan_smem(K kernel, int threads, size_t smem, int64_t tiles, SmemLaunch* out) {
  out->blocks = 0;
  out->threads = threads;
  out->smem = smem;
  int dev = 0, optin = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (!err) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (!err) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err) return static_cast<int>(err);
  if (smem > static_cast<size_t>(optin)) return 0;
  err = kernel_smem(kernel, dev, threads, smem, &per_sm);
  if (err) return static_cast<int>(err);
  const int64_t most = int64_t(per_sm) * sms;
  out->blocks = static_cast<unsigned>(tiles < most ? tiles : most);
  return 0;
}

template <typename T, int HP>
size_t smem_bytes(const LstmOptLaunch& L) {
  return static_cast<size_t>(lstm_smem_layout(L.H, HP).total) * sizeof(T);
}

// The backward's workspace rows (and, for a bfloat16 state, the shadow rows after them),
// rounded up to 256 bytes; the weight-gradient partial sums follow.
int64_t ws_rows_bytes(const LstmOptLaunch& L) {
  const int64_t elem = L.dtype == DType::Float64 ? 8 : 4;
  const int64_t rows = lstm_opt_rows(L.H, L.n_in).total + lstm_opt_shadow_rows(L.H, L.state_bf16);
  const int64_t bytes = rows * L.N * elem;
  return (bytes + 255) / 256 * 256;
}

int64_t num_chunks(int64_t N) { return (N + kLstmOptCudaChunk - 1) / kLstmOptCudaChunk; }

// A PYMETA_LSTM_* switch: -1 unset or empty (the default applies), 0 when it starts with '0',
// else 1.
int env_switch(const char* name) {
  const char* env = std::getenv(name);
  if (!env || !env[0]) return -1;
  return env[0] == '0' ? 0 : 1;
}

// A PYMETA_LSTM_* number: `fallback` when unset, empty or not a number.
int env_int(const char* name, int fallback) {
  const char* env = std::getenv(name);
  if (!env || !env[0]) return fallback;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  return *end || v < INT_MIN || v > INT_MAX ? fallback : static_cast<int>(v);
}

}  // namespace

// Whether the backward asks for the tensor-core weight gradients (wgrad_mma_launch decides
// whether they apply).
static bool wgrad_mma_asked(const LstmOptLaunch& L) {
  return env_switch("PYMETA_LSTM_WG_MMA") != 0 && L.dtype == DType::Float32 && L.H <= 32;
}

int64_t lstm_opt_workspace_bytes_cuda(const LstmOptLaunch& L) {
  const int64_t elem = L.dtype == DType::Float64 ? 8 : 4;
  const int64_t mma_chunks = wgrad_mma_asked(L) ? lstm_wg_mma_plan(L.H, L.n_in, L.N, 0).chunks : 0;
  const int64_t chunks = num_chunks(L.N) > mma_chunks ? num_chunks(L.N) : mma_chunks;
  return ws_rows_bytes(L) + chunks * lstm_opt_pairs(L.H, L.n_in).off[3] * elem;
}

// The tensor-core weight gradients unless opted out (PYMETA_LSTM_WG_MMA=0) and where they apply
// (float, H <= 32, compute capability 8.0+, the two stage buffers fit): launches them and
// returns their chunk count, or -1 (the caller takes wgrad_kernel); a CUDA error as -2 - err.
static int64_t wgrad_mma_launch(const LstmOptLaunch& L, cudaStream_t stream) {
  if (!wgrad_mma_asked(L)) return -1;
  int dev = 0, major = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (!err) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (!err) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err) return -2 - int64_t(err);
  if (major < 8) return -1;
  const LstmWgMmaPlan p =
      lstm_wg_mma_plan(L.H, L.n_in, L.N, ws_rows_bytes(L) / int64_t(sizeof(float)));
  const int smem = lstm_wg_mma_smem_bytes(p);
  if (smem > optin) return -1;
  // 16-byte copies: every row start 16-byte aligned (the workspace is, from the allocator)
  const bool vec = L.N % 4 == 0 && reinterpret_cast<uintptr_t>(L.workspace) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(L.state) % 16 == 0;
  auto launch = [&](auto hb) {
    constexpr int HB = decltype(hb)::value;
    cudaError_t e = kernel_smem(wgrad_mma_kernel<HB>, dev, 32 * kLstmWgWarps, smem, nullptr);
    if (e) return e;
    wgrad_mma_kernel<HB><<<static_cast<unsigned>(p.chunks), 32 * kLstmWgWarps, smem, stream>>>(
        L, p, vec);
    return cudaGetLastError();
  };
  err = L.H <= 8    ? launch(std::integral_constant<int, 8>{})
        : L.H <= 16 ? launch(std::integral_constant<int, 16>{})
        : L.H <= 20 ? launch(std::integral_constant<int, 20>{})
        : L.H <= 24 ? launch(std::integral_constant<int, 24>{})
                    : launch(std::integral_constant<int, 32>{});
  return err ? -2 - int64_t(err) : p.chunks;
}

// The tensor-core forward's 32-bit element offsets (forward_mma_kernel / forward_mma_staged_kernel
// with kOff32), where the state has fewer than 2^31 elements: by default for a bfloat16 state
// at H <= 20 only. Measured on an H100 (H = 20, bench/RESULTS.md, runs 15-17): bfloat16, staged
// 0.532 vs 0.565 ms at N = 2M and 3.22 vs 3.34 at 10M, direct 3.21 vs 3.55 at 10M; float32,
// direct 0.358 vs 0.380 ms at 1M but 5-8% slower at 2M, 4M and 10M. Above H = 20 not timed,
// and the direct bf16 kernel at HB = 32 spills more with them (84 vs 24 B). PYMETA_LSTM_OFF32=0
// / 1 forces either width. (The default switch itself has not yet run on a GPU; the kernels have.)
static bool forward_off32(const LstmOptLaunch& L) {
  const int on = env_switch("PYMETA_LSTM_OFF32");
  return (on == 1 || (on < 0 && L.state_bf16 && L.H <= 20)) &&
         4 * int64_t(L.H) * L.N < (int64_t(1) << 31);
}

// The staged tensor-core forward where it fits: as many warps per block (one block per SM) as
// the shared memory holds two staging buffers for, at least 4. 16-byte copies when N and the
// pointers allow them (vec); else 4-byte copies, which a bfloat16 state can't use. The default
// (H100, bench/RESULTS.md):
// - for a bfloat16 state: free-running (runs 11 / 12: 0.273 / 0.277 vs 0.366 / 0.370 ms for
//   the direct kernel at N = 1M; run 19: its sync form lost, 1.35x at 1M, 1.08x at 10M, and
//   in groups of 8 warps 1.24x at 1M, 0.95x at 10M);
// - for a float32 state at H 17..20 with 64-bit offsets and vec, where every SM gets a block
//   step: the sync form in barrier groups of 4 warps (run 19: 3.29 vs 3.97 ms for the direct
//   kernel at 10M, 0.313 vs 0.386 at 1M; whole-block groups 3.50 / 0.350, groups of 8
//   3.38 / 0.327, of 2 3.35 / 0.312). The direct kernel stays the default elsewhere: the
//   free-running staged kernel took 3.89 vs 3.97 ms at 10M, and with fewer block steps than
//   SMs the staged kernel's 16-warp blocks fill half as many SMs as the direct kernel's 8-warp
//   ones (a CUDA graph of the whole-block sync form took 0.0150 ms at 10k, run 19; of the
//   direct kernel 0.0123, run 18).
// PYMETA_LSTM_MMA_STAGED=1 / 0 forces the staged kernel on / off (=1 alone: float32 at H 17..20
// gets the sync form). PYMETA_LSTM_SYNC=1 / 0 forces the sync form on / off where it is built
// (HB = 20: float32 with 64-bit offsets, bfloat16 with 32-bit ones; =0 with float32 leaves the
// direct kernel unless PYMETA_LSTM_MMA_STAGED=1); PYMETA_LSTM_SYNC_WARPS=k (2 .. warps) sets
// its barrier groups (default 4).
// A blocked state (L.blocked, HB = 20 only) takes the free-running staged kernel by default
// where 16-byte copies apply (aligned pointers, any N) and every SM gets a block step (H100,
// run 20, bench/RESULTS.md: float32 3.10 vs 3.25 ms for the blocked direct kernel at 10M,
// 0.302 vs 0.329 at 1M; bfloat16 2.46 vs 2.65 and 0.241 vs 0.275; the sync form gained
// nothing, 3.24 and 0.330);
// PYMETA_LSTM_BLK_STAGED=1 / 0 forces it on / off, PYMETA_LSTM_SYNC=1 its float32 sync form.
// Returns -1 when not applicable.
template <int HB>
static int staged_launch(const LstmOptLaunch& L, const Params<float>& P, cudaStream_t stream) {
  using S = LstmMmaShape<HB>;
  const int64_t elems = L.state_bf16 ? 8 : 4;  // state elements per 16 bytes
  // (blocked: every step's state is one aligned run, and the grad's last chunk a partial copy)
  const bool vec = (L.blocked || L.N % elems == 0) &&
                   reinterpret_cast<uintptr_t>(L.grad) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(L.state) % 16 == 0;
  const bool off32 = !L.blocked && forward_off32(L);  // the stores' offsets
  const int sync_on = env_switch("PYMETA_LSTM_SYNC");
  const bool has_sync = HB == 20 && (L.blocked ? !L.state_bf16 : (L.state_bf16 ? off32 : !off32));
  const bool sync = has_sync && (sync_on == 1 || (sync_on < 0 && !L.state_bf16 && !L.blocked));
  const int on = env_switch(L.blocked ? "PYMETA_LSTM_BLK_STAGED" : "PYMETA_LSTM_MMA_STAGED");
  if (L.blocked && (HB != 20 || on == 0 || (on < 0 && !vec))) return -1;
  // feature-major float32 takes the staged kernel for its sync form only: by default with
  // 16-byte copies and at least a block step per SM, whatever the copies and N with
  // PYMETA_LSTM_SYNC=1
  if (on == 0 || (on < 0 && !L.blocked && !L.state_bf16 && !(sync && (vec || sync_on == 1))))
    return -1;
  const bool by_default = on < 0 && (L.blocked || (sync_on < 0 && !L.state_bf16));
  if (!vec && L.state_bf16) return -1;
  const int buf = L.state_bf16 ? lstm_mma_buf_bytes<uint16_t>(L.H) : lstm_mma_buf_bytes<float>(L.H);
  int dev = 0, optin = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (!err) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (!err) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err) return static_cast<int>(err);
  const int64_t weights = int64_t(sizeof(float)) * S::kTotal;
  int warps = static_cast<int>((optin - weights) / (2 * buf));
  if (warps > S::kStagedThreads / 32) warps = S::kStagedThreads / 32;
  if (warps < 4) return -1;
  const int64_t per_block = int64_t(warps) * S::kCoords;
  const int64_t tiles = (L.N + per_block - 1) / per_block;
  if (by_default && tiles < sms) return -1;  // fewer block steps than SMs: the direct kernel
  const size_t smem = static_cast<size_t>(weights + int64_t(2) * warps * buf);
  auto kernel = L.state_bf16 ? (off32 ? forward_mma_staged_kernel<HB, uint16_t, true>
                                      : forward_mma_staged_kernel<HB, uint16_t>)
                             : (off32 ? forward_mma_staged_kernel<HB, float, true>
                                      : forward_mma_staged_kernel<HB, float>);
  int sync_warps = warps;  // (>= 2: named barriers 1 .. 8, at most 8 groups)
  if constexpr (HB == 20) {
    if (L.blocked)
      kernel = L.state_bf16 ? forward_mma_staged_kernel<20, uint16_t, false, true>
                            : forward_mma_staged_kernel<20, float, false, true>;
    if (sync) {
      kernel = L.blocked      ? forward_mma_staged_sync_kernel<20, float, false, true>
               : L.state_bf16 ? forward_mma_staged_sync_kernel<20, uint16_t, true>
                              : forward_mma_staged_sync_kernel<20, float>;
      sync_warps = env_int("PYMETA_LSTM_SYNC_WARPS", 4);
      sync_warps = sync_warps < 2 ? 2 : sync_warps > warps ? warps : sync_warps;
    }
  }
  err = kernel_smem(kernel, dev, 32 * warps, smem, &per_sm);
  if (err) return static_cast<int>(err);
  if (per_sm < 1) return -1;
  const unsigned blocks = static_cast<unsigned>(tiles < sms ? tiles : sms);
  kernel<<<blocks, 32 * warps, smem, stream>>>(L, P, buf, vec, sync_warps);
  return static_cast<int>(cudaGetLastError());
}

// The tensor-core kernels (lstm_optimizer_mma.cuh) when they apply: float, H <= 32, a GPU of
// compute capability 8.0+ (the forward also with a bfloat16 state); the forward unless
// PYMETA_LSTM_MMA=0, the backward only with
// PYMETA_LSTM_MMA_BWD=1 (see backward_mma_kernel). Returns -1 when not applicable (the caller
// takes the CUDA-core kernels).
// A blocked state (L.blocked, the forward only) takes them at H 17..20 and 25..32 (HB = 20
// and 32), each warp step reading and writing one contiguous run of 64 H elements: the
// staged kernel where staged_launch takes it (H 17..20), else the direct one; -1 elsewhere.
static int mma_launch(const LstmOptLaunch& L, cudaStream_t stream, bool backward) {
  if (L.dtype != DType::Float32 || L.H > 32) return -1;
  if (L.blocked && (backward || L.H <= 16 || (L.H > 20 && L.H <= 24))) return -1;
  if (backward && L.state_bf16) return -1;  // (the tensor-core pass reads float32 only)
  const int on = env_switch(backward ? "PYMETA_LSTM_MMA_BWD" : "PYMETA_LSTM_MMA");
  if (backward ? on != 1 : on == 0) return -1;
  int dev = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (!err) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err) return static_cast<int>(err);
  if (major < 8) return -1;
  auto launch = [&](auto hb) {
    constexpr int HB = decltype(hb)::value;
    using S = LstmMmaShape<HB>;
    const Params<float> P = params_of<float>(L);
    if (!backward) {
      const int e = staged_launch<HB>(L, P, stream);
      if (e >= 0) return e;
    }
    const int threads = backward ? kMmaBwdThreads : S::kThreads;
    const int64_t per_block = int64_t(threads / 32) * S::kCoords;
    const int64_t tiles = (L.N + per_block - 1) / per_block;
    SmemLaunch s{};
    const size_t bytes = sizeof(float) * (backward ? S::kTotalBwd : S::kTotal);
    const bool off32 = forward_off32(L);
    auto fwd = L.state_bf16 ? (off32 ? forward_mma_kernel<HB, uint16_t, true>
                                     : forward_mma_kernel<HB, uint16_t>)
                            : (off32 ? forward_mma_kernel<HB, float, true>
                                     : forward_mma_kernel<HB, float>);
    if constexpr (HB == 20 || HB == 32) {
      if (L.blocked)
        fwd = L.state_bf16 ? forward_mma_kernel<HB, uint16_t, false, true>
                           : forward_mma_kernel<HB, float, false, true>;
    }
    int e = backward ? plan_smem(backward_mma_kernel<HB>, threads, bytes, tiles, &s)
                     : plan_smem(fwd, threads, bytes, tiles, &s);
    if (e) return e;
    if (s.blocks == 0) return -1;
    if (backward)
      backward_mma_kernel<HB><<<s.blocks, s.threads, s.smem, stream>>>(L, P);
    else
      fwd<<<s.blocks, s.threads, s.smem, stream>>>(L, P);
    return static_cast<int>(cudaGetLastError());
  };
  if (L.H <= 8) return launch(std::integral_constant<int, 8>{});
  if (L.H <= 16) return launch(std::integral_constant<int, 16>{});
  if (L.H <= 20) return launch(std::integral_constant<int, 20>{});
  if (L.H <= 24) return launch(std::integral_constant<int, 24>{});
  return launch(std::integral_constant<int, 32>{});
}

int lstm_opt_forward_cuda(const LstmOptLaunch& L, CUstream_st* stream) {
  if (L.N == 0) return 0;
  const int mma = mma_launch(L, stream, false);
  if (mma >= 0) return mma;
  if (L.blocked) return kLstmOptNoKernel;  // only the tensor-core kernels read it
  if (L.state_bf16) return kLstmOptNoKernel;  // only the tensor-core kernel reads bfloat16
  return dispatch(L, [&](auto tag, auto hp) {
    using T = decltype(tag);
    constexpr int HP = decltype(hp)::value;
    const Params<T> P = params_of<T>(L);
    constexpr int threads = smem_threads<HP>();
    constexpr int C = fwd_coords<T, HP>();
    const int64_t tiles = (L.N + int64_t(threads) * C - 1) / (int64_t(threads) * C);
    SmemLaunch s{};
    int err = 0;
    // double at HP = 64 needs 402 KB of shared memory: no GPU has it
    if constexpr (!(std::is_same<T, double>::value && HP > 32)) {
      err = plan_smem(forward_smem_kernel<T, HP>, threads, smem_bytes<T, HP>(L), tiles, &s);
      if (err) return err;
    }
    if (s.blocks > 0) {
      if constexpr (!(std::is_same<T, double>::value && HP > 32))
        forward_smem_kernel<T, HP><<<s.blocks, s.threads, s.smem, stream>>>(L, P);
    } else {
      const unsigned blocks = static_cast<unsigned>((L.N + kThreads - 1) / kThreads);
      forward_kernel<T, 64><<<blocks, kThreads, 0, stream>>>(L, P);
    }
    return static_cast<int>(cudaGetLastError());
  });
}

// A bfloat16 state's backward reads it directly (backward_smem_bf16_kernel) where the float
// weights fit in shared memory (lstm_smem_layout: at H > 53 not on an A100's 163 KB, at H > 32
// not on sm_86 / sm_89's 99 KB) and the workspace, shadow rows included (1052 B per coordinate
// at H = 20, against 812 for a float32 state), takes at most PYMETA_LSTM_BF16_DIRECT_MB MiB
// (1024 by default: N up to ~1M at H = 20). Above that the front's chunks bound the call's
// extra memory (~230 MB at H = 20, whatever N), for more time (copies and launches per chunk;
// never timed on their own).
bool lstm_opt_backward_reads_bf16_cuda(const LstmOptLaunch& L) {
  if (!L.state_bf16 || L.dtype != DType::Float32) return false;
  const int64_t mb = env_int("PYMETA_LSTM_BF16_DIRECT_MB", 1024);
  if (ws_rows_bytes(L) > mb * (int64_t(1) << 20)) return false;
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) || cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev))
    return false;  // (the chunk path's launches report the error)
  const int HP = L.H <= 16 ? 16 : L.H <= 20 ? 20 : L.H <= 24 ? 24 : L.H <= 32 ? 32 : 64;
  return int64_t(lstm_smem_layout(L.H, HP).total) * int64_t(sizeof(float)) <= optin;
}

int lstm_opt_backward_cuda(const LstmOptLaunch& L, CUstream_st* stream) {
  if (L.N == 0) return 0;
  if (L.state_bf16 && !lstm_opt_backward_reads_bf16_cuda(L)) return kLstmOptNoKernel;
  return dispatch(L, [&](auto tag, auto hp) {
    using T = decltype(tag);
    constexpr int HP = decltype(hp)::value;
    const Params<T> P = params_of<T>(L);
    constexpr int threads = smem_threads<HP>();
    const int64_t tiles = (L.N + threads - 1) / threads;
    // The per-coordinate pass: the tensor-core kernel when asked for, else the CUDA-core
    // shared-memory kernel, else (double at HP = 64 needs 402 KB of shared memory: no GPU
    // has it) the fallback.
    int err = mma_launch(L, stream, true);
    if (err > 0) return err;
    // The weight-gradient kernels read h1_prev / h2_prev as float rows of N at Lw.state: the
    // state's own rows, or a bfloat16 state's shadow rows, which the pass writes.
    LstmOptLaunch Lw = L;
    if (L.state_bf16) {
      // bfloat16 state (float32 math): the CUDA-core pass reads and writes it directly
      // (backward_smem_bf16_kernel; the OFF32 / AHEAD / WIDE switches don't apply);
      // kLstmOptNoKernel, before any launch, where its shared memory does not fit (the front
      // then converts in chunks).
      if constexpr (!std::is_same<T, float>::value) {
        return kLstmOptNoKernel;
      } else {
        auto kernel = backward_smem_bf16_kernel<HP>;
        SmemLaunch s{};
        err = plan_smem(kernel, threads, smem_bytes<T, HP>(L), tiles, &s);
        if (err) return err;
        if (s.blocks == 0) return kLstmOptNoKernel;
        kernel<<<s.blocks, s.threads, s.smem, stream>>>(L, P);
        Lw.state = static_cast<const float*>(L.workspace) +
                   int64_t(lstm_opt_rows(L.H, L.n_in).total) * L.N;
      }
    } else if (err < 0) {
      err = 0;
      SmemLaunch s{};
      if constexpr (!(std::is_same<T, double>::value && HP > 32)) {
        const int on = env_switch("PYMETA_LSTM_BWD_AHEAD");
        const bool ahead = on < 0 ? std::is_same<T, float>::value && HP <= 20 : on == 1;
        auto kernel = backward_smem_kernel<T, HP>;
        if constexpr (HP <= 32)  // (no ahead form at HP = 64: it would spill)
          if (ahead) kernel = backward_smem_ahead_kernel<T, HP>;
        // PYMETA_LSTM_OFF32=1: 32-bit offsets, opt-in (H100, twelfth session: 1.958 vs 1.949
        // ms at 1M, 0.441 vs 0.438 at 200k, for 10% fewer instructions: not issue-bound)
        if constexpr (std::is_same<T, float>::value) {
          const int64_t rows = lstm_opt_rows(L.H, L.n_in).total;
          if (env_switch("PYMETA_LSTM_OFF32") == 1 && rows * L.N < (int64_t(1) << 31)) {
            kernel = backward_smem_kernel<T, HP, true>;
            if constexpr (HP <= 32)
              if (ahead) kernel = backward_smem_ahead_kernel<T, HP, true>;
          }
        }
        // (the wide form has no 32-bit variant: PYMETA_LSTM_BWD_WIDE=1 wins over OFF32)
        if constexpr (std::is_same<T, float>::value && HP <= 20)
          if (env_switch("PYMETA_LSTM_BWD_WIDE") == 1) kernel = backward_smem_wide_kernel<T, HP>;
        err = plan_smem(kernel, threads, smem_bytes<T, HP>(L), tiles, &s);
        if (err) return err;
        if (s.blocks > 0) kernel<<<s.blocks, s.threads, s.smem, stream>>>(L, P);
      }
      if (s.blocks == 0) {
        const unsigned blocks = static_cast<unsigned>((L.N + kThreads - 1) / kThreads);
        backward_kernel<T, 64><<<blocks, kThreads, 0, stream>>>(L, P);
      }
    }
    err = static_cast<int>(cudaGetLastError());
    if (err) return err;

    // The weight-gradient partial sums per chunk: the tensor-core kernel where it applies, else
    // the CUDA-core tiles.
    int64_t chunks = -1;
    if constexpr (std::is_same<T, float>::value) chunks = wgrad_mma_launch(Lw, stream);
    if (chunks < -1) return static_cast<int>(-2 - chunks);
    const LstmWgradPlan p = lstm_wgrad_plan(L.H, L.n_in, L.N, kLstmOptCudaChunk,
                                            ws_rows_bytes(L) / static_cast<int64_t>(sizeof(T)));
    if (chunks < 0) {
      chunks = p.chunks;
      wgrad_kernel<T><<<dim3(p.tile_start[3], static_cast<unsigned>(p.chunks)), kLstmWgThreads,
                        0, stream>>>(Lw, p);
      err = static_cast<int>(cudaGetLastError());
      if (err) return err;
    }

    const LstmFinishPlan f = lstm_finish_plan(L.H, L.n_in, p.partial_offset, chunks);
    const unsigned fblocks = static_cast<unsigned>((f.seg_start[10] + 31) / 32);
    finish_kernel<T><<<fblocks, 32 * kLstmFinishGroups, 0, stream>>>(L, f);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace pymeta
