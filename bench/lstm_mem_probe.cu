// The LSTM optimizer step's memory traffic without its math: how fast can a kernel with the
// tensor-core forward's access pattern move the step's bytes, and what does one DRAM round trip
// per warp step cost once a fixed amount of arithmetic sits between the loads and the stores?
// Standalone (no torch): nvcc -O3 -std=c++17 -arch=sm_90 bench/lstm_mem_probe.cu -o probe
//   ./probe [N=10000000] [reps=15] [warps per SM=16]   (N a multiple of 16)
// bench/gpu_check.sh builds and runs it (a few seconds). bench/NOTES_lstm.md says what it is for.
//
// Every variant moves the forward's bytes for H = 20, float32: grad (N) and the state (80 rows
// of N) in, update (N) and new_state out: 648 B per coordinate. The stored values are the
// loaded ones plus 0 * (the synthetic arithmetic), so each variant is checked to be an exact
// copy before it is timed.
//   copy      grid-stride float4 copy of the same bytes (the floor)
//   fm16      the direct forward's pattern (forward_mma_kernel): a warp step is 16 coordinates;
//             lane (g, t) loads state rows 4p + t, p < 20, at columns g and g + 8, every load of
//             the step issued before the first use, then the arithmetic, then the stores
//   fm16pf    the same with the next step's loads issued before this step's arithmetic
//             (registers double-buffered: the round trip overlaps the arithmetic)
//   fm16sync  the same, the block's warps held to one step at a time (a barrier per step)
//   fm32      32 coordinates per warp step (128 B per state row and step instead of 64 B)
//   staged    the staged forward's pattern (forward_mma_staged_kernel): 16-byte cp.async of
//             the next step into a per-warp shared-memory buffer while this step computes
//   stagedsync  the same, with a barrier per step as in fm16sync
//   blk16     a blocked layout [N / 16][80][16]: a warp step's state is one contiguous 5 KB
//   thr32     one thread per coordinate (the CUDA-core kernels', and the backward pass's, pattern:
//             128-byte pieces of each row per warp); thr32sync: a barrier per block round
// The synthetic arithmetic per warp step: K rounds of 8 independent FMA chains (K = 210 is about
// the direct forward's 2298 instructions per warp step at H = 20), and optionally a __nanosleep
// after the first use of the loads (the warp busy without issuing: the real kernel issues at
// ~0.43 per cycle per scheduler, latency-bound, where the FMA chains alone issue at ~1).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CK(x)                                                                      \
  do {                                                                             \
    cudaError_t e_ = (x);                                                          \
    if (e_ != cudaSuccess) {                                                       \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

constexpr int kH = 20, kRows = 4 * kH;  // state rows (h1, c1, h2, c2)

struct Args {
  const float* grad;
  const float* state;
  float* update;
  float* out;
  long long N;
  int K;
  float zero;  // 0: the stores are exact copies, yet depend on the arithmetic
  unsigned sleep_ns;  // per step, after the first use: the warp busy without issuing
};

enum Layout { kFM = 0, kBLK = 1 };
__device__ __forceinline__ long long at(int layout, int row, long long n, long long N) {
  return layout == kFM ? row * N + n : (n >> 4) * (kRows * 16) + row * 16 + (n & 15);
}

// The synthetic arithmetic: every loaded value is used first (as the step's first products
// use the state), then K rounds of 8 independent chains.
template <int V>
__device__ __forceinline__ void work(const float (&v)[V], float (&acc)[8], const Args& a) {
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i & 7] += v[i];
  if (a.sleep_ns) __nanosleep(a.sleep_ns);
  for (int k = 0; k < a.K; ++k) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = fmaf(acc[j], 0.999f, 1e-3f);
  }
}

// A warp step of 16 MT coordinates from `base`: lane (g, t) holds rows 4p + t at columns
// 16 mt + g + 8 h (past N: a copy of coordinate N - 1, never stored).
template <int MT, int layout>
struct Step {
  static constexpr int V = MT * 2 * (kH + 1);  // per (mt, h): the grad, then kH state rows
  float v[V];
  __device__ __forceinline__ void load(const Args& a, long long base, int g, int t) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        long long n = base + 16 * mt + g + 8 * h;
        n = n < a.N ? n : a.N - 1;
        float* w = v + (2 * mt + h) * (kH + 1);
        w[0] = a.grad[n];
#pragma unroll
        for (int p = 0; p < kH; ++p) w[1 + p] = a.state[at(layout, 4 * p + t, n, a.N)];
      }
  }
  __device__ __forceinline__ void store(const Args& a, long long base, int g, int t,
                                        const float (&acc)[8]) const {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const long long n = base + 16 * mt + g + 8 * h;
        if (n >= a.N) continue;
        const float* w = v + (2 * mt + h) * (kH + 1);
        if (t == h) a.update[n] = w[0] + a.zero * acc[0];
#pragma unroll
        for (int p = 0; p < kH; ++p)
          a.out[at(layout, 4 * p + t, n, a.N)] = w[1 + p] + a.zero * acc[(p + 1) & 7];
      }
  }
};

// The direct patterns. Persistent warps: warp w takes steps w, w + W, ... as the real kernel
// does. kPlain: fm16, fm32, blk16; kPrefetch: fm16pf; kSync: fm16sync, the block's 8 warps held
// together by a barrier per step, so that their loads of one step (128 coordinates: 512 B of
// each state row) reach the memory system together.
enum Mode { kPlain = 0, kPrefetch = 1, kSync = 2 };
template <int MT, int layout, int mode>
__global__ void __launch_bounds__(256, 2) direct_kernel(Args a) {  // 16 warps per SM, as the real
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, warp = threadIdx.x >> 5;
  const long long W = (long long)gridDim.x * (blockDim.x >> 5);
  const long long stride = 16LL * MT * W;
  long long base = 16LL * MT * ((long long)blockIdx.x * (blockDim.x >> 5) + warp);
  Step<MT, layout> cur;
  float acc[8];
  if constexpr (mode == kSync) {  // a block-uniform trip count: every warp meets every barrier
    for (long long bb = base - 16LL * MT * warp; bb < a.N; bb += stride, base += stride) {
      if (base < a.N) {
        cur.load(a, base, g, t);
        work(cur.v, acc, a);
        cur.store(a, base, g, t, acc);
      }
      __syncthreads();
    }
    return;
  }
  if (base >= a.N) return;
  if constexpr (mode == kPrefetch) {
    cur.load(a, base, g, t);
    for (; base < a.N; base += stride) {
      Step<MT, layout> nxt;
      if (base + stride < a.N) nxt.load(a, base + stride, g, t);
      work(cur.v, acc, a);
      cur.store(a, base, g, t, acc);
      cur = nxt;
    }
  } else {
    for (; base < a.N; base += stride) {
      cur.load(a, base, g, t);
      work(cur.v, acc, a);
      cur.store(a, base, g, t, acc);
    }
  }
}

// One thread per coordinate (the CUDA-core kernels' and the backward pass's pattern): a warp
// loads each row as one 128-byte piece (32 adjacent coordinates). thr32: free-running;
// thr32sync: a barrier per round of the block's 256 coordinates.
template <bool kSync>
__global__ void __launch_bounds__(256, 2) thread_kernel(Args a) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long b0 = (long long)blockIdx.x * blockDim.x; b0 < a.N; b0 += stride) {
    const long long n = b0 + threadIdx.x;  // (b0: the same for the whole block)
    if (n < a.N) {
      float v[kRows + 1], acc[8];
      v[0] = a.grad[n];
#pragma unroll
      for (int r = 0; r < kRows; ++r) v[1 + r] = a.state[r * a.N + n];
      work(v, acc, a);
      a.update[n] = v[0] + a.zero * acc[0];
#pragma unroll
      for (int r = 0; r < kRows; ++r) a.out[r * a.N + n] = v[1 + r] + a.zero * acc[(r + 1) & 7];
    }
    if (kSync) __syncthreads();
  }
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes)
               : "memory");
}

// The staged pattern: per warp two buffers of 16 grads + 80 rows x 16 floats (row halves
// swizzled as the real kernel does); N a multiple of 4.
constexpr int kBufFloats = 16 + kRows * 16;
__device__ __forceinline__ int buf_index(int row, int col) {
  return 16 + row * 16 + (col ^ ((row & 2) << 2));
}

__device__ __forceinline__ void stage(float* buf, const Args& a, long long base, int lane) {
  const long long gn = base + 4 * lane;
  if (lane < 4) cp_async16(buf + 4 * lane, a.grad + (gn < a.N ? gn : 0), gn < a.N ? 16 : 0);
  const int col = 4 * (lane & 3);
  const bool ok = base + col < a.N;
  for (int row = lane >> 2; row < kRows; row += 8)
    cp_async16(buf + buf_index(row, col), a.state + (ok ? row * a.N + base + col : 0), ok ? 16 : 0);
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <bool kSync>  // kSync: stagedsync, a barrier per step as in fm16sync
__global__ void __launch_bounds__(512, 1) staged_kernel(Args a) {  // one 16-warp block per SM
  extern __shared__ __align__(16) float smem[];
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, warp = threadIdx.x >> 5;
  float* bufs = smem + 2 * kBufFloats * warp;
  const long long W = (long long)gridDim.x * (blockDim.x >> 5), stride = 16 * W;
  long long base = 16 * ((long long)blockIdx.x * (blockDim.x >> 5) + warp);
  const long long first = base - 16 * warp;  // the block's first step (block-uniform)
  if (!kSync && base >= a.N) return;
  if (base < a.N) stage(bufs, a, base, lane);
  for (long long bb = first, k = 0; (kSync ? bb : base) < a.N;
       bb += stride, base += stride, k ^= 1) {
    if (base < a.N) {
      if (base + stride < a.N) stage(bufs + (k ^ 1) * kBufFloats, a, base + stride, lane);
      else asm volatile("cp.async.commit_group;\n" ::: "memory");
      asm volatile("cp.async.wait_group 1;\n" ::: "memory");
      __syncwarp();
      const float* b = bufs + k * kBufFloats;
      Step<1, kFM> cur;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float* w = cur.v + h * (kH + 1);
        w[0] = b[g + 8 * h];
#pragma unroll
        for (int p = 0; p < kH; ++p) w[1 + p] = b[buf_index(4 * p + t, g + 8 * h)];
      }
      float acc[8];
      work(cur.v, acc, a);
      cur.store(a, base, g, t, acc);
      __syncwarp();
    }
    if (kSync) __syncthreads();
  }
}

__global__ void copy_kernel(const float4* __restrict__ s, float4* __restrict__ d, long long n4,
                            const float4* __restrict__ gs, float4* __restrict__ gd, long long g4) {
  const long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long step = (long long)gridDim.x * blockDim.x;
  for (long long i = i0; i < n4; i += step) d[i] = s[i];
  for (long long i = i0; i < g4; i += step) gd[i] = gs[i];
}

struct Buffers {
  float *grad, *state, *update, *out;
};

// Fills the state and grad of the first n coordinates (and the blocked layout's slack past
// them; the grad with values no state element has) and sets the outputs there to NaN.
static size_t extent(long long n) { return size_t(kRows) * n + 16 * kRows; }
static void fill(const Buffers& b, long long n) {
  std::vector<float> h(extent(n));
  for (size_t i = 0; i < h.size(); ++i)
    h[i] = float(int((i * 2654435761u) % 20011u) - 10005) * 1e-3f;
  CK(cudaMemcpy(b.state, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  for (long long i = 0; i < n; ++i) h[i] += 100.0f;
  CK(cudaMemcpy(b.grad, h.data(), n * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(b.out, 0xff, h.size() * 4));
  CK(cudaMemset(b.update, 0xff, n * 4));
}

struct Variant {
  const char* name;
  const void* fn;  // the kernel (occupancy); nullptr: the copy
  int layout;      // where the check reads the state
  void (*launch)(const Args&, int blocks, int threads, size_t smem);
  int threads;     // per block
  size_t smem_per_warp;
};

template <int MT, int layout, int kPf>
static void launch_direct(const Args& a, int blocks, int threads, size_t) {
  direct_kernel<MT, layout, kPf><<<blocks, threads>>>(a);
}
template <bool kSync>
static void launch_thread(const Args& a, int blocks, int threads, size_t) {
  thread_kernel<kSync><<<blocks, threads>>>(a);
}
template <bool kSync>
static void launch_staged(const Args& a, int blocks, int threads, size_t smem) {
  staged_kernel<kSync><<<blocks, threads, smem>>>(a);
}
static void launch_copy(const Args& a, int blocks, int threads, size_t) {
  copy_kernel<<<blocks, threads>>>(
      reinterpret_cast<const float4*>(a.state), reinterpret_cast<float4*>(a.out), kRows * a.N / 4,
      reinterpret_cast<const float4*>(a.grad), reinterpret_cast<float4*>(a.update), a.N / 4);
}

// Blocks per SM for a variant: as many as fit (registers, shared memory), at most what
// `warps_per_sm` asks for; the copy: 8 blocks of 256.
static int blocks_per_sm(const Variant& v, int warps_per_sm) {
  if (!v.fn) return 8;
  int per_sm = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, v.fn, v.threads,
                                                   v.smem_per_warp * (v.threads / 32)));
  return std::max(1, std::min(per_sm, warps_per_sm / (v.threads / 32)));
}

static bool check(const Variant& v, const Buffers& b, long long N, int K) {
  fill(b, N);
  Args a{b.grad, b.state, b.update, b.out, N, K, 0.0f, K ? 200u : 0u};
  v.launch(a, 8, v.threads, v.smem_per_warp * (v.threads / 32));  // 8 blocks: many steps each
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  std::vector<float> s(extent(N)), o(s.size()), g(N), u(N);
  CK(cudaMemcpy(s.data(), b.state, s.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(o.data(), b.out, o.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(g.data(), b.grad, N * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(u.data(), b.update, N * 4, cudaMemcpyDeviceToHost));
  long long bad = 0;
  for (long long n = 0; n < N; ++n) {
    bad += u[n] != g[n];
    for (int r = 0; r < kRows; ++r) {
      const long long i = v.layout == kFM ? r * N + n : (n >> 4) * (kRows * 16) + r * 16 + (n & 15);
      bad += o[i] != s[i];
    }
  }
  if (bad) std::printf("CHECK FAILED %s N=%lld K=%d: %lld wrong values (not timed)\n", v.name, N, K, bad);
  return bad == 0;
}

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);  // each line reaches the log even if a timeout kills us
  const long long N = argc > 1 ? std::atoll(argv[1]) : 10000000LL;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 15;
  const int warps_per_sm = argc > 3 ? std::atoi(argv[3]) : 16;
  if (N < 16 || N % 16 || reps < 1 || warps_per_sm < 16 || warps_per_sm % 16) {
    std::fprintf(stderr, "usage: probe [N: a multiple of 16] [reps >= 1] [warps per SM: a multiple of 16]\n");
    return 2;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const size_t staged_smem = 2 * kBufFloats * 4;  // per warp
  // (a GPU with less shared memory per block than 16 warps' buffers: the staged variants fail
  // their check and are left out)
  const auto max_smem = cudaFuncAttributeMaxDynamicSharedMemorySize;
  const bool staged_fits =
      cudaFuncSetAttribute(staged_kernel<false>, max_smem, int(16 * staged_smem)) == cudaSuccess &&
      cudaFuncSetAttribute(staged_kernel<true>, max_smem, int(16 * staged_smem)) == cudaSuccess;
  cudaGetLastError();
  std::printf("%s, %d SMs, N = %lld, H = %d float32, up to %d warps per SM; ms per launch "
              "(median of %d) at K rounds of synthetic math per warp step\n", prop.name,
              prop.multiProcessorCount, N, kH, warps_per_sm, reps);

  const Variant variants[] = {
      {"copy", nullptr, kFM, launch_copy, 256, 0},
      {"fm16", (const void*)direct_kernel<1, kFM, kPlain>, kFM, launch_direct<1, kFM, kPlain>, 256, 0},
      {"fm16pf", (const void*)direct_kernel<1, kFM, kPrefetch>, kFM, launch_direct<1, kFM, kPrefetch>, 256, 0},
      {"fm16sync", (const void*)direct_kernel<1, kFM, kSync>, kFM, launch_direct<1, kFM, kSync>, 256, 0},
      {"fm32", (const void*)direct_kernel<2, kFM, kPlain>, kFM, launch_direct<2, kFM, kPlain>, 256, 0},
      {"staged", (const void*)staged_kernel<false>, kFM, launch_staged<false>, 512, staged_smem},
      {"stagedsync", (const void*)staged_kernel<true>, kFM, launch_staged<true>, 512, staged_smem},
      {"blk16", (const void*)direct_kernel<1, kBLK, kPlain>, kBLK, launch_direct<1, kBLK, kPlain>, 256, 0},
      {"thr32", (const void*)thread_kernel<false>, kFM, launch_thread<false>, 256, 0},
      {"thr32sync", (const void*)thread_kernel<true>, kFM, launch_thread<true>, 256, 0},
  };
  constexpr int nv = sizeof(variants) / sizeof(variants[0]);

  Buffers b{};
  CK(cudaMalloc(&b.grad, N * 4));
  CK(cudaMalloc(&b.update, N * 4));
  CK(cudaMalloc(&b.state, extent(N) * 4));
  CK(cudaMalloc(&b.out, extent(N) * 4));

  // correctness first, on short N: 16000, and 320004 (a partial last step; 320000 for the copy)
  bool ok[nv];
  for (int i = 0; i < nv; ++i) {
    ok[i] = staged_fits || !variants[i].smem_per_warp;
    if (!ok[i]) {
      std::printf("%s left out: 16 warps' staging buffers exceed this GPU's shared memory\n", variants[i].name);
      continue;
    }
    for (long long n : {16LL * 1000, 16LL * 20000 + (variants[i].fn ? 4 : 0)})
      for (int K : {0, 3}) ok[i] = check(variants[i], b, n, K) && ok[i];
  }
  std::printf("checks: %s\n", std::all_of(ok, ok + nv, [](bool x) { return x; })
                                  ? "every variant copies exactly" : "FAILED (see above)");
  CK(cudaMemset(b.state, 0, extent(N) * 4));
  CK(cudaMemset(b.grad, 0, N * 4));

  const double bytes = 648.0 * N;
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  auto median_ms = [&](auto&& launch) {
    std::vector<float> ms;
    for (int r = 0; r < reps + 2; ++r) {
      CK(cudaEventRecord(e0));
      launch();
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float x;
      CK(cudaEventElapsedTime(&x, e0, e1));
      if (r >= 2) ms.push_back(x);
    }
    CK(cudaGetLastError());
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  };
  const float mc = median_ms([&] {  // cudaMemcpy of the same bytes, for scale
    CK(cudaMemcpyAsync(b.out, b.state, size_t(kRows) * N * 4, cudaMemcpyDeviceToDevice));
    CK(cudaMemcpyAsync(b.update, b.grad, N * 4, cudaMemcpyDeviceToDevice));
  });
  std::printf("cudaMemcpy of the same bytes: %.3f ms (%.2f TB/s)\n", mc, bytes / (mc * 1e-3) / 1e12);
  // (K, sleep): none; K = 210 rounds of 8 FMA chains, about the real kernel's 2298 instructions
  // per warp step (35 instructions per 4 rounds + ~430 for the loads, stores and addresses);
  // the same plus 4 or 8 us of __nanosleep per step, the warp busy without issuing, as the
  // real kernel is at ~0.43 instructions per cycle per scheduler (its ~21.6k cycles per step)
  const int Ks[] = {0, 210, 210, 210};
  const unsigned sleeps[] = {0, 0, 4000, 8000};
  std::printf("%-10s %5s %4s | %8s %6s | %8s %8s %8s   (ms: K = 210; + 4 us, + 8 us asleep per step)\n",
              "variant", "warps", "regs", "none ms", "TB/s", "K=210", "+4us", "+8us");
  for (int i = 0; i < nv; ++i) {
    const Variant& v = variants[i];
    if (!ok[i]) continue;
    const int per_sm = blocks_per_sm(v, warps_per_sm);
    const int nblocks = prop.multiProcessorCount * per_sm;
    const size_t smem = v.smem_per_warp * (v.threads / 32);
    int regs = 0;
    if (v.fn) {
      cudaFuncAttributes fa;
      CK(cudaFuncGetAttributes(&fa, v.fn));
      regs = fa.numRegs;
    }
    std::printf("%-10s %5d %4d |", v.name, per_sm * v.threads / 32, regs);
    for (int c = 0; c < 4; ++c) {
      if (!v.fn && c) continue;
      const Args a{b.grad, b.state, b.update, b.out, N, Ks[c], 0.0f, sleeps[c]};
      const float ms = median_ms([&] { v.launch(a, nblocks, v.threads, smem); });
      if (c == 0) std::printf(" %8.3f %6.2f |", ms, bytes / (ms * 1e-3) / 1e12);
      else std::printf(" %8.3f", ms);
    }
    std::printf("\n");
  }
  return 0;
}
