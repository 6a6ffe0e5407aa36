// The tensor-core forward of lstm_optimizer_step (float32, H <= 32, sm_80+): per warp, the
// gate pre-activations of 16 coordinates are matrix products on mma.sync m16n8k8 TF32 tiles,
//   Z1[16, 4H] = h1_prev[16, H] W_hh1^T            (+ b1 + x W_ih1^T, in fp32 on CUDA cores)
//   Z2[16, 4H] = h1_new[16, H] W_ih2^T + h2_prev[16, H] W_hh2^T      (+ b2)
// and the cells, the head and the stores stay in fp32 with the header's math (lstm_cell).
//
// Accuracy: "3xTF32". Every fp32 operand is split into hi (its top 10 mantissa bits, a TF32
// value) and lo = x - hi (exact), and a*b is computed as lo_a hi_b + hi_a lo_b + hi_a hi_b
// with fp32 accumulation: relative error ~2^-20 per product, where one TF32 product would
// be ~2^-10 (3e-4 absolute on the gates at H = 20, over the tests' fp32 tolerance).
//
// Layout tricks that keep every value in the thread that needs it (no shuffles, no shared
// memory round trips between the products and the cells):
// * Gate columns are permuted so that the 4 gates of one unit land in one thread: n-tile
//   2p + s, column 2t + e holds gate q = 2s + e of unit u = 4p + t. With the accumulator
//   layout of m16n8 (thread (g, t) holds rows g, g + 8 and columns 2t, 2t + 1), thread
//   (g, t) owns units 4p + t, p < NP, of coordinates g and g + 8: i, f, g, o all in hand.
// * The A operand of m16k8 (thread holds rows g, g + 8, columns t, t + 4 of a k-tile) then
//   asks for exactly those units too: k-tile kk, column t is unit 8 kk + t = 4 (2 kk) + t
//   and column t + 4 is unit 4 (2 kk + 1) + t. So a cell's h output is the next product's
//   A operand as it stands ("A slot" p = the thread's p-th unit).
// * NaN in one coordinate stays in its row of every product (rows are coordinates), so it
//   never reaches other coordinates; padding units (u >= H) are zeros and never stored.
//
// The weights are staged once per block into shared memory, already split and in fragment
// order: per (matrix, k-tile, n-tile, lane) one float4 {b0 hi, b1 hi, b0 lo, b1 lo}: one
// 16-byte load feeds three mma per m-tile.
//
// The code is written once for the GPU and for the host emulation in tests/cuda_emu (which
// runs 32 host threads as one warp and provides the mma and the shuffle).
#pragma once
#include <cstdint>
#include <cstring>

#include "lstm_optimizer_thread.cuh"
#include "pymeta/lstm_optimizer.h"

namespace pymeta {

#if defined(__CUDACC__)
#define PYMETA_WARP __device__ __forceinline__
PYMETA_WARP int warp_lane() { return threadIdx.x & 31; }
PYMETA_WARP float warp_shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
// D += A B on one m16n8k8 tile: A 16 x 8 (row), B 8 x 8 (col), TF32 in, fp32 accumulate.
PYMETA_WARP void warp_mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the host side never launches the mma kernel below sm_80
#endif
}
// cp.async (sm_80+): a copy of kBytes (4, 8 or 16) from global to shared memory that bypasses
// the registers and lands by the issuing thread's cp.async.wait_group; the bytes past
// src_bytes (0 for a copy past N) are zero-filled and nothing is read for them. 16-byte copies
// skip L1 (.cg).
template <int kBytes>
PYMETA_WARP void warp_cp_async(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const size_t g = __cvta_generic_to_global(src);
  if constexpr (kBytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(g),
                 "r"(src_bytes) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %3, %2;" ::"r"(d), "l"(g),
                 "r"(src_bytes), "n"(kBytes) : "memory");
#else
  __trap();
#endif
}
PYMETA_WARP void warp_cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// Waits until at most `pending` of this thread's newest groups are still in flight.
template <int pending>
PYMETA_WARP void warp_cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(pending) : "memory");
#endif
}
PYMETA_WARP void warp_sync() { __syncwarp(); }
PYMETA_WARP void block_sync() { __syncthreads(); }
// A barrier of `threads` threads (whole warps) of the block on named barrier `id` (1 .. 15;
// 0 is __syncthreads').
PYMETA_WARP void group_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
PYMETA_WARP bool block_sync_or(bool v) { return __syncthreads_or(v) != 0; }
// v, opaque to the compiler: what is computed from it can't be hoisted above this point.
// A shared-memory pointer passed through it loses its address space: its loads become generic
// ones, which also stay ordered with the global stores around them. For the backward's
// constants (lstm_mma_backward_warp) that is what keeps registers down: with an opaque offset
// on the known shared pointer instead (ld.shared), the spills at HB = 20 grew from 124 to 320 B.
PYMETA_WARP int64_t warp_opaque(int64_t v) { asm volatile("" : "+l"(v)); return v; }
template <typename T>
PYMETA_WARP T* warp_opaque(T* v) { asm volatile("" : "+l"(v)); return v; }
#else
#define PYMETA_WARP inline
// Provided by the host emulator (tests/cuda_emu/lstm_mma_emu.cpp).
int warp_lane();
float warp_shfl_xor(float v, int mask);
void warp_mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
void warp_cp_async_n(void* dst, const void* src, int bytes, int src_bytes);
template <int kBytes>
inline void warp_cp_async(void* dst, const void* src, int src_bytes) {
  warp_cp_async_n(dst, src, kBytes, src_bytes);
}
void warp_cp_async_commit();
void warp_cp_async_wait_n(int pending);
template <int pending>
inline void warp_cp_async_wait() { warp_cp_async_wait_n(pending); }
void warp_sync();
void block_sync();
void group_sync(int id, int threads);
bool block_sync_or(bool v);  // a block_sync that returns whether any thread passed true
inline int64_t warp_opaque(int64_t v) { return v; }
template <typename T>
inline T* warp_opaque(T* v) { return v; }
#endif

// The TF32 "hi" part: the top 10 mantissa bits (truncation keeps NaN a NaN and Inf an Inf;
// x - hi is then exact in fp32).
PYMETA_HD float tf32_hi(float x) { return bits_f32(f32_bits(x) & 0xffffe000u); }

// Compile-time shape of the tensor-core path for hidden sizes up to HB (8, 16, 20, 24, 32).
template <int HB>
struct LstmMmaShape {
  static constexpr int KT = (HB + 7) / 8;       // k-tiles of an H-long input
  static constexpr int NP = HB / 4;             // unit slots per thread (4 units per n-tile pair)
  static constexpr int NT = 2 * NP;             // n-tiles of the 4H gate columns
  // m-tiles (16 coordinates) per warp step. 1: fewer registers (<= 128, two 256-thread
  // blocks per SM) beat reusing each staged B fragment for two m-tiles (measured, H200: the
  // first version with 2 m-tiles at H <= 24 ran at 190 registers, one block per SM, and was
  // latency-bound at 18% of the copy bandwidth).
  static constexpr int MT = 1;
  static constexpr int kFrag = KT * NT * 32 * 4;  // floats per staged matrix
  static constexpr int kConst = 20;  // floats per (slot, t): b1, b2, wx0, wx1, wout, b_out, 0, 0
  static constexpr int kTotal = 3 * kFrag + NP * 4 * kConst;  // floats of shared memory
  static constexpr int kTotalBwd = kTotal + 3 * kFrag;  // + the transposed fragments
  static constexpr int kCoords = 16 * MT;         // coordinates per warp step
  // Threads per block and blocks per SM (the kernel's launch bounds): <= 128 registers per
  // thread, two blocks of 8 warps; at H = 32 (64 accumulators per thread) 170 registers,
  // one block of 12 warps (128 would spill ~300 bytes per thread).
  static constexpr int kThreads = HB <= 24 ? 256 : 384;
  static constexpr int kMinBlocks = HB <= 24 ? 2 : 1;
  // The staged forward (lstm_mma_forward_staged): one block per SM, since its warps' staging
  // buffers and the weights share the SM's shared memory; the same registers per thread.
  static constexpr int kStagedThreads = HB <= 24 ? 512 : 384;
};

// Thread `tid` of `nthreads` writes its share of the staged weights (the caller syncs).
// Matrices 0, 1, 2: w_hh1, w_ih2, w_hh2. Then per (slot p, t), unit u = 4p + t, gates q:
// b1[q] = b_ih1 + b_hh1, b2[q], wx0[q] = w_ih1[qH + u, 0], wx1[q] (0 if n_in = 1), wout, and
// b_out in every entry's padding (lstm_mma_b_out_at: where the staged forward reads it).
template <int HB>
PYMETA_HD void lstm_mma_stage(float* sm, const LstmOptWeights<float>& W, int H, int n_in,
                              int tid, int nthreads) {
  using S = LstmMmaShape<HB>;
  constexpr int per = S::KT * S::NT * 32;
  constexpr int kBatch = 8;  // entries whose loads are in flight together (the staging is
                             // latency-bound at small N: one L2 round trip per batch)
  for (int e0 = tid; e0 < 3 * per; e0 += kBatch * nthreads) {
    float v[kBatch][2];
    PYMETA_UNROLL
    for (int j = 0; j < kBatch; ++j) {
      const int e = e0 + j * nthreads;
      const int m = e / per, r = e - m * per;
      const int lane = r & 31, tile = r >> 5;
      const int kk = tile / S::NT, nt = tile - kk * S::NT;
      const int g = lane >> 2, t = lane & 3;
      const int u = 4 * (nt >> 1) + (g >> 1), q = 2 * (nt & 1) + (g & 1);
      const float* w = m == 0 ? W.w_hh1 : (m == 1 ? W.w_ih2 : W.w_hh2);
      PYMETA_UNROLL
      for (int i = 0; i < 2; ++i) {
        const int k = 8 * kk + t + 4 * i;
        v[j][i] = (e < 3 * per && u < H && k < H) ? w[(q * H + u) * H + k] : 0.0f;
      }
    }
    PYMETA_UNROLL
    for (int j = 0; j < kBatch; ++j) {
      const int e = e0 + j * nthreads;
      if (e >= 3 * per) break;
      const int m = e / per, r = e - m * per;
      float* o = sm + m * S::kFrag + 4 * r;
      o[0] = tf32_hi(v[j][0]);
      o[1] = tf32_hi(v[j][1]);
      o[2] = v[j][0] - o[0];
      o[3] = v[j][1] - o[1];
    }
  }
  for (int e = tid; e < S::NP * 4; e += nthreads) {
    const int u = e;  // e = 4p + t
    float* o = sm + 3 * S::kFrag + e * S::kConst;
    for (int q = 0; q < 4; ++q) {
      const bool v = u < H;
      const int r = q * H + u;
      o[q] = v ? W.b_ih1[r] + W.b_hh1[r] : 0.0f;
      o[4 + q] = v ? W.b_ih2[r] + W.b_hh2[r] : 0.0f;
      o[8 + q] = v ? W.w_ih1[r * n_in] : 0.0f;
      o[12 + q] = v && n_in > 1 ? W.w_ih1[r * n_in + 1] : 0.0f;
    }
    o[16] = u < H ? W.w_out[u] : 0.0f;
    o[17] = W.b_out[0];
    o[18] = o[19] = 0.0f;
  }
}

// The backward's products dh[16, H] = dz[16, 4H] W[4H, H] take dz straight from the
// accumulators: k-tile nt of dz is n-tile nt of z, with k position t <-> column 2t and
// t + 4 <-> column 2t + 1 (so a0, a1, a2, a3 = c0, c2, c1, c3), i.e. k position j of k-tile
// 2p + s is gate 2s + (j >= 4) of unit 4p + j % 4. Output n-tile m, column n is unit
// 4 (2m + n % 2) + n / 2: the result lands in the thread's unit slots 2m and 2m + 1.
// Staged after the forward's fragments: per (matrix, k-tile, n-tile, lane) {b0, b1} hi, lo.
template <int HB>
PYMETA_HD void lstm_mma_stage_transposed(float* sm, const LstmOptWeights<float>& W, int H,
                                         int tid, int nthreads) {
  using S = LstmMmaShape<HB>;
  constexpr int per = S::NT * S::KT * 32;
  constexpr int kBatch = 8;
  float* base = sm + S::kTotal;
  for (int e0 = tid; e0 < 3 * per; e0 += kBatch * nthreads) {
    float v[kBatch][2];
    PYMETA_UNROLL
    for (int j = 0; j < kBatch; ++j) {
      const int e = e0 + j * nthreads;
      const int m = e / per, r = e - m * per;
      const int lane = r & 31, tile = r >> 5;
      const int kt = tile / S::KT, mo = tile - kt * S::KT;  // k-tile (gate cols), n-tile (units)
      const int g = lane >> 2, t = lane & 3;
      const int u = 4 * (kt >> 1) + t;                      // the gate row's unit
      const int col = 4 * (2 * mo + (g & 1)) + (g >> 1);    // the input unit (output column)
      const float* w = m == 0 ? W.w_hh1 : (m == 1 ? W.w_ih2 : W.w_hh2);
      PYMETA_UNROLL
      for (int i = 0; i < 2; ++i) {
        const int q = 2 * (kt & 1) + i;
        v[j][i] = (e < 3 * per && u < H && col < H) ? w[(q * H + u) * H + col] : 0.0f;
      }
    }
    PYMETA_UNROLL
    for (int j = 0; j < kBatch; ++j) {
      const int e = e0 + j * nthreads;
      if (e >= 3 * per) break;
      const int m = e / per, r = e - m * per;
      float* o = base + m * S::kFrag + 4 * r;
      o[0] = tf32_hi(v[j][0]);
      o[1] = tf32_hi(v[j][1]);
      o[2] = v[j][0] - o[0];
      o[3] = v[j][1] - o[1];
    }
  }
}

// The TF32 parts of the thread's A values of one k-tile (hi: top 10 mantissa bits, lo = v - hi).
template <int MT>
PYMETA_WARP void lstm_mma_split(const float (&v)[MT][4], uint32_t (&ahi)[MT][4],
                                uint32_t (&alo)[MT][4]) {
  PYMETA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    PYMETA_UNROLL
    for (int i = 0; i < 4; ++i) {
      const float hi = tf32_hi(v[mt][i]);
      ahi[mt][i] = f32_bits(hi);
      alo[mt][i] = f32_bits(v[mt][i] - hi);
    }
  }
}

// acc[mt][n] += A[mt] B over the N n-tiles of k-tile kk of one staged matrix (fragment order),
// 3xTF32 (see the top of the file), A given as its TF32 parts. kExactA: every A value is a
// TF32 value (lo = 0: a bfloat16 state's h), so lo_a hi_b, a product of zeros, is skipped.
template <int MT, int N, bool kExactA = false>
PYMETA_WARP void lstm_mma_ktile(float (&acc)[MT][N][4], const uint32_t (&ahi)[MT][4],
                                const uint32_t (&alo)[MT][4], const float* frag, int kk,
                                int lane) {
  PYMETA_UNROLL
  for (int n = 0; n < N; ++n) {
    float b[4];
    lstm_load4(frag + ((kk * N + n) * 32 + lane) * 4, b);
    const uint32_t bhi[2] = {f32_bits(b[0]), f32_bits(b[1])};
    const uint32_t blo[2] = {f32_bits(b[2]), f32_bits(b[3])};
    PYMETA_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      if constexpr (!kExactA) warp_mma_tf32(acc[mt][n], alo[mt], bhi);  // small terms first
      warp_mma_tf32(acc[mt][n], ahi[mt], blo);
      warp_mma_tf32(acc[mt][n], ahi[mt], bhi);
    }
  }
}

// acc[mt][n] += A[mt] B over K k-tiles and N n-tiles of one staged matrix. a_of(mt, kk, v)
// gives the thread's 4 A values of k-tile kk (a0: row g, a1: row g + 8, a2 and a3 the same
// rows 4 columns on).
template <int MT, int K, int N, bool kExactA = false, typename AOf>
PYMETA_WARP void lstm_mma_tiles(float (&acc)[MT][N][4], const AOf& a_of, const float* frag,
                                int lane) {
  PYMETA_UNROLL
  for (int kk = 0; kk < K; ++kk) {
    float v[MT][4];
    uint32_t ahi[MT][4], alo[MT][4];
    PYMETA_UNROLL
    for (int mt = 0; mt < MT; ++mt) a_of(mt, kk, v[mt]);
    if constexpr (kExactA) {
      PYMETA_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        PYMETA_UNROLL
        for (int i = 0; i < 4; ++i) ahi[mt][i] = f32_bits(v[mt][i]);
      }
    } else {
      lstm_mma_split<MT>(v, ahi, alo);
    }
    lstm_mma_ktile<MT, N, kExactA>(acc, ahi, alo, frag, kk, lane);
  }
}

// acc[mt][nt] += A[mt] W^T (the forward's gate products): A from the thread's unit slots
// a[mt][row half][slot], W one staged matrix. kExactA: A holds TF32 values (lstm_mma_ktile).
template <int HB, bool kExactA = false>
PYMETA_WARP void lstm_mma_product(
    float (&acc)[LstmMmaShape<HB>::MT][LstmMmaShape<HB>::NT][4],
    const float (&a)[LstmMmaShape<HB>::MT][2][2 * LstmMmaShape<HB>::KT], const float* frag,
    int lane) {
  using S = LstmMmaShape<HB>;
  auto a_of = [&](int mt, int kk, float (&v)[4]) {
    v[0] = a[mt][0][2 * kk];
    v[1] = a[mt][1][2 * kk];
    v[2] = a[mt][0][2 * kk + 1];
    v[3] = a[mt][1][2 * kk + 1];
  };
  lstm_mma_tiles<S::MT, S::KT, S::NT, kExactA>(acc, a_of, frag, lane);
}

// out[mt][m] += dz[mt] W (the backward's dh products): dz in accumulator layout (NT n-tiles),
// W one staged transposed matrix, out in accumulator layout over KT n-tiles (= the thread's
// unit slots, see lstm_mma_stage_transposed).
template <int HB>
PYMETA_WARP void lstm_mma_product_t(
    float (&out)[LstmMmaShape<HB>::MT][LstmMmaShape<HB>::KT][4],
    const float (&dz)[LstmMmaShape<HB>::MT][LstmMmaShape<HB>::NT][4], const float* frag,
    int lane) {
  using S = LstmMmaShape<HB>;
  auto a_of = [&](int mt, int kt, float (&v)[4]) {
    v[0] = dz[mt][kt][0];
    v[1] = dz[mt][kt][2];
    v[2] = dz[mt][kt][1];
    v[3] = dz[mt][kt][3];
  };
  lstm_mma_tiles<S::MT, S::NT, S::KT>(out, a_of, frag, lane);
}

// out1 += dz W1 and out2 += dz W2 (two lstm_mma_product_t with one A operand): each k-tile
// of dz is split into its TF32 parts once and feeds both products.
template <int HB>
PYMETA_WARP void lstm_mma_product_t2(
    float (&out1)[LstmMmaShape<HB>::MT][LstmMmaShape<HB>::KT][4],
    float (&out2)[LstmMmaShape<HB>::MT][LstmMmaShape<HB>::KT][4],
    const float (&dz)[LstmMmaShape<HB>::MT][LstmMmaShape<HB>::NT][4], const float* frag1,
    const float* frag2, int lane) {
  using S = LstmMmaShape<HB>;
  constexpr int MT = S::MT;
  PYMETA_UNROLL
  for (int kk = 0; kk < S::NT; ++kk) {
    float v[MT][4];
    uint32_t ahi[MT][4], alo[MT][4];
    PYMETA_UNROLL
    for (int mt = 0; mt < MT; ++mt) {  // as lstm_mma_product_t's a_of
      v[mt][0] = dz[mt][kk][0];
      v[mt][1] = dz[mt][kk][2];
      v[mt][2] = dz[mt][kk][1];
      v[mt][3] = dz[mt][kk][3];
    }
    lstm_mma_split<MT>(v, ahi, alo);
    lstm_mma_ktile<MT, S::KT>(out1, ahi, alo, frag1, kk, lane);
    lstm_mma_ktile<MT, S::KT>(out2, ahi, alo, frag2, kk, lane);
  }
}

// The forward of one warp step, coordinates base .. base + 16 MT - 1 (those >= N are
// computed on a copy of coordinate N - 1 and never stored). All 32 lanes call it together.
// St: the state's storage type (float, or uint16_t = bfloat16 bits; the math is float32).
// kBwd = false (the forward): h and c of both layers go to out = new_state.
// kBwd = true (the backward's recompute): out = the workspace gets z1 (in the dz1 rows) and
// the rows the weight gradients need (x, h1, h2; lstm_opt_rows); z2 is kept for the caller.
// z1 and z2 may be the same array (z1 is dead once layer 1's cells ran).
// Element (state row srow, coordinate n) of a state of N coordinates: feature-major
// [4H][N], srow N + n; blocked (kBlk) [ceil(N / 16)][4H][16], the 4H rows of 16 coordinates
// in one 64 H-element block, so that a warp step (16 coordinates) reads and writes one
// contiguous run (bench/NOTES_lstm.md, fifteenth session).
template <bool kBlk>
PYMETA_HD int64_t lstm_mma_state_at(int srow, int64_t n, int64_t N, int H) {
  if constexpr (kBlk) return (n >> 4) * (int64_t(64) * H) + (srow * 16 + int(n & 15));
  else return int64_t(srow) * N + n;
}

template <int HB>
struct LstmMmaRegs {  // a warp step's per-thread values (unit slots p, row halves h)
  using S = LstmMmaShape<HB>;
  int64_t nl[S::MT][2];  // the coordinate each row loads from
  bool ok[S::MT][2];     // ... and whether it is stored
  float x[S::MT][2][2];  // preprocessed grad
  float c1[S::MT][2][2 * S::KT], c2[S::MT][2][2 * S::KT];  // c_prev of both layers
  float h1[S::MT][2][2 * S::KT], h2[S::MT][2][2 * S::KT];  // h of both layers (new)
};

// Where lstm_mma_forward_core reads a step's inputs. x(row, n): the grad of the step's row
// `row` (0 .. 16 MT - 1), coordinate n. State row srow (0 .. 4H - 1) there: st(srow, n) from
// global memory; rows(r).at(p, row) from a staging buffer, rows r + 4p (a thread reads rows
// 4p + t of a layer's block, so its swizzle is computed once per block). kEager: load every
// state value before the first product (global memory: the loads of the step are then in
// flight together); else each value is read where it is used (fewer registers live).
// kOff32 (the forward, where 4 H N < 2^31): 32-bit offsets row * N + n, one IMAD and one
// IMAD.WIDE per access instead of a 64-bit product and a LEA pair (sm_90, H = 20: 1925 vs
// 2298 instructions per warp step). The forward's stores follow Src::kOff32 too.
// kBlk: the blocked state layout [ceil(N / 16)][4H][16] (lstm_mma_state_at), whose padding
// coordinates N .. 16 ceil(N / 16) - 1 are stepped with a zero grad (the forward's stores follow
// Src::kBlocked too).
template <typename St, bool kEagerLoads = true, bool kOff32 = false, bool kBlk = false>
struct LstmMmaGlobalSrc {
  static constexpr bool kTf32State = sizeof(St) == 2;  // bfloat16: 8 significant bits of TF32's 11
  static constexpr bool kEager = kEagerLoads;
  static constexpr bool kGlobal = true;
  static constexpr bool kOff32Offsets = kOff32;
  static constexpr bool kBlocked = kBlk;
  const float* grad;
  const St* state;
  int64_t N;
  int H;  // (read with kBlk only)
  PYMETA_WARP float x(int, int64_t n) const { return grad[n]; }
  PYMETA_WARP float st(int srow, int64_t n) const {
    if constexpr (kBlk) return state_ld(state[lstm_mma_state_at<true>(srow, n, N, H)]);
    if constexpr (kOff32) return state_ld(state[srow * int(N) + int(n)]);
    // lazy loads (the backward's recompute): the row offset computed where it is used
    const int64_t rowN = kEagerLoads ? int64_t(srow) * N : int64_t(srow) * warp_opaque(N);
    return state_ld(state[rowN + n]);
  }
};

// A warp's staging buffer (lstm_mma_forward_staged): the grad row (16 floats), then the 4H
// state rows of the step's 16 coordinates (16 St each, 16-byte aligned).
template <typename St>
PYMETA_HD int lstm_mma_buf_bytes(int H) { return 64 + 4 * H * 16 * int(sizeof(St)); }
// Element (srow, col) of the buffer's state rows. A thread reads rows 4p + t (t = 0 .. 3:
// 4 consecutive rows) at columns g and g + 8: with float rows (16 words), rows 2 apart hit the
// same banks, so bit 1 of the row swaps the row's halves (16-byte chunk c lands at c ^ 2);
// bfloat16 rows (8 words) already fall in 4 different groups of 8 banks.
template <typename St>
PYMETA_HD int lstm_mma_buf_index(int srow, int col) {
  return sizeof(St) == 4 ? srow * 16 + (col ^ ((srow & 2) << 2)) : srow * 16 + col;
}
// kOff32, kBlk: the stores' offsets and layout (LstmMmaGlobalSrc)
template <typename St, bool kOff32 = false, bool kBlk = false>
struct LstmMmaStagedSrc {
  static constexpr bool kTf32State = sizeof(St) == 2;  // bfloat16: 8 significant bits of TF32's 11
  static constexpr bool kEager = false;
  static constexpr bool kGlobal = false;
  static constexpr bool kOff32Offsets = kOff32;
  static constexpr bool kBlocked = kBlk;
  const float* grad;  // 16 floats
  const St* state;    // 4H rows, lstm_mma_buf_index
  struct Rows {       // rows r + 4p share bit 1 of r, so one swizzle serves them all
    const St* r0;
    int sw;
    PYMETA_WARP float at(int p, int row) const { return state_ld(r0[64 * p + (row ^ sw)]); }
  };
  PYMETA_WARP float x(int row, int64_t) const { return grad[row]; }
  PYMETA_WARP Rows rows(int r) const {
    return {state + 16 * r, lstm_mma_buf_index<St>(r, 0) - 16 * r};
  }
};

// Blocked stores (state and update) addressed from the step's base rather than from nl, so
// that nl dies at the loads (ptxas, sm_90, HB = 20: the float32 staged kernel's spills
// 60 -> 24 B, the direct one's 52 -> 28 B); not in the bfloat16 staged kernel, which then
// spilled (0 -> 12 B).
template <typename St, typename Src>
constexpr bool lstm_mma_blk_from_base = Src::kBlocked && (sizeof(St) == 4 || Src::kGlobal);

template <int HB, bool kBwd, typename St, typename Src>
PYMETA_WARP void lstm_mma_forward_core(const float* sm, const LstmOptScalars<float>& s,
                                       const Src& src, St* out,
                                       int64_t N, int64_t base, LstmMmaRegs<HB>& r,
                                       float (&z1)[LstmMmaShape<HB>::MT][LstmMmaShape<HB>::NT][4],
                                       float (&z2)[LstmMmaShape<HB>::MT][LstmMmaShape<HB>::NT][4]) {
  using S = LstmMmaShape<HB>;
  constexpr int MT = S::MT, NP = S::NP, KS = 2 * S::KT;
  // the blocked layout's addressing and padding assume a warp step is one block of 16
  static_assert(!Src::kBlocked || S::kCoords == 16, "blocked layout: one block per warp step");
  constexpr bool kBlkFromBase = lstm_mma_blk_from_base<St, Src>;
  const int H = s.H;
  // staged: the lane enters each step opaque, so the rows and offsets derived from it are
  // recomputed per step; held across the persistent loop they spilled (bench/NOTES_lstm.md)
  const int lane = Src::kGlobal ? warp_lane() : int(warp_opaque(int64_t(warp_lane())));
  const int g = lane >> 2, t = lane & 3;
  const float* cst = sm + 3 * S::kFrag;
  const LstmOptRows R = lstm_opt_rows(H, s.n_in);
  // row `row` of out at coordinate n (in the backward, the row offset is computed where it is
  // used: see lstm_mma_backward_warp)
  auto out_at = [N](int row, int64_t n) {
    if constexpr (kBwd) return int64_t(row) * warp_opaque(N) + n;
    else return int64_t(row) * N + n;
  };

  PYMETA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    PYMETA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int64_t n = base + 16 * mt + g + 8 * h;
      r.ok[mt][h] = n < N;
      // blocked: a padding coordinate has state of its own, and a zero grad
      r.nl[mt][h] = n < N || Src::kBlocked ? n : N - 1;
      lstm_preprocess(Src::kBlocked && n >= N ? 0.0f : src.x(16 * mt + g + 8 * h, r.nl[mt][h]),
                      s, r.x[mt][h]);
      if constexpr (kBwd) {
        if (t == h && r.ok[mt][h]) {  // threads 0 and 1 store rows g and g + 8
          out[out_at(R.x, n)] = r.x[mt][h][0];
          if (s.n_in > 1) out[out_at(R.x + 1, n)] = r.x[mt][h][1];
        }
      }
    }
  }
  // From global memory, every state value of the step is loaded here, before any product:
  // the loads of the whole step are in flight together (the kernel is bound by memory latency
  // otherwise). From a staging buffer, layer 2's values are read after layer 1.
  auto load_slots = [&](float (&a)[MT][2][KS], int row0, int slots) {
    PYMETA_UNROLL
    for (int p = 0; p < KS; ++p) {
      const int u = 4 * p + t;
      PYMETA_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        PYMETA_UNROLL
        for (int h = 0; h < 2; ++h) {
          if constexpr (Src::kGlobal)
            a[mt][h][p] = p < slots && u < H ? src.st(row0 + u, r.nl[mt][h]) : 0.0f;
          else
            a[mt][h][p] = p < slots && u < H ? src.rows(row0 + t).at(p, 16 * mt + g + 8 * h) : 0.0f;
        }
      }
    }
  };
  float a1[MT][2][KS], a2[MT][2][KS];
  load_slots(a1, 0, KS);        // h1_prev
  load_slots(r.c1, H, NP);      // c1_prev
  if constexpr (Src::kEager) {
    load_slots(a2, 2 * H, KS);    // h2_prev
    load_slots(r.c2, 3 * H, NP);  // c2_prev
  }

  // ---- layer 1: z1 = b1 + x W_ih1^T (fp32), then += h1_prev W_hh1^T (tensor cores)
  PYMETA_UNROLL
  for (int p = 0; p < NP; ++p) {
    float c4[4][4];
    const float* cp = kBwd ? warp_opaque(cst) : cst;  // (read here, not hoisted out of the loop)
    PYMETA_UNROLL
    for (int j = 0; j < 4; ++j) lstm_load4(cp + (4 * p + t) * S::kConst + 4 * j, c4[j]);
    PYMETA_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      PYMETA_UNROLL
      for (int i = 0; i < 8; ++i) {  // n-tile 2p + (i >> 2), accumulator i & 3
        const int q = 2 * (i >> 2) + (i & 1), h = (i >> 1) & 1;
        float z = c4[0][q];
        z = z + c4[2][q] * r.x[mt][h][0];
        z = z + c4[3][q] * r.x[mt][h][1];
        z1[mt][2 * p + (i >> 2)][i & 3] = z;
      }
    }
  }
  // h_prev from a bfloat16 state is a TF32 value: 2 mma per tile, not 3 (same bits, but for
  // the sign of an exact zero). An Inf h meets each weight as Inf * hi + Inf * lo: +-Inf gates,
  // as in the reference, where every weight of its column has a lo part, else Inf * 0 = NaN
  // (a weight that is exactly a TF32 value); either way only in that coordinate.
  constexpr bool kExactH = Src::kTf32State;
  lstm_mma_product<HB, kExactH>(z1, a1, sm, lane);
  if constexpr (kBwd) {  // z1 parks in its workspace rows (dz1 overwrites it): frees 4 NP registers
    PYMETA_UNROLL
    for (int p = 0; p < NP; ++p) {
      PYMETA_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        PYMETA_UNROLL
        for (int h = 0; h < 2; ++h) {
          if (4 * p + t < H && r.ok[mt][h]) {
            PYMETA_UNROLL
            for (int q = 0; q < 4; ++q)
              out[out_at(R.dz1 + q * H + 4 * p + t, r.nl[mt][h])] =
                  z1[mt][2 * p + (q >> 1)][2 * h + (q & 1)];
          }
        }
      }
    }
  }

  // the cells of one layer; their h (zero past H) is the next product's A operand
  auto cells = [&](const float (&z)[MT][S::NT][4], int row_h, int row_c, int ws_row,
                   const float (&cprev)[MT][2][KS], float (&hout)[MT][2][KS]) {
    PYMETA_UNROLL
    for (int p = 0; p < KS; ++p) {
      const int u = 4 * p + t;
      PYMETA_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        PYMETA_UNROLL
        for (int h = 0; h < 2; ++h) {
          if (p >= NP) {
            hout[mt][h][p] = 0.0f;
            continue;
          }
          const float zq[4] = {z[mt][2 * p][2 * h], z[mt][2 * p][2 * h + 1],
                               z[mt][2 * p + 1][2 * h], z[mt][2 * p + 1][2 * h + 1]};
          float c, hh;
          lstm_cell(zq, cprev[mt][h][p], c, hh);
          if (u < H && (r.ok[mt][h] || (!kBwd && Src::kBlocked))) {
            const int64_t n = r.nl[mt][h];
            if constexpr (kBwd) {
              out[out_at(ws_row + u, n)] = hh;
            } else if constexpr (kBlkFromBase) {
              St* blk = out + lstm_mma_state_at<true>(0, base, N, H);
              state_st(blk[(row_h + u) * 16 + g + 8 * h], hh);
              state_st(blk[(row_c + u) * 16 + g + 8 * h], c);
            } else if constexpr (Src::kBlocked) {
              state_st(out[lstm_mma_state_at<true>(row_h + u, n, N, H)], hh);
              state_st(out[lstm_mma_state_at<true>(row_c + u, n, N, H)], c);
            } else if constexpr (Src::kOff32Offsets) {
              state_st(out[(row_h + u) * int(N) + int(n)], hh);
              state_st(out[(row_c + u) * int(N) + int(n)], c);
            } else {
              state_st(out[int64_t(row_h + u) * N + n], hh);
              state_st(out[int64_t(row_c + u) * N + n], c);
            }
          }
          hout[mt][h][p] = u < H ? hh : 0.0f;
        }
      }
    }
  };
  cells(z1, 0, H, R.h1, r.c1, r.h1);

  // ---- layer 2: z2 = b2 + h1_new W_ih2^T + h2_prev W_hh2^T
  if constexpr (!Src::kEager) {
    load_slots(a2, 2 * H, KS);
    load_slots(r.c2, 3 * H, NP);
  }
  PYMETA_UNROLL
  for (int p = 0; p < NP; ++p) {
    float b2[4];
    lstm_load4((kBwd ? warp_opaque(cst) : cst) + (4 * p + t) * S::kConst + 4, b2);
    PYMETA_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      PYMETA_UNROLL
      for (int i = 0; i < 8; ++i) z2[mt][2 * p + (i >> 2)][i & 3] = b2[2 * (i >> 2) + (i & 1)];
    }
  }
  lstm_mma_product<HB>(z2, r.h1, sm + S::kFrag, lane);
  lstm_mma_product<HB, kExactH>(z2, a2, sm + 2 * S::kFrag, lane);
  cells(z2, 2 * H, 3 * H, R.h2, r.c2, r.h2);
}

// The head's bias: a value, or (the staged forward) read where it is used from shared memory,
// since a register held across the persistent loop spills there, and with ~214 KB of shared
// memory in use the L1 rarely keeps the spill.
PYMETA_WARP float lstm_mma_b_out(float v) { return v; }
PYMETA_WARP float lstm_mma_b_out(const float* p) { return *warp_opaque(p); }
// Where lstm_mma_stage put b_out in shared memory (the first constants entry's float 17).
template <int HB>
PYMETA_HD const float* lstm_mma_b_out_at(const float* sm) {
  return sm + 3 * LstmMmaShape<HB>::kFrag + 17;
}

// The sum over the 4 threads of a row (fixed order: bitwise the same on every run).
PYMETA_WARP float lstm_mma_row_sum(float v) {
  v = v + warp_shfl_xor(v, 1);
  return v + warp_shfl_xor(v, 2);
}

// The forward step of one warp (see lstm_mma_forward_core; St the state's storage type), its
// inputs read from src (LstmMmaGlobalSrc or LstmMmaStagedSrc).
template <int HB, typename St, typename Src, typename BOut>
PYMETA_WARP void lstm_mma_forward_step(const float* sm, const LstmOptScalars<float>& s,
                                       BOut b_out, const Src& src, float* update,
                                       St* new_state, int64_t N, int64_t base) {
  using S = LstmMmaShape<HB>;
  constexpr int MT = S::MT, NP = S::NP;
  const int t = warp_lane() & 3;
  const float* cst = sm + 3 * S::kFrag;
  LstmMmaRegs<HB> r;
  float z[MT][S::NT][4];  // z1, then z2: the forward needs one at a time
  lstm_mma_forward_core<HB, false, St>(sm, s, src, new_state, N, base, r, z, z);

  // the head: this thread's units, then the row sum
  PYMETA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    float o[2] = {0.0f, 0.0f};
    PYMETA_UNROLL
    for (int p = 0; p < NP; ++p) {
      const float wo = cst[(4 * p + t) * S::kConst + 16];
      PYMETA_UNROLL
      for (int h = 0; h < 2; ++h) o[h] = o[h] + wo * r.h2[mt][h][p];
    }
    PYMETA_UNROLL
    for (int h = 0; h < 2; ++h) o[h] = lstm_mma_row_sum(o[h]);
    // thread t = 0 stores row g, t = 1 row g + 8 (no runtime array index: o stays in registers)
    const float mine = t == 0 ? o[0] : o[1];
    const bool store = t == 0 ? r.ok[mt][0] : (t == 1 && r.ok[mt][1]);
    if constexpr (lstm_mma_blk_from_base<St, Src>) {  // the row from the step's base
      if (store)
        update[base + 16 * mt + (warp_lane() >> 2) + 8 * t] =
            (mine + lstm_mma_b_out(b_out)) * s.out_scale;
    } else {
      if (store)
        update[t == 0 ? r.nl[mt][0] : r.nl[mt][1]] = (mine + lstm_mma_b_out(b_out)) * s.out_scale;
    }
  }
}

// The forward step of one warp, read straight from global memory (kOff32: 32-bit offsets,
// for a state of fewer than 2^31 elements).
template <int HB, typename St = float, bool kOff32 = false, bool kBlk = false>
PYMETA_WARP void lstm_mma_forward_warp(const float* sm, const LstmOptScalars<float>& s,
                                       float b_out, const float* grad, const St* state,
                                       float* update, St* new_state, int64_t N,
                                       int64_t base) {
  lstm_mma_forward_step<HB, St>(
      sm, s, b_out, LstmMmaGlobalSrc<St, true, kOff32, kBlk>{grad, state, N, s.H}, update,
      new_state, N, base);
}

// This lane's share of the copies of step `base` (16 coordinates) into a staging buffer
// (lstm_mma_buf_bytes), kBytes per copy. Lane l copies column chunk l % CPR of state rows
// l / CPR, + RPI, + 2 RPI, ...: its column, hence whether it lies past N, and its source stride
// are the same for all its rows, so each copy costs a compare, the copy and two additions.
// kBlk: the blocked layout (lstm_mma_state_at), whose step is one run of 64 H elements, every
// column present (padding coordinates have state).
template <typename St, int kBytes, int HB, bool kBlk = false>
PYMETA_WARP void lstm_mma_stage_rows(unsigned char* buf, const float* grad, const St* state,
                                     int H, int64_t N, int64_t base, int lane) {
  constexpr int E = kBytes / int(sizeof(St));  // state elements per copy
  constexpr int CPR = 16 / E;                  // copies per state row (16 elements)
  constexpr int RPI = 32 / CPR;                // rows per pass of the warp
  constexpr int GE = kBytes / 4;               // grad elements per copy
  if (lane < 16 / GE) {
    // blocked: the grad's chunk across N is copied in part, the rest zero-filled (feature-major
    // 16-byte copies have N % 4 == 0: a chunk is all in or all out)
    const int64_t n = base + GE * lane, left = N - n;
    const int bytes = !kBlk || left >= GE ? (n < N ? kBytes : 0) : left > 0 ? 4 * int(left) : 0;
    warp_cp_async<kBytes>(reinterpret_cast<float*>(buf) + GE * lane, grad + (n < N ? n : 0),
                          bytes);
  }
  St* bs = reinterpret_cast<St*>(buf + 64);
  // the lane's offsets per step: hoisted out of the persistent loop, they spill
  N = warp_opaque(N);
  lane = int(warp_opaque(int64_t(lane)));
  const int col = (lane % CPR) * E;
  const bool ok = kBlk || base + col < N;  // past N: zero-filled, the source stays at row 0
  const int bytes = ok ? kBytes : 0;
  int row = lane / CPR;
  const St* src = state + (ok ? lstm_mma_state_at<kBlk>(row, base + col, N, H) : 0);
  const int64_t stride = ok ? (kBlk ? int64_t(RPI) * 16 : int64_t(RPI) * N) : 0;
  if constexpr (kBytes == 16) {  // <= 16 copies per lane: unrolled
    PYMETA_UNROLL
    for (int i = 0; i < (4 * HB + RPI - 1) / RPI; ++i, row += RPI, src += stride)
      if (row < 4 * H) warp_cp_async<kBytes>(bs + lstm_mma_buf_index<St>(row, col), src, bytes);
  } else {  // up to 64 copies per lane: a loop (unrolled, it made the kernel spill)
    for (; row < 4 * H; row += RPI, src += stride)
      warp_cp_async<kBytes>(bs + lstm_mma_buf_index<St>(row, col), src, bytes);
  }
}

// The copies of step `base`: 16 bytes each where grad and state are 16-byte aligned and, in
// the feature-major layout, N is a multiple of 16 / sizeof(St) (vec: every state row then
// starts aligned; a blocked step is one aligned run whatever N), else 4 bytes each, which only
// a float state can take (staged_launch never runs a bfloat16 state without vec).
template <typename St, int HB, bool kBlk = false>
PYMETA_WARP void lstm_mma_stage_step(unsigned char* buf, const float* grad, const St* state,
                                     int H, int64_t N, int64_t base, bool vec, int lane) {
  if (vec)
    lstm_mma_stage_rows<St, 16, HB, kBlk>(buf, grad, state, H, N, base, lane);
  else if constexpr (sizeof(St) == 4)
    lstm_mma_stage_rows<St, 4, HB, kBlk>(buf, grad, state, H, N, base, lane);
}

// The forward of one warp over its steps base, base + stride, ... < N, with each step's
// inputs copied into shared memory (cp.async) while the previous step computes: two staging
// buffers per warp at bufs and bufs + buf_bytes. Loads no longer wait in registers for their
// memory latency, so the warp's memory traffic overlaps its math.
// The barrier group of warp `warp` of a block of `warps` (forward_mma_staged_sync_kernel): warps
// [g sync_warps, (g + 1) sync_warps) form group g, on named barrier 1 + g, the last group
// possibly smaller; lead: the warp's place in its group.
struct LstmSyncGroup {
  int lead, bar_id, bar_threads;
};
PYMETA_HD LstmSyncGroup lstm_sync_group(int warp, int warps, int sync_warps) {
  const int group = warp / sync_warps, first = group * sync_warps;
  const int members = warps - first < sync_warps ? warps - first : sync_warps;
  return {warp - first, 1 + group, 32 * members};
}

// kSync: a barrier after every step (group_sync(bar_id, bar_threads): the warps of one barrier
// group), the group's warps walking their steps together (their copies of a state row then
// reach the memory system as one run: forward_mma_staged_sync_kernel). `lead` (kSync only) is
// this warp's offset from its group's first warp's step, so that the trip count,
// (N - (base - lead)) / stride rounded up, is the same for every warp of the group.
// kBlk: the blocked state layout (lstm_mma_state_at).
template <int HB, typename St, bool kOff32 = false, bool kSync = false, bool kBlk = false>
PYMETA_WARP void lstm_mma_forward_staged(const float* sm, unsigned char* bufs, int buf_bytes,
                                         const LstmOptScalars<float>& s, const float* b_out,
                                         const float* grad, const St* state, float* update,
                                         St* new_state, int64_t N, int64_t base, int64_t stride,
                                         bool vec, int64_t lead = 0, int bar_id = 0,
                                         int bar_threads = 0) {
  const int lane = warp_lane();
  if (!kSync && base >= N) return;
  if (base < N) lstm_mma_stage_step<St, HB, kBlk>(bufs, grad, state, s.H, N, base, vec, lane);
  warp_cp_async_commit();
  for (int k = 0; (kSync ? base - lead : base) < N; base += stride, k ^= 1) {
    if (!kSync || base < N) {  // (a warp past N with kSync: only the barriers)
      unsigned char* cur = bufs + k * buf_bytes;
      if (base + stride < N)
        lstm_mma_stage_step<St, HB, kBlk>(bufs + (k ^ 1) * buf_bytes, grad, state, s.H, N,
                                          base + stride, vec, lane);
      warp_cp_async_commit();  // possibly empty: the wait below always leaves one group out
      warp_cp_async_wait<1>();  // this lane's copies of step `base` have landed
      warp_sync();              // ... and every lane's
      const LstmMmaStagedSrc<St, kOff32, kBlk> src{reinterpret_cast<const float*>(cur),
                                                   reinterpret_cast<const St*>(cur + 64)};
      lstm_mma_forward_step<HB, St>(sm, s, b_out, src, update, new_state, N, base);
      warp_sync();  // every lane has read `cur` before the next iteration refills it
    }
    if constexpr (kSync) group_sync(bar_id, bar_threads);
  }
}

// The backward of one warp step: recompute (lstm_mma_forward_core), then backpropagate
// through the head, layer 2 and layer 1. Writes d_grad, d_state and the workspace rows of
// lstm_opt_backward_coord (the weight gradients are summed from them by the wgrad kernel).
// The products dh = dz W run on the tensor cores too (lstm_mma_product_t).
template <int HB>
PYMETA_WARP void lstm_mma_backward_warp(const float* sm, const LstmOptScalars<float>& s,
                                        const float* grad, const float* state,
                                        const float* d_update, const float* d_new_state,
                                        float* d_grad, float* d_state, float* ws, int64_t N_,
                                        int64_t base) {
  using S = LstmMmaShape<HB>;
  constexpr int MT = S::MT, NP = S::NP, KT = S::KT, NT = S::NT;
  // Made opaque once per step: the row offsets (row N) and the shared-memory reads of the
  // persistent loop are the same every step, and hoisted out of it they stay live (and spill).
  const int64_t N = warp_opaque(N_);
  const int H = s.H;
  const int lane = warp_lane(), t = lane & 3;
  const float* cst = sm + 3 * S::kFrag;
  const float* tfrag = sm + S::kTotal;  // transposed fragments: w_hh1, w_ih2, w_hh2
  const LstmOptRows R = lstm_opt_rows(H, s.n_in);
  LstmMmaRegs<HB> r;
  float z2[MT][NT][4];  // z1 is in the workspace (see lstm_mma_forward_core)
  // Layer 2's state is loaded after layer 1 at HB <= 20 (two blocks per SM, 128 registers:
  // 124 B of spills at HB = 20, 552 B loading it up front); up front at HB > 20 (one block,
  // fewer spills that way; ptxas -v, sm_90).
  using Src = LstmMmaGlobalSrc<float, (HB > 20)>;
  lstm_mma_forward_core<HB, true, float>(sm, s, Src{grad, state, N, s.H}, ws, N, base, r, z2, z2);
  auto at = [N](int row, int64_t n) { return int64_t(row) * warp_opaque(N) + n; };

  // ---- head and layer 2; z2 becomes dz2 in place
  float du[MT][2];
  PYMETA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    PYMETA_UNROLL
    for (int h = 0; h < 2; ++h) {
      du[mt][h] = d_update[r.nl[mt][h]] * s.out_scale;
      if (t == h && r.ok[mt][h]) ws[at(R.du, r.nl[mt][h])] = du[mt][h];
    }
  }
  // accumulator layout: slot 2m + (i & 1), half i >> 1. d h1's direct part (from d_new_state)
  // is added in layer 1, where it is used.
  float dh1[MT][KT][4], dh2p[MT][KT][4];
  PYMETA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    PYMETA_UNROLL
    for (int m = 0; m < KT; ++m) {
      PYMETA_UNROLL
      for (int i = 0; i < 4; ++i) dh1[mt][m][i] = dh2p[mt][m][i] = 0.0f;
    }
  }
  PYMETA_UNROLL
  for (int p = 0; p < NP; ++p) {
    const int u = 4 * p + t;
    const float wo = warp_opaque(cst)[(4 * p + t) * S::kConst + 16];
    PYMETA_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      PYMETA_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int64_t n = r.nl[mt][h];
        const bool v = u < H;
        const float dh = du[mt][h] * wo + (v ? d_new_state[at(2 * H + u, n)] : 0.0f);
        const float dc_in = v ? d_new_state[at(3 * H + u, n)] : 0.0f;
        const float zq[4] = {z2[mt][2 * p][2 * h], z2[mt][2 * p][2 * h + 1],
                             z2[mt][2 * p + 1][2 * h], z2[mt][2 * p + 1][2 * h + 1]};
        float dz[4], dc_prev;
        lstm_cell_backward(zq, r.c2[mt][h][p], dh, dc_in, dz, dc_prev);
        if (!v) dz[0] = dz[1] = dz[2] = dz[3] = 0.0f;
        if (v && r.ok[mt][h]) {
          d_state[at(3 * H + u, n)] = dc_prev;
          PYMETA_UNROLL
          for (int q = 0; q < 4; ++q) ws[at(R.dz2 + q * H + u, n)] = dz[q];
        }
        z2[mt][2 * p][2 * h] = dz[0];
        z2[mt][2 * p][2 * h + 1] = dz[1];
        z2[mt][2 * p + 1][2 * h] = dz[2];
        z2[mt][2 * p + 1][2 * h + 1] = dz[3];
      }
    }
  }
  // d_state rows row0 .. row0 + H - 1 from a dh product (accumulator layout)
  auto store_dh = [&](const float (&dh)[MT][KT][4], int row0) {
    PYMETA_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      PYMETA_UNROLL
      for (int m = 0; m < KT; ++m) {
        PYMETA_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int p = 2 * m + (i & 1), h = i >> 1, u = 4 * p + t;
          if (u < H && r.ok[mt][h]) d_state[at(row0 + u, r.nl[mt][h])] = dh[mt][m][i];
        }
      }
    }
  };
  lstm_mma_product_t2<HB>(dh1, dh2p, z2, tfrag + S::kFrag, tfrag + 2 * S::kFrag, lane);
  store_dh(dh2p, 2 * H);  // complete: stored now, so that it is not live through layer 1

  // ---- layer 1: z1 back from the workspace; dz1 goes to z2's registers (dz2 is used up)
  float (&z1)[MT][NT][4] = z2;
  float dx[MT][2][2];
  PYMETA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    PYMETA_UNROLL
    for (int h = 0; h < 2; ++h) dx[mt][h][0] = dx[mt][h][1] = 0.0f;
  }
  PYMETA_UNROLL
  for (int p = 0; p < NP; ++p) {
    const int u = 4 * p + t;
    float wx[2][4];
    const float* cp = warp_opaque(cst);
    lstm_load4(cp + (4 * p + t) * S::kConst + 8, wx[0]);
    lstm_load4(cp + (4 * p + t) * S::kConst + 12, wx[1]);
    PYMETA_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      PYMETA_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int64_t n = r.nl[mt][h];
        const bool v = u < H;
        const float dh = dh1[mt][p >> 1][2 * h + (p & 1)] + (v ? d_new_state[at(u, n)] : 0.0f);
        const float dc_in = v ? d_new_state[at(H + u, n)] : 0.0f;
        // c1_prev read again here (an L1 / L2 hit) rather than kept in registers since the
        // recompute
        const float c1p = v ? state[at(H + u, n)] : 0.0f;
        float zq[4];
        PYMETA_UNROLL
        for (int q = 0; q < 4; ++q) zq[q] = v ? ws[at(R.dz1 + q * H + u, n)] : 0.0f;
        float dz[4], dc_prev;
        lstm_cell_backward(zq, c1p, dh, dc_in, dz, dc_prev);
        if (!v) dz[0] = dz[1] = dz[2] = dz[3] = 0.0f;
        if (v && r.ok[mt][h]) {
          d_state[at(H + u, n)] = dc_prev;
          PYMETA_UNROLL
          for (int q = 0; q < 4; ++q) ws[at(R.dz1 + q * H + u, n)] = dz[q];
        }
        PYMETA_UNROLL
        for (int q = 0; q < 4; ++q) {
          dx[mt][h][0] = dx[mt][h][0] + wx[0][q] * dz[q];
          dx[mt][h][1] = dx[mt][h][1] + wx[1][q] * dz[q];
        }
        z1[mt][2 * p][2 * h] = dz[0];
        z1[mt][2 * p][2 * h + 1] = dz[1];
        z1[mt][2 * p + 1][2 * h] = dz[2];
        z1[mt][2 * p + 1][2 * h + 1] = dz[3];
      }
    }
  }
  float dh1p[MT][KT][4];
  PYMETA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    PYMETA_UNROLL
    for (int m = 0; m < KT; ++m) {
      PYMETA_UNROLL
      for (int i = 0; i < 4; ++i) dh1p[mt][m][i] = 0.0f;
    }
  }
  lstm_mma_product_t<HB>(dh1p, z1, tfrag, lane);  // = dz1 W_hh1

  // ---- stores: d h1_prev, d grad
  store_dh(dh1p, 0);
  PYMETA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    PYMETA_UNROLL
    for (int h = 0; h < 2; ++h) {
      dx[mt][h][0] = lstm_mma_row_sum(dx[mt][h][0]);
      dx[mt][h][1] = lstm_mma_row_sum(dx[mt][h][1]);
    }
    // thread t = 0 stores row g, t = 1 row g + 8 (selects, not runtime array indices)
    const float dxm[2] = {t == 0 ? dx[mt][0][0] : dx[mt][1][0],
                          t == 0 ? dx[mt][0][1] : dx[mt][1][1]};
    const bool store = t == 0 ? r.ok[mt][0] : (t == 1 && r.ok[mt][1]);
    if (store) {
      const int64_t n = t == 0 ? r.nl[mt][0] : r.nl[mt][1];
      d_grad[n] = lstm_preprocess_backward(grad[n], s, dxm);
    }
  }
}

// ---- tensor-core weight gradients (float32, H <= 32, sm_80+) --------------------------------
// The C_q of lstm_opt_pairs, C_q[a, b] = sum_n A_q[a, n] B_q[b, n], for one chunk of
// coordinates per block of kLstmWgWarps warps. The block copies each workspace / state row it
// needs once per stage of kLstmWgKC coordinates into shared memory (cp.async, 4 bytes per lane,
// double-buffered; the CUDA-core wgrad_kernel reads each A row once per 32 B rows and each B
// row once per 32 A rows). Each warp then runs its m16n8 tiles of the C_q over the stage as
// 3xTF32 mma with k = coordinates. Shared rows (kLstmWgStride floats: the stage's
// coordinates + 4 of padding, so that the 32 lanes of a fragment load hit 32 banks):
//   A: dz1 rows [0, 4H), dz2 [4H, 8H), du 8H, zero rows up to 8H + 16 (the last m-tiles);
//   B_0 from rb[0]: x (n_in), h1_prev (H), a row of ones (the bias column);
//   B_1 from rb[1]: h1, h2_prev, ones;  B_2 from rb[2]: h2, ones;
//   each B_q padded with zero rows to whole n-tiles of 8.
// A tile's rows and columns past the C_q's end read other rows (or zeros); they only feed
// entries that are never stored. Every entry is summed in a fixed order (stages in order), so
// the partial sums are bitwise reproducible. A chunk with an entry whose tensor-core sum is not
// finite is summed again with the CUDA-core kernel's tiles (fp32, coordinate order), so Inf
// and NaN come out as there (3xTF32 alone would turn Inf * 1 into NaN, as lo(Inf) is NaN).
constexpr int kLstmWgKC = 32;
constexpr int kLstmWgStride = kLstmWgKC + 4;
constexpr int kLstmWgWarps = 8;
constexpr int kLstmWgMaxChunks = 512;  // chunks = 512 or fewer (at least 256 coordinates each)

struct LstmWgMmaPlan {
  LstmOptRows rows;  // of the workspace
  LstmOptPairs pairs;
  int H, n_in;
  int mt;            // m-tiles of 4H rows
  int nt[3], rb[3];  // n-tiles and first shared row of B_q
  int srows;         // shared rows per stage buffer
  int tiles;         // m16n8 tiles of all C_q: [0, mt nt0) C_0, then mt nt1 of C_1, nt2 of C_2
  int copies;        // rows copied per stage: the workspace's 10H + n_in + 1, h1_prev, h2_prev
  int64_t N, chunk, chunks, partial_offset;
};

PYMETA_HD LstmWgMmaPlan lstm_wg_mma_plan(int H, int n_in, int64_t N, int64_t partial_offset) {
  LstmWgMmaPlan p{};
  p.rows = lstm_opt_rows(H, n_in);
  p.pairs = lstm_opt_pairs(H, n_in);
  p.H = H;
  p.n_in = n_in;
  p.mt = (4 * H + 15) / 16;
  int next = 8 * H + 16;
  for (int q = 0; q < 3; ++q) {
    p.nt[q] = (p.pairs.mb[q] + 7) / 8;
    p.rb[q] = next;
    next += 8 * p.nt[q];
  }
  p.srows = next;
  p.tiles = p.mt * (p.nt[0] + p.nt[1]) + p.nt[2];
  p.copies = p.rows.total + 2 * H;
  p.N = N;
  // enough chunks to fill the GPU at N = 200k, few enough that their sum stays cheap
  const int64_t per = (N + kLstmWgMaxChunks - 1) / kLstmWgMaxChunks;
  p.chunk = per <= 256 ? 256 : (per + kLstmWgKC - 1) / kLstmWgKC * kLstmWgKC;
  p.chunks = (N + p.chunk - 1) / p.chunk;
  p.partial_offset = partial_offset;
  return p;
}

PYMETA_HD int lstm_wg_mma_buf_bytes(const LstmWgMmaPlan& p) {
  return p.srows * kLstmWgStride * int(sizeof(float));
}

// Compile-time bound on the tiles per warp, for hidden sizes up to HB (n_in <= 2).
template <int HB>
struct LstmWgMmaShape {
  static constexpr int kTiles =
      (4 * HB + 15) / 16 * ((HB + 3 + 7) / 8 + (2 * HB + 1 + 7) / 8) + (HB + 1 + 7) / 8;
  static constexpr int kPerWarp = (kTiles + kLstmWgWarps - 1) / kLstmWgWarps;
};

// Copied row r of a stage: its global row (returned) and its shared row.
PYMETA_HD const float* lstm_wg_mma_src(const LstmWgMmaPlan& p, int r, const float* ws,
                                       const float* state, int& srow) {
  const LstmOptRows& R = p.rows;
  const int H = p.H;
  if (r < R.total) {
    srow = r < R.x     ? r                      // dz1
           : r < R.h1  ? p.rb[0] + (r - R.x)    // x
           : r < R.dz2 ? p.rb[1] + (r - R.h1)   // h1
           : r < R.h2  ? 4 * H + (r - R.dz2)    // dz2
           : r < R.du  ? p.rb[2] + (r - R.h2)   // h2
                       : 8 * H;                 // du
    return ws + int64_t(r) * p.N;
  }
  r -= R.total;
  if (r < H) {  // h1_prev: state row r
    srow = p.rb[0] + p.n_in + r;
    return state + int64_t(r) * p.N;
  }
  r -= H;  // h2_prev: state row 2H + r
  srow = p.rb[1] + H + r;
  return state + int64_t(2 * H + r) * p.N;
}

// The value of shared row `row` if it is a constant one (ones or zeros), else false.
PYMETA_HD bool lstm_wg_mma_const_row(const LstmWgMmaPlan& p, int row, float& v) {
  const int H = p.H;
  const int ones[3] = {p.rb[0] + p.n_in + H, p.rb[1] + 2 * H, p.rb[2] + H};
  const int end[3] = {p.rb[1], p.rb[2], p.srows};
  if (row > 8 * H && row < p.rb[0]) { v = 0.0f; return true; }
  for (int q = 0; q < 3; ++q) {
    if (row == ones[q]) { v = 1.0f; return true; }
    if (row > ones[q] && row < end[q]) { v = 0.0f; return true; }
  }
  return false;
}

// Tile i: pair q, first shared row of its A rows and of its B rows, first entry (a0, b0).
struct LstmWgMmaTile {
  int q, arow, brow, a0, b0;
};
PYMETA_HD LstmWgMmaTile lstm_wg_mma_tile(const LstmWgMmaPlan& p, int i) {
  LstmWgMmaTile t;
  const int t0 = p.mt * p.nt[0], t1 = t0 + p.mt * p.nt[1];
  int m, n;
  if (i < t0) { t.q = 0; m = i / p.nt[0]; n = i % p.nt[0]; }
  else if (i < t1) { t.q = 1; m = (i - t0) / p.nt[1]; n = (i - t0) % p.nt[1]; }
  else { t.q = 2; m = 0; n = i - t1; }
  t.arow = (t.q == 0 ? 0 : t.q == 1 ? 4 * p.H : 8 * p.H) + 16 * m;
  t.brow = p.rb[t.q] + 8 * n;
  t.a0 = 16 * m;
  t.b0 = 8 * n;
  return t;
}

// Tile slot i of warp w: slots w per .. w per + per - 1 hold tiles in order; a slot past the
// last tile repeats tile 0 and is never stored (so the mma loop has no branches). Returns the
// tile; *stored says whether the slot's sums are stored.
PYMETA_HD int lstm_wg_mma_slot(const LstmWgMmaPlan& p, int w, int i, bool* stored) {
  const int per = (p.tiles + kLstmWgWarps - 1) / kLstmWgWarps;
  *stored = i < per && w * per + i < p.tiles;
  return *stored ? w * per + i : 0;
}

// Shared memory of one block: the two stage buffers (afterwards, the CUDA-core tiles of the
// non-finite fallback: 4 groups' As and Bs), then the copy table (per copied row, its global
// row start and its shared offset, written once per block).
constexpr int kLstmWgFallbackBytes =
    (32 * kLstmWgWarps / kLstmWgThreads) * 2 * kLstmWgTile * (kLstmWgTileK + 4) * int(sizeof(float));
PYMETA_HD int lstm_wg_mma_table_offset(const LstmWgMmaPlan& p) {  // in bytes
  const int bufs = 2 * lstm_wg_mma_buf_bytes(p);
  return bufs > kLstmWgFallbackBytes ? bufs : kLstmWgFallbackBytes;
}
PYMETA_HD int lstm_wg_mma_smem_bytes(const LstmWgMmaPlan& p) {
  return lstm_wg_mma_table_offset(p) + p.copies * int(sizeof(const float*) + sizeof(int));
}

// A chunk with a non-finite tensor-core sum is summed again on CUDA cores in fp32, coordinate
// by coordinate (the CUDA-core kernel's tiles; the block's 4 groups of 64 threads in step), so
// that Inf and NaN come out as an fp32 sum gives them: 3xTF32 turns Inf * 1 into NaN (lo(Inf)
// is NaN). Not inlined: its registers then don't weigh on the tensor-core loop.
#if defined(__CUDACC__)
static __device__ __noinline__
#else
inline
#endif
void lstm_wg_mma_fallback(const LstmWgMmaPlan& p, const float* ws, const float* state,
                          float* partials, float* sm, int64_t chunk_index, int tid) {
  const LstmWgradPlan wp = lstm_wgrad_plan(p.H, p.n_in, p.N, p.chunk, p.partial_offset);
  constexpr int kGroups = 32 * kLstmWgWarps / kLstmWgThreads;
  using Tile = float[kLstmWgTile][kLstmWgTileK + 4];
  Tile& As = reinterpret_cast<Tile*>(sm)[2 * (tid / kLstmWgThreads)];
  Tile& Bs = reinterpret_cast<Tile*>(sm)[2 * (tid / kLstmWgThreads) + 1];
  const int lt = tid % kLstmWgThreads;
  for (int r0 = 0; r0 < wp.tile_start[3]; r0 += kGroups) {
    const int tile = r0 + tid / kLstmWgThreads;
    const bool active = tile < wp.tile_start[3];
    const LstmWgradTile tl = lstm_wgrad_tile(wp, active ? tile : 0, chunk_index, p.N);
    LstmWgradRows<float> rows;
    lstm_wgrad_rows(wp, tl, ws, state, p.H, p.n_in, p.N, lt, rows);
    float sums[4][4];
    lstm_wgrad_zero(sums);
    for (int64_t n = tl.n_begin; n < tl.n_end; n += kLstmWgTileK) {  // the same for all groups
      lstm_wgrad_load(tl, rows, n, As, Bs, lt);
      block_sync();
      lstm_wgrad_accumulate(As, Bs, sums, lt);
      block_sync();
    }
    if (active) lstm_wgrad_store(wp, tl, sums, partials, lt);
  }
}

// One block (thread tid of 32 kLstmWgWarps) sums chunk `chunk_index` into its partial sums
// (the workspace at partial_offset + chunk_index P, laid out as lstm_opt_pairs says).
// sm: lstm_wg_mma_smem_bytes of shared memory, 16-byte aligned. vec: 16-byte copies (N % 4 ==
// 0 and ws, state 16-byte aligned), else 4-byte ones.
template <int HB>
PYMETA_WARP void lstm_wg_mma_block(const LstmWgMmaPlan& p, const float* ws, const float* state,
                                   float* partials, float* sm, int64_t chunk_index, int tid,
                                   bool vec) {
  constexpr int S = kLstmWgStride, TPW = LstmWgMmaShape<HB>::kPerWarp;
  constexpr int kThreads = 32 * kLstmWgWarps;
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int64_t n_begin = chunk_index * p.chunk;
  const int64_t n_end = n_begin + p.chunk < p.N ? n_begin + p.chunk : p.N;
  const int buf = p.srows * S;
  const float** src_row =
      reinterpret_cast<const float**>(reinterpret_cast<char*>(sm) + lstm_wg_mma_table_offset(p));
  int* dst_row = reinterpret_cast<int*>(src_row + p.copies);

  for (int r = tid; r < p.copies; r += kThreads) {
    int srow;
    src_row[r] = lstm_wg_mma_src(p, r, ws, state, srow);
    dst_row[r] = srow * S;
  }
  for (int e = tid; e < p.srows * kLstmWgKC; e += kThreads) {
    float v;
    const int row = e / kLstmWgKC, col = e % kLstmWgKC;
    if (lstm_wg_mma_const_row(p, row, v)) sm[row * S + col] = sm[buf + row * S + col] = v;
  }
  block_sync();  // the table, before the first copies read it
  // 16-byte copies: lanes 8j .. 8j + 7 copy row 4 w + j + 32 i, 4 coordinates each (a chunk
  // ends on a multiple of 32 or at N, so a 4-coordinate piece is all in or all out).
  // 4-byte copies: lane = coordinate, row w + 8 i. Past the chunk: zeros.
  auto issue = [&](int64_t n0, float* dst) {
    if (vec) {
      const int64_t n = n0 + 4 * (lane & 7);
      const bool in = n < n_end;
      for (int r = 4 * warp + (lane >> 3); r < p.copies; r += 4 * kLstmWgWarps)
        warp_cp_async<16>(dst + dst_row[r] + 4 * (lane & 7), in ? src_row[r] + n : src_row[r],
                          in ? 16 : 0);
    } else {
      const int64_t n = n0 + lane;
      const bool in = n < n_end;
      for (int r = warp; r < p.copies; r += kLstmWgWarps)
        warp_cp_async<4>(dst + dst_row[r] + lane, in ? src_row[r] + n : src_row[r], in ? 4 : 0);
    }
    warp_cp_async_commit();
  };

  int a_off[TPW], b_off[TPW];
  float acc[TPW][4];
  PYMETA_UNROLL
  for (int i = 0; i < TPW; ++i) {
    bool stored;
    const LstmWgMmaTile tl = lstm_wg_mma_tile(p, lstm_wg_mma_slot(p, warp, i, &stored));
    a_off[i] = (tl.arow + g) * S + t;
    b_off[i] = (tl.brow + g) * S + t;
    PYMETA_UNROLL
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }

  const int64_t stages = (n_end - n_begin + kLstmWgKC - 1) / kLstmWgKC;
  issue(n_begin, sm);
  for (int64_t st = 0; st < stages; ++st) {
    // always a group (empty past the last stage), so that wait<1> means "stage st landed"
    if (st + 1 < stages) issue(n_begin + (st + 1) * kLstmWgKC, sm + ((st + 1) & 1) * buf);
    else warp_cp_async_commit();
    warp_cp_async_wait<1>();
    block_sync();  // every thread's copies of stage st have landed (and the constants)
    const float* b = sm + (st & 1) * buf;
    PYMETA_UNROLL
    for (int k0 = 0; k0 < kLstmWgKC; k0 += 8) {
      PYMETA_UNROLL
      for (int i = 0; i < TPW; ++i) {
        const float* ap = b + a_off[i] + k0;
        const float* bp = b + b_off[i] + k0;
        const float av[4] = {ap[0], ap[8 * S], ap[4], ap[8 * S + 4]};
        const float bv[2] = {bp[0], bp[4]};
        uint32_t ahi[4], alo[4], bhi[2], blo[2];
        PYMETA_UNROLL
        for (int j = 0; j < 4; ++j) {
          const float hi = tf32_hi(av[j]);
          ahi[j] = f32_bits(hi);
          alo[j] = f32_bits(av[j] - hi);
        }
        PYMETA_UNROLL
        for (int j = 0; j < 2; ++j) {
          const float hi = tf32_hi(bv[j]);
          bhi[j] = f32_bits(hi);
          blo[j] = f32_bits(bv[j] - hi);
        }
        warp_mma_tf32(acc[i], alo, bhi);  // small terms first
        warp_mma_tf32(acc[i], ahi, blo);
        warp_mma_tf32(acc[i], ahi, bhi);
      }
    }
    block_sync();  // before the next iteration's copies refill this buffer
  }

  // the accumulator layout of m16n8: acc[j] is entry (a0 + g + 8 (j >> 1), b0 + 2t + (j & 1))
  auto entry = [&](const LstmWgMmaTile& tl, int j, int& a, int& bb) {
    a = tl.a0 + g + 8 * (j >> 1);
    bb = tl.b0 + 2 * t + (j & 1);
    return a < p.pairs.ma[tl.q] && bb < p.pairs.mb[tl.q];
  };
  bool bad = false;  // an entry whose tensor-core sum is Inf or NaN
  PYMETA_UNROLL
  for (int i = 0; i < TPW; ++i) {
    bool stored;
    const LstmWgMmaTile tl = lstm_wg_mma_tile(p, lstm_wg_mma_slot(p, warp, i, &stored));
    PYMETA_UNROLL
    for (int j = 0; j < 4; ++j) {
      int a, bb;
      if (stored && entry(tl, j, a, bb) && !(acc[i][j] - acc[i][j] == 0.0f)) bad = true;
    }
  }
  if (block_sync_or(bad)) {
    lstm_wg_mma_fallback(p, ws, state, partials, sm, chunk_index, tid);
    return;
  }
  float* part = partials + p.partial_offset + chunk_index * p.pairs.off[3];
  PYMETA_UNROLL
  for (int i = 0; i < TPW; ++i) {
    bool stored;
    const LstmWgMmaTile tl = lstm_wg_mma_tile(p, lstm_wg_mma_slot(p, warp, i, &stored));
    if (!stored) continue;
    PYMETA_UNROLL
    for (int j = 0; j < 4; ++j) {
      int a, bb;
      if (entry(tl, j, a, bb)) part[p.pairs.off[tl.q] + int64_t(a) * p.pairs.mb[tl.q] + bb] = acc[i][j];
    }
  }
}

}  // namespace pymeta
