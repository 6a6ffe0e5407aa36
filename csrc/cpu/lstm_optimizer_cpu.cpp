// CPU kernels of lstm_optimizer_step: at::parallel_for over consecutive coordinates, running
// the shared math of pymeta/lstm_optimizer.h on Lanes<T, L> (SIMD across coordinates): L fills
// a 64-byte (AVX-512) or 32-byte (AVX2) register where the CPU has one (functions compiled for
// that target, chosen once per process), a 16-byte one otherwise. The forward works in chunks
// of a few lane vectors, its gate products as register-tiled matrix products fused with the
// header's cell math; the backward likewise (recompute, then dh = W^T dz as tiled products
// around the header's lstm_cell_backward).
// The backward works in fixed blocks of kCpuBlock coordinates: each block keeps its
// workspace rows in a small local buffer (cache-resident) and computes its weight-gradient
// partial sums as register-tiled matrix products, added in order into its group's partial
// sums in the shared workspace (cpu_group_blocks blocks per group, a function of N);
// a final pass sums the groups in order (bitwise the same for any thread count).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "pymeta/lstm_optimizer.h"

// Fully unrolled small loops over a tile's vectors / gates: their arrays then live in
// registers (a loop-indexed array stays on the stack, copied in 16-byte pieces).
#define PYMETA_CPU_UNROLL _Pragma("GCC unroll 16")

namespace pymeta {
namespace {

// One 16-byte SIMD register per value (SSE2, the x86-64 baseline) in code compiled for the
// default target: wider vector types would be lowered through memory there. The wider paths
// live in target-specific functions (below).
template <typename T> struct LaneCount { static constexpr int value = 16 / sizeof(T); };

// Coordinates per block of the backward's deterministic weight-gradient reduction. Blocks and
// groups are functions of N only (not of the thread count), so the sums' order, and the
// result's bits, are the same for any thread count.
constexpr int64_t kCpuBlock = 128;
// The partial sums are kept per group of this many consecutive blocks (added in block order),
// and the groups are summed in order. Up to 16 blocks per group once there are 64+ groups: the
// partials (80 bytes per coordinate at H = 20 with a group per block, a quarter of the state,
// all freshly allocated per call) then take 1/16 of that, while small N keeps a group per
// block to spread over threads.
int64_t cpu_group_blocks(int64_t N) {
  const int64_t blocks = (N + kCpuBlock - 1) / kCpuBlock;
  const int64_t g = blocks / 64;
  return g < 1 ? 1 : (g > 16 ? 16 : g);
}

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  if (dtype == DType::Float64) f(double{});
  else f(float{});
}

// On the CPU the loops over hidden units run to the runtime H; HMAX only sizes the arrays.
template <typename F>
void dispatch_hidden(int H, F&& f) {
  f(std::integral_constant<int, kLstmOptMaxHidden>{});
}

template <typename T>
LstmOptWeights<T> weights_of(const void* const w[10]) {
  return {static_cast<const T*>(w[0]), static_cast<const T*>(w[1]), static_cast<const T*>(w[2]),
          static_cast<const T*>(w[3]), static_cast<const T*>(w[4]), static_cast<const T*>(w[5]),
          static_cast<const T*>(w[6]), static_cast<const T*>(w[7]), static_cast<const T*>(w[8]),
          static_cast<const T*>(w[9])};
}

template <typename T>
LstmOptScalars<T> scalars_of(const LstmOptLaunch& L) {
  LstmOptScalars<T> s;
  s.H = L.H;
  s.n_in = L.n_in;
  s.preproc = L.preproc;
  s.inv_p = static_cast<T>(1.0 / L.p);
  s.exp_p = static_cast<T>(std::exp(L.p));
  s.threshold = static_cast<T>(std::exp(-L.p));
  s.out_scale = static_cast<T>(L.out_scale);
  return s;
}

// sum_n a[n] * b[n] (b == nullptr: sum_n a[n]) over n < count, with 8 independent partial
// sums folded in a fixed order: vectorizes without reassociating, and is deterministic.
template <typename T>
T dot(const T* a, const T* b, int64_t count) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t n = 0;
  if (b) {
    for (; n + 8 <= count; n += 8)
      for (int l = 0; l < 8; ++l) acc[l] += a[n + l] * b[n + l];
    for (; n < count; ++n) acc[n % 8] += a[n] * b[n];
  } else {
    for (; n + 8 <= count; n += 8)
      for (int l = 0; l < 8; ++l) acc[l] += a[n + l];
    for (; n < count; ++n) acc[n % 8] += a[n];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}


// ---- the weight-gradient block products ------------------------------------------------------
// C^T[b, a] = sum_{n < cnt} At[n, a] * B_b[n], for a < lda (a multiple of 64 bytes' worth of T;
// At is A transposed, coordinate-major, zero past the real rows) and b < nb. Register tiles of
// MRV vectors of A (along a) times NR rows of B (broadcast), accumulated over n in order:
// every entry is one sequential sum over n, whatever the tiling, ISA path or thread count.
// The same source is compiled for AVX-512, AVX2+FMA and the SSE2 baseline; the path is chosen
// once per process from the CPU (so results are reproducible on one machine).
#define PYMETA_WGRAD_KERNELS(NS, VB, MRVMAX, NRV)                                               \
  namespace NS {                                                                              \
  constexpr int kNR = NRV;                                                                    \
  template <typename T, int MRV>                                                              \
  void tile(const T* at, int64_t lda, int cnt, const T* const* bp, T* ct, int64_t a0) {        \
    constexpr int VW = VB / sizeof(T);                                                        \
    typedef T vec __attribute__((vector_size(VB)));                                           \
    vec acc[MRV][NRV];                                                                        \
    for (int i = 0; i < MRV; ++i)                                                             \
      for (int j = 0; j < NRV; ++j) acc[i][j] = vec{};                                        \
    const T* a = at + a0;                                                                     \
    for (int n = 0; n < cnt; ++n, a += lda) {                                                 \
      vec av[MRV];                                                                            \
      for (int i = 0; i < MRV; ++i) std::memcpy(&av[i], a + i * VW, VB);                      \
      for (int j = 0; j < NRV; ++j) {                                                         \
        const vec bv = vec{} + bp[j][n];                                                      \
        for (int i = 0; i < MRV; ++i) acc[i][j] += av[i] * bv;                                \
      }                                                                                       \
    }                                                                                         \
    for (int j = 0; j < NRV; ++j)                                                             \
      for (int i = 0; i < MRV; ++i) std::memcpy(ct + j * lda + a0 + i * VW, &acc[i][j], VB);   \
  }                                                                                           \
  template <typename T>                                                                       \
  void products(const T* at, int64_t lda, int cnt, const T* const* brows, int nb, T* ct) {    \
    constexpr int VW = VB / sizeof(T);                                                        \
    const int64_t nvec = lda / VW;                                                            \
    for (int b0 = 0; b0 < nb; b0 += NRV) {                                                    \
      T* c = ct + int64_t(b0) * lda;                                                          \
      int64_t v = 0;                                                                          \
      for (; v + MRVMAX <= nvec; v += MRVMAX) tile<T, MRVMAX>(at, lda, cnt, brows + b0, c, v * VW); \
      for (; v < nvec; ++v) tile<T, 1>(at, lda, cnt, brows + b0, c, v * VW);                  \
    }                                                                                         \
  }                                                                                           \
  }  // namespace NS

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma")
#pragma GCC optimize("fp-contract=fast")
PYMETA_WGRAD_KERNELS(wgrad_avx512, 64, 5, 4)
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=fast")
PYMETA_WGRAD_KERNELS(wgrad_avx2, 32, 2, 5)
#pragma GCC pop_options
#define PYMETA_WGRAD_X86 1
#endif
PYMETA_WGRAD_KERNELS(wgrad_base, 16, 2, 5)
#undef PYMETA_WGRAD_KERNELS

enum class WgradIsa { Base, Avx2, Avx512 };
WgradIsa wgrad_isa() {
#ifdef PYMETA_WGRAD_X86
  static const WgradIsa isa = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
                                  ? WgradIsa::Avx512
                              : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
                                  ? WgradIsa::Avx2
                                  : WgradIsa::Base;
  return isa;
#else
  return WgradIsa::Base;
#endif
}

// B rows per register tile of the path (nb must be a multiple of it).
int wgrad_nr(WgradIsa isa) {
#ifdef PYMETA_WGRAD_X86
  if (isa == WgradIsa::Avx512) return wgrad_avx512::kNR;
  if (isa == WgradIsa::Avx2) return wgrad_avx2::kNR;
#endif
  return wgrad_base::kNR;
}

// brows: nb rows, nb a multiple of the path's NR (the caller pads with rows of zeros).
template <typename T>
void wgrad_products(WgradIsa isa, const T* at, int64_t lda, int cnt, const T* const* brows,
                    int nb, T* ct) {
#ifdef PYMETA_WGRAD_X86
  if (isa == WgradIsa::Avx512) return wgrad_avx512::products(at, lda, cnt, brows, nb, ct);
  if (isa == WgradIsa::Avx2) return wgrad_avx2::products(at, lda, cnt, brows, nb, ct);
#endif
  wgrad_base::products(at, lda, cnt, brows, nb, ct);
}


// A (ma rows of cnt values, rows `stride` apart) -> A^T (cnt rows of lda), in VW x VW
// register transposes of 16-byte vectors (VW = 4 floats / 2 doubles; SSE2 has them): the
// scalar copy took ~12% of the backward, one load and one strided store per value.
template <typename T>
void transpose_rows(const T* a, int64_t stride, int ma, int64_t cnt, T* at, int64_t lda) {
  constexpr int VW = 16 / sizeof(T);
  typedef T v16 __attribute__((vector_size(16)));
  int r = 0;
  for (; r + VW <= ma; r += VW) {
    int64_t n = 0;
    for (; n + VW <= cnt; n += VW) {
      v16 x[VW], y[VW];
      for (int i = 0; i < VW; ++i) std::memcpy(&x[i], a + (r + i) * stride + n, 16);
      if constexpr (VW == 4) {
        const v16 t0 = __builtin_shufflevector(x[0], x[1], 0, 4, 1, 5);
        const v16 t1 = __builtin_shufflevector(x[0], x[1], 2, 6, 3, 7);
        const v16 t2 = __builtin_shufflevector(x[2], x[3], 0, 4, 1, 5);
        const v16 t3 = __builtin_shufflevector(x[2], x[3], 2, 6, 3, 7);
        y[0] = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
        y[1] = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
        y[2] = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
        y[3] = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
      } else {
        y[0] = __builtin_shufflevector(x[0], x[1], 0, 2);
        y[1] = __builtin_shufflevector(x[0], x[1], 1, 3);
      }
      for (int i = 0; i < VW; ++i) std::memcpy(at + (n + i) * lda + r, &y[i], 16);
    }
    for (; n < cnt; ++n)
      for (int i = 0; i < VW; ++i) at[n * lda + r + i] = a[(r + i) * stride + n];
  }
  for (; r < ma; ++r)
    for (int64_t n = 0; n < cnt; ++n) at[n * lda + r] = a[r * stride + n];
}

// One lane vector of row `row` (rows ld elements apart), lane vector v of the chunk.
template <typename T, int LN>
inline Lanes<T, LN> load_lanes(const T* p, int64_t ld, int64_t row, int v) {
  Lanes<T, LN> r;
  std::memcpy(&r.v, p + row * ld + v * LN, sizeof(r.v));
  return r;
}
template <typename T, int LN>
inline void store_lanes(T* p, int64_t ld, int64_t row, int v, const Lanes<T, LN>& x) {
  std::memcpy(p + row * ld + v * LN, &x.v, sizeof(x.v));
}

// The gate pre-activations of unit j before the products: layer 1 bias + w_ih1 x, layer 2 bias.
template <typename T, int LN, int NV>
inline void gate_init1(Lanes<T, LN> (&z)[4][NV], const LstmOptWeights<T>& W, int H, int n_in,
                       int j, const Lanes<T, LN> (&x)[NV][2]) {
  for (int q = 0; q < 4; ++q) {
    const int r = q * H + j;
    const T b = W.b_ih1[r] + W.b_hh1[r];
    for (int v = 0; v < NV; ++v) {
      Lanes<T, LN> acc = Lanes<T, LN>(b);
      for (int i = 0; i < 2; ++i)
        if (i < n_in) acc = acc + W.w_ih1[r * n_in + i] * x[v][i];
      z[q][v] = acc;
    }
  }
}
template <typename T, int LN, int NV>
inline void gate_init2(Lanes<T, LN> (&z)[4][NV], const LstmOptWeights<T>& W, int H, int j) {
  for (int q = 0; q < 4; ++q)
    for (int v = 0; v < NV; ++v) z[q][v] = Lanes<T, LN>(W.b_ih2[q * H + j] + W.b_hh2[q * H + j]);
}

// z[q][v] += sum_k w_q[k] in[k][v] for the 4 gate rows w_q = w + (q H + j) H, k = 0 .. H-1
// (input rows ld elements apart): the order of lstm_gate_dots.
template <typename T, int LN, int NV>
inline void gate_tile(Lanes<T, LN> (&z)[4][NV], const T* w, int H, int j, const T* in,
                      int64_t ld) {
  const T* w0 = w + int64_t(j) * H;
  const int64_t gate = int64_t(H) * H;
  for (int k = 0; k < H; ++k) {
    Lanes<T, LN> a[NV];
    for (int v = 0; v < NV; ++v) a[v] = load_lanes<T, LN>(in, ld, k, v);
    for (int q = 0; q < 4; ++q) {
      const T wq = w0[q * gate + k];
      for (int v = 0; v < NV; ++v) z[q][v] = z[q][v] + wq * a[v];
    }
  }
}

// The backward's products dh = W^T dz over a chunk: out[k][:] = init[k][:] (0 without init)
// + sum_r w[r H + k] dz[r][:], r = q H + j in the order j = 0 .. H-1, q = 0 .. 3 (that of
// lstm_opt_backward_coord). A register tile holds KT outputs times NV lane vectors; each dz
// row (cache-resident workspace) is loaded once per tile, each weight broadcast once per NV.
template <typename T, int LN, int NV, int KT>
inline void dh_tile(const T* w, int H, int k0, const T* dz, int64_t ldz, const T* init,
                    int64_t ldi, T* out, int64_t ldo) {
  using V = Lanes<T, LN>;
  V acc[KT][NV];
  for (int t = 0; t < KT; ++t)
    for (int v = 0; v < NV; ++v)
      acc[t][v] = init ? load_lanes<T, LN>(init, ldi, k0 + t, v) : V(T(0));
  for (int j = 0; j < H; ++j)
    for (int q = 0; q < 4; ++q) {
      const int64_t r = int64_t(q) * H + j;
      V d[NV];
      for (int v = 0; v < NV; ++v) d[v] = load_lanes<T, LN>(dz, ldz, r, v);
      const T* wr = w + r * H + k0;
      for (int t = 0; t < KT; ++t) {
        const T wt = wr[t];
        for (int v = 0; v < NV; ++v) acc[t][v] = acc[t][v] + wt * d[v];
      }
    }
  for (int t = 0; t < KT; ++t)
    for (int v = 0; v < NV; ++v) store_lanes<T, LN>(out, ldo, k0 + t, v, acc[t][v]);
}
template <typename T, int LN, int NV>
inline void dh_products(const T* w, int H, const T* dz, int64_t ldz, const T* init, int64_t ldi,
                        T* out, int64_t ldo) {
  constexpr int KT = 4;
  int k0 = 0;
  for (; k0 + KT <= H; k0 += KT) dh_tile<T, LN, NV, KT>(w, H, k0, dz, ldz, init, ldi, out, ldo);
  for (; k0 < H; ++k0) dh_tile<T, LN, NV, 1>(w, H, k0, dz, ldz, init, ldi, out, ldo);
}

// Software prefetches of the next chunk's state rows (rows `ld` bytes apart, `bytes` long each,
// not necessarily line-aligned), issued a few rows at a time between the gate tiles: a burst of
// all 4H rows at once would stall on the few outstanding-miss slots, spread out they overlap
// with the arithmetic. Every line a row's span touches is prefetched once.
struct Prefetch {
  const char* p = nullptr;
  int64_t ld = 0;
  int64_t bytes = 0;
  void rows(int r0, int count) const {
    if (!p) return;
    for (int r = r0; r < r0 + count; ++r) {
      const uintptr_t a = reinterpret_cast<uintptr_t>(p + r * ld);
      for (uintptr_t q = a & ~uintptr_t(63); q < a + bytes; q += 64)
        __builtin_prefetch(reinterpret_cast<const void*>(q), 0, 2);
    }
  }
};

// The backward's next-chunk prefetches: the 12H + 3 rows a chunk touches (state, d_new_state,
// d_state: 4H each, then grad, d_update, d_grad), issued a few rows at a time between the
// chunk's unit loops (4H of them, 3 rows each) rather than all at the top of the chunk: ~970
// lines in one burst waited on the outstanding-miss slots (perf put ~12% of the backward on
// the burst; spread, the op took 52-55 instead of 59-66 ms at N = 100k, 1 thread). Issuing
// them all in the recompute's loops (6 rows each) measured in between (57-66 ms).
template <typename T>
struct BackwardPrefetch {
  const T* rows3[3] = {nullptr, nullptr, nullptr};  // state, d_new_state, d_state at column m
  const T* singles[3] = {nullptr, nullptr, nullptr};  // grad, d_update, d_grad at column m
  int64_t ld = 0;
  int r4 = 0, bytes = 0, next = 0;
  void step(int count) {
    if (!rows3[0]) return;
    const int total = 3 * r4 + 3;
    for (int end = std::min(next + count, total); next < end; ++next) {
      const int k = next < 3 * r4 ? next / r4 : 3;
      const T* p = k < 3 ? rows3[k] + int64_t(next - k * r4) * ld : singles[next - 3 * r4];
      const uintptr_t a = reinterpret_cast<uintptr_t>(p);
      for (uintptr_t q = a & ~uintptr_t(63); q < a + bytes; q += 64) {
        if (k == 2 || next == 3 * r4 + 2) __builtin_prefetch(reinterpret_cast<const void*>(q), 1, 2);
        else __builtin_prefetch(reinterpret_cast<const void*>(q), 0, 2);
      }
    }
  }
};

// ---- the forward: column chunks, register tiles over the shared cell math --------------------
// The gate pre-activations of CW = LN * NV consecutive coordinates are small matrix products,
// Z[4H, CW] = W_hh1 h1[:, chunk] + b + W_ih1 x (layer 1), W_ih2 h1' + W_hh2 h2 + b (layer 2),
// whose input rows are contiguous runs of the feature-major state. A register tile holds the
// 4 gates of one unit times NV lane vectors (16 accumulators on AVX-512): each weight is
// broadcast once per NV vectors, and the 4 NV independent sums hide the FMA latency. The tile
// then goes straight through the header's cell math (lstm_cell_lanes for float: the tile's NV
// vectors at once; lstm_cell on each vector for double) and is stored to
// new_state. Every entry is summed in the order of lstm_opt_forward_coord (bias, x, then k =
// 0 .. H-1), so a coordinate's result depends neither on the chunking nor on the thread count.
// Rows of one chunk sit N elements apart, 4H input and 4H output rows: too many streams for the
// hardware prefetchers, so the loop prefetches the next chunk's lines itself.
template <typename T, int LN, int NV>
inline void forward_chunk(const LstmOptWeights<T>& W, const LstmOptScalars<T>& s, const T* grad,
                          const T* state, T* update, T* new_state, int64_t ld,
                          const Prefetch& pf = Prefetch{}) {
  using V = Lanes<T, LN>;
  const int H = s.H, n_in = s.n_in;
  auto load = [&](const T* p, int64_t row, int v) { return load_lanes<T, LN>(p, ld, row, v); };
  auto store = [&](T* p, int64_t row, int v, const V& x) { store_lanes<T, LN>(p, ld, row, v, x); };
  // The cell of unit j (rows j, H + j of the layer's h, c in state / new_state at row0).
  auto cell = [&](V (&z)[4][NV], int64_t row0, int j, V* out) {
    V cp[NV], c[NV], h[NV];
    PYMETA_CPU_UNROLL for (int v = 0; v < NV; ++v) cp[v] = load(state, row0 + H + j, v);
    if constexpr (std::is_same<T, float>::value) {
      lstm_cell_lanes(z, cp, c, h);  // all NV vectors at once, 3 divisions
    } else {
      for (int v = 0; v < NV; ++v) {
        const V zv[4] = {z[0][v], z[1][v], z[2][v], z[3][v]};
        lstm_cell(zv, cp[v], c[v], h[v]);
      }
    }
    PYMETA_CPU_UNROLL for (int v = 0; v < NV; ++v) {
      store(new_state, row0 + j, v, h[v]);
      store(new_state, row0 + H + j, v, c[v]);
      if (out) out[v] = out[v] + W.w_out[j] * h[v];
    }
  };

  V x[NV][2];
  PYMETA_CPU_UNROLL for (int v = 0; v < NV; ++v) lstm_preprocess(load(grad, 0, v), s, x[v]);
  for (int j = 0; j < H; ++j) {
    pf.rows(2 * j, 2);
    V z[4][NV];
    gate_init1(z, W, H, n_in, j, x);
    gate_tile(z, W.w_hh1, H, j, state, ld);
    cell(z, 0, j, nullptr);
  }
  V out[NV];
  PYMETA_CPU_UNROLL for (int v = 0; v < NV; ++v) out[v] = V(W.b_out[0]);
  for (int j = 0; j < H; ++j) {
    pf.rows(2 * H + 2 * j, 2);
    V z[4][NV];
    gate_init2(z, W, H, j);
    gate_tile(z, W.w_ih2, H, j, new_state, ld);                  // h1 (new)
    gate_tile(z, W.w_hh2, H, j, state + int64_t(2) * H * ld, ld);  // h2
    cell(z, 2 * H, j, out);
  }
  PYMETA_CPU_UNROLL for (int v = 0; v < NV; ++v) store(update, 0, v, out[v] * s.out_scale);
}

// One row segment of the state into / out of a staged chunk: a copy, or for a bfloat16 state
// (St = uint16_t) the conversion to / from float32 (vectorized by the compiler).
template <typename T, typename St>
inline void stage_in(T* dst, const St* src, int64_t cnt) {
  if constexpr (std::is_same<T, St>::value) {
    std::memcpy(dst, src, cnt * sizeof(T));
  } else {
    for (int64_t i = 0; i < cnt; ++i) dst[i] = state_ld(src[i]);
  }
}
template <typename T, typename St>
inline void stage_out(St* dst, const T* src, int64_t cnt) {
  if constexpr (std::is_same<T, St>::value) {
    std::memcpy(dst, src, cnt * sizeof(T));
  } else {
    // 16 at a time as explicit vectors (the auto-vectorized loop used 4-wide ones and was a
    // quarter of the bfloat16 forward), the header's rounding on each
    typedef uint32_t u32x16 __attribute__((vector_size(64)));
    typedef uint16_t u16x16 __attribute__((vector_size(32)));
    int64_t i = 0;
    for (; i + 16 <= cnt; i += 16) {
      u32x16 u;
      std::memcpy(&u, src + i, sizeof(u));
      f32_bits_to_bf16_bits(u);
      const u16x16 b = __builtin_convertvector(u, u16x16);
      std::memcpy(dst + i, &b, sizeof(b));
    }
    for (; i < cnt; ++i) state_st(dst[i], src[i]);
  }
}

// Chunks c0 .. c1 - 1 of the forward. A chunk runs through local (cache-resident) copies of
// its inputs and outputs where it runs past N (zero-padded: zero grads and states are harmless
// inputs, their results are dropped) and, for a bfloat16 state (St = uint16_t), always: the
// state is converted on the way in and new_state rounded on the way out, so a coordinate's
// results are those of the float32 state's upcast values, bit for bit.
template <typename T, int LN, int NV, typename St>
inline void forward_chunks(const LstmOptWeights<T>& W, const LstmOptScalars<T>& s, const T* grad,
                           const St* state, T* update, St* new_state, int64_t N, int64_t c0,
                           int64_t c1) {
  constexpr int CW = LN * NV;
  constexpr bool kConvert = !std::is_same<T, St>::value;
  const int64_t rows = 4 * int64_t(s.H);
  std::vector<T> in, out;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t n = c * CW;
    const int64_t cnt = std::min<int64_t>(CW, N - n);
    // The next chunk's inputs, to L2 (prefetching the outputs too measured no better).
    Prefetch pf;
    if (c + 1 < c1 && n + 2 * CW <= N) {
      const int64_t m = n + CW;
      pf = Prefetch{reinterpret_cast<const char*>(state + m), N * int64_t(sizeof(St)),
                    CW * int64_t(sizeof(St))};
      for (int l = 0; l < CW; l += 64 / int(sizeof(T))) __builtin_prefetch(grad + m + l, 0, 2);
    }
    if (kConvert || cnt < CW) {
      if (in.empty()) {
        in.assign((rows + 1) * CW, T(0));
        out.resize((rows + 1) * CW);
      }
      if (cnt < CW) std::fill(in.begin(), in.end(), T(0));
      for (int64_t r = 0; r < rows; ++r) stage_in(&in[r * CW], state + r * N + n, cnt);
      std::memcpy(&in[rows * CW], grad + n, cnt * sizeof(T));
      forward_chunk<T, LN, NV>(W, s, &in[rows * CW], in.data(), &out[rows * CW], out.data(), CW, pf);
      for (int64_t r = 0; r < rows; ++r) stage_out(new_state + r * N + n, &out[r * CW], cnt);
      std::memcpy(update + n, &out[rows * CW], cnt * sizeof(T));
      continue;
    }
    if constexpr (!kConvert)
      forward_chunk<T, LN, NV>(W, s, grad + n, state + n, update + n, new_state + n, N, pf);
  }
}

// The backward's per-coordinate part over one chunk of CW = LN * NV coordinates (columns of
// the inputs ld apart, of the block's workspace rows wld apart): the recomputed forward as the
// forward's gate tiles (the gate activations to the dz rows of the workspace, tanh(c) to a
// local buffer, x, h1, h2 to the workspace), then per layer the header's
// lstm_cell_backward_acts over the chunk (dz to the workspace; no second pass of the
// transcendental math) followed by the products dh = W^T dz as register tiles (dh_products).
// Every sum runs in the order of lstm_opt_backward_coord, so results depend neither on the
// chunking nor on the thread count.
template <typename T, int LN, int NV>
inline void backward_chunk(const LstmOptWeights<T>& W, const LstmOptScalars<T>& s, const T* grad,
                           const T* state, const T* d_update, const T* d_new_state, T* d_grad,
                           T* d_state, T* ws, int64_t ld, int64_t wld, BackwardPrefetch<T>& pf) {
  using V = Lanes<T, LN>;
  constexpr int CW = LN * NV;
  const int H = s.H, n_in = s.n_in;
  const LstmOptRows R = lstm_opt_rows(H, n_in);
  auto load = [&](const T* p, int64_t row, int v) { return load_lanes<T, LN>(p, ld, row, v); };
  auto store = [&](T* p, int64_t row, int v, const V& x) { store_lanes<T, LN>(p, ld, row, v, x); };
  auto wload = [&](int64_t row, int v) { return load_lanes<T, LN>(ws, wld, row, v); };
  auto wstore = [&](int64_t row, int v, const V& x) { store_lanes<T, LN>(ws, wld, row, v, x); };

  V g[NV], x[NV][2];
  PYMETA_CPU_UNROLL for (int v = 0; v < NV; ++v) {
    g[v] = load(grad, 0, v);
    lstm_preprocess(g[v], s, x[v]);
    for (int i = 0; i < n_in; ++i) wstore(R.x + i, v, x[v][i]);
  }
  // tanh(c) of both layers' cells, [layer][unit][CW]
  T tcs[2][kLstmOptMaxHidden * CW];
  auto cells = [&](V (&z)[4][NV], int layer, int j, int c_row, int a_row, int h_row) {
    V cp[NV], a[4][NV], c[NV], tc[NV], h[NV];
    PYMETA_CPU_UNROLL for (int v = 0; v < NV; ++v) cp[v] = load(state, c_row + j, v);
    if constexpr (std::is_same<T, float>::value) {
      lstm_cell_acts_lanes(z, cp, a, c, tc, h);  // the NV vectors' chains side by side
    } else {
      for (int v = 0; v < NV; ++v) {
        const V zv[4] = {z[0][v], z[1][v], z[2][v], z[3][v]};
        V av[4];
        lstm_cell_acts(zv, cp[v], av, c[v], tc[v], h[v]);
        for (int q = 0; q < 4; ++q) a[q][v] = av[q];
      }
    }
    PYMETA_CPU_UNROLL for (int v = 0; v < NV; ++v) {
      PYMETA_CPU_UNROLL for (int q = 0; q < 4; ++q) wstore(a_row + q * H + j, v, a[q][v]);
      store_lanes<T, LN>(tcs[layer], CW, j, v, tc[v]);
      wstore(h_row + j, v, h[v]);
    }
  };
  // forward, layer 1
  for (int j = 0; j < H; ++j) {
    pf.step(3);
    V z[4][NV];
    gate_init1(z, W, H, n_in, j, x);
    gate_tile(z, W.w_hh1, H, j, state, ld);
    cells(z, 0, j, H, R.dz1, R.h1);
  }
  // forward, layer 2
  for (int j = 0; j < H; ++j) {
    pf.step(3);
    V z[4][NV];
    gate_init2(z, W, H, j);
    gate_tile(z, W.w_ih2, H, j, ws + int64_t(R.h1) * wld, wld);
    gate_tile(z, W.w_hh2, H, j, state + int64_t(2) * H * ld, ld);
    cells(z, 1, j, 3 * H, R.dz2, R.h2);
  }

  // backward, head and layer 2
  V du[NV];
  PYMETA_CPU_UNROLL for (int v = 0; v < NV; ++v) {
    du[v] = load(d_update, 0, v) * s.out_scale;
    wstore(R.du, v, du[v]);
  }
  for (int j = 0; j < H; ++j) {
    pf.step(3);
    PYMETA_CPU_UNROLL for (int v = 0; v < NV; ++v) {
      V a[4], dz[4], dc_prev;
      PYMETA_CPU_UNROLL for (int q = 0; q < 4; ++q) a[q] = wload(R.dz2 + q * H + j, v);
      const V dh = du[v] * W.w_out[j] + load(d_new_state, 2 * H + j, v);
      lstm_cell_backward_acts(a, load_lanes<T, LN>(tcs[1], CW, j, v), load(state, 3 * H + j, v),
                              dh, load(d_new_state, 3 * H + j, v), dz, dc_prev);
      store(d_state, 3 * H + j, v, dc_prev);
      PYMETA_CPU_UNROLL for (int q = 0; q < 4; ++q) wstore(R.dz2 + q * H + j, v, dz[q]);
    }
  }
  // d h1(new) = d_new_state h1 rows + W_ih2^T dz2 (local), d h2_prev = W_hh2^T dz2
  T dh1[kLstmOptMaxHidden * CW];
  const T* dz2 = ws + int64_t(R.dz2) * wld;
  dh_products<T, LN, NV>(W.w_ih2, H, dz2, wld, d_new_state, ld, dh1, CW);
  dh_products<T, LN, NV>(W.w_hh2, H, dz2, wld, nullptr, 0, d_state + int64_t(2) * H * ld, ld);

  // backward, layer 1
  V dx[NV][2];
  PYMETA_CPU_UNROLL for (int v = 0; v < NV; ++v) dx[v][0] = dx[v][1] = V(T(0));
  for (int j = 0; j < H; ++j) {
    pf.step(3);
    PYMETA_CPU_UNROLL for (int v = 0; v < NV; ++v) {
      V a[4], dz[4], dc_prev;
      PYMETA_CPU_UNROLL for (int q = 0; q < 4; ++q) a[q] = wload(R.dz1 + q * H + j, v);
      lstm_cell_backward_acts(a, load_lanes<T, LN>(tcs[0], CW, j, v), load(state, H + j, v),
                              load_lanes<T, LN>(dh1, CW, j, v), load(d_new_state, H + j, v), dz,
                              dc_prev);
      store(d_state, H + j, v, dc_prev);
      PYMETA_CPU_UNROLL for (int q = 0; q < 4; ++q) {
        const int r = q * H + j;
        wstore(r + R.dz1, v, dz[q]);
        PYMETA_CPU_UNROLL for (int i = 0; i < 2; ++i)
          if (i < n_in) dx[v][i] = dx[v][i] + W.w_ih1[r * n_in + i] * dz[q];
      }
    }
  }
  pf.step(3 * 4 * H + 3);  // the rest (none at the usual 3 rows per unit loop)
  // d h1_prev = W_hh1^T dz1
  dh_products<T, LN, NV>(W.w_hh1, H, ws + int64_t(R.dz1) * wld, wld, nullptr, 0, d_state, ld);
  PYMETA_CPU_UNROLL for (int v = 0; v < NV; ++v) store(d_grad, 0, v, lstm_preprocess_backward(g[v], s, dx[v]));
}

// The backward's per-coordinate part over one block: chunks of CW coordinates, the block's
// last cnt % CW coordinates (only where N ends inside the block) as one more chunk on
// zero-padded copies of their rows. The 12H + 3 rows a chunk touches (state, d_new_state,
// d_state: 4H each; grad, d_update, d_grad) are N elements apart, too many streams for the
// hardware prefetchers: each chunk prefetches the next chunk's lines (to L2, a few rows per
// unit loop: BackwardPrefetch) if they lie before n_end (N, or the block's end where the rows
// are a staged copy of the block).
template <int HMAX, typename T, int LN, int NV>
inline void backward_block(const LstmOptWeights<T>& W, const LstmOptScalars<T>& s,
                           const T* grad, const T* state, const T* d_update,
                           const T* d_new_state, T* d_grad, T* d_state, T* ws, int64_t ws_stride,
                           int64_t N, int64_t n0, int64_t cnt, int64_t n_end) {
  constexpr int CW = LN * NV;
  // (the last chunk's padding stays inside the block's workspace, whose width is a multiple
  // of 64 columns)
  static_assert(64 % CW == 0, "chunk width must divide 64");
  const int64_t r4 = 4 * int64_t(s.H);
  int64_t off = 0;
  for (; off + CW <= cnt; off += CW) {
    const int64_t n = n0 + off, m = n + CW;
    BackwardPrefetch<T> pf;  // the next chunk's rows, if it lies before n_end
    if (m + CW <= n_end) {
      pf.rows3[0] = state + m, pf.rows3[1] = d_new_state + m, pf.rows3[2] = d_state + m;
      pf.singles[0] = grad + m, pf.singles[1] = d_update + m, pf.singles[2] = d_grad + m;
      pf.ld = N, pf.r4 = static_cast<int>(r4), pf.bytes = CW * int(sizeof(T));
    }
    backward_chunk<T, LN, NV>(W, s, grad + n, state + n, d_update + n, d_new_state + n,
                              d_grad + n, d_state + n, ws + off, N, ws_stride, pf);
  }
  if (off < cnt) {
    // The last cnt - off < CW coordinates: one chunk over zero-padded local copies of their
    // rows, as the forward does (the per-coordinate path, LN at a time, took ~29 of the op's
    // ~70 us at N = 10). The padding's results are dropped, and the weight gradients read
    // only the block's cnt workspace columns (ws_stride >= off + CW: see backward()).
    const int64_t n = n0 + off, c = cnt - off, rows = r4;
    std::vector<T> buf(static_cast<size_t>(3 * rows + 3) * CW, T(0));
    T* bst = buf.data();
    T* bdns = bst + rows * CW;
    T* bds = bdns + rows * CW;
    T* bg = bds + rows * CW;
    T* bdu = bg + CW;
    T* bdg = bdu + CW;
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(bst + r * CW, state + r * N + n, c * sizeof(T));
      std::memcpy(bdns + r * CW, d_new_state + r * N + n, c * sizeof(T));
    }
    std::memcpy(bg, grad + n, c * sizeof(T));
    std::memcpy(bdu, d_update + n, c * sizeof(T));
    BackwardPrefetch<T> none;
    backward_chunk<T, LN, NV>(W, s, bg, bst, bdu, bdns, bdg, bds, ws + off, CW, ws_stride, none);
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(d_state + r * N + n, bds + r * CW, c * sizeof(T));
    std::memcpy(d_grad + n, bdg, c * sizeof(T));
  }
}

// Wide-lane instances (AVX-512: 64 bytes, AVX2: 32 bytes) of the shared code, inside
// functions compiled for that target (flatten: the whole call tree is inlined, so it is
// compiled for the target too). NV: lane vectors per tile, as many as the registers hold.
#define PYMETA_COORD_KERNELS(SUFFIX, VB, NVF)                                                   \
  template <typename T, int HMAX, typename St>                                                \
  __attribute__((flatten)) void forward_chunks_##SUFFIX(                                      \
      const LstmOptWeights<T>& W, const LstmOptScalars<T>& s, const T* grad, const St* state, \
      T* update, St* new_state, int64_t N, int64_t c0, int64_t c1) {                          \
    forward_chunks<T, VB / sizeof(T), NVF>(W, s, grad, state, update, new_state, N, c0, c1);  \
  }                                                                                           \
  template <typename T, int HMAX>                                                             \
  __attribute__((flatten)) void backward_block_##SUFFIX(                                      \
      const LstmOptWeights<T>& W, const LstmOptScalars<T>& s, const T* grad, const T* state,  \
      const T* d_update, const T* d_new_state, T* d_grad, T* d_state, T* ws,                  \
      int64_t ws_stride, int64_t N, int64_t n0, int64_t cnt, int64_t n_end) {                 \
    backward_block<HMAX, T, VB / sizeof(T), NVF>(W, s, grad, state, d_update, d_new_state,     \
                                                 d_grad, d_state, ws, ws_stride, N, n0, cnt,  \
                                                 n_end);                                      \
  }
#ifdef PYMETA_WGRAD_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")
PYMETA_COORD_KERNELS(avx512, 64, 4)
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
PYMETA_COORD_KERNELS(avx2, 32, 2)
#pragma GCC pop_options
#endif
#undef PYMETA_COORD_KERNELS

// St: the state's storage type (T, or uint16_t = bfloat16 bits with T = float).
template <typename T, int HMAX, typename St>
void forward(const LstmOptLaunch& L) {
  const auto W = weights_of<T>(L.w);
  const auto s = scalars_of<T>(L);
  const auto* grad = static_cast<const T*>(L.grad);
  const auto* state = static_cast<const St*>(L.state);
  auto* update = static_cast<T*>(L.update);
  auto* new_state = static_cast<St*>(L.new_state);
  const WgradIsa isa = wgrad_isa();
  // Chunk width in coordinates: the path's lanes times its tile's vectors.
  const int64_t CW = isa == WgradIsa::Avx512 ? 4 * 64 / sizeof(T)
                     : isa == WgradIsa::Avx2 ? 2 * 32 / sizeof(T)
                                             : 2 * LaneCount<T>::value;
  const int64_t chunks = (L.N + CW - 1) / CW;
  // A chunk costs ~ 24 H^2 CW flops; aim for ~ 1M flops per task.
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / (24 * int64_t(L.H) * L.H * CW + 1));
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
#ifdef PYMETA_WGRAD_X86
    if (isa == WgradIsa::Avx512)
      return forward_chunks_avx512<T, HMAX, St>(W, s, grad, state, update, new_state, L.N, c0, c1);
    if (isa == WgradIsa::Avx2)
      return forward_chunks_avx2<T, HMAX, St>(W, s, grad, state, update, new_state, L.N, c0, c1);
#endif
    forward_chunks<T, LaneCount<T>::value, 2>(W, s, grad, state, update, new_state, L.N, c0, c1);
  });
}

// St: the storage type of state, d_new_state and d_state (T, or uint16_t = bfloat16 bits with
// T = float). A bfloat16 block is converted into local float rows first and its d_state rows
// rounded back after: the same blocks and sums as for the upcast float32 state, bit for bit.
template <typename T, int HMAX, typename St>
void backward(const LstmOptLaunch& L) {
  constexpr int LN = LaneCount<T>::value;
  constexpr int64_t BC = kCpuBlock;
  constexpr bool kConvert = !std::is_same<T, St>::value;
  const auto W = weights_of<T>(L.w);
  const auto s = scalars_of<T>(L);
  const int H = L.H, n_in = L.n_in;
  const LstmOptRows R = lstm_opt_rows(H, n_in);
  const LstmOptPairs P = lstm_opt_pairs(H, n_in);
  const int64_t N = L.N, blocks = (N + BC - 1) / BC;
  const auto* grad = static_cast<const T*>(L.grad);
  const auto* state = static_cast<const St*>(L.state);
  const auto* d_update = static_cast<const T*>(L.d_update);
  const auto* d_new_state = static_cast<const St*>(L.d_new_state);
  auto* d_grad = static_cast<T*>(L.d_grad);
  auto* d_state = static_cast<St*>(L.d_state);
  auto* partial = static_cast<T*>(L.workspace);  // [groups, P.off[3]]
  const int64_t gb = cpu_group_blocks(N), groups = (blocks + gb - 1) / gb;

  // A^T for the block products: lda = 4H rounded up to 64 bytes of T, rows past 4H are zero.
  const int64_t align = 64 / sizeof(T);
  const int64_t lda = (4 * H + align - 1) / align * align;
  const WgradIsa isa = wgrad_isa();
  const int NRP = wgrad_nr(isa);  // B row lists padded to the path's tile rows
  // The block buffers' width: BC columns, or N rounded up to 64 where N is smaller (their
  // zeroing and allocation were ~10% of the op at N = 16).
  const int64_t BW = std::min<int64_t>(BC, (N + 63) / 64 * 64);
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<T> ws(static_cast<size_t>(R.total) * BW);
    std::vector<T> at_buf(static_cast<size_t>(lda) * BW, T(0));
    std::vector<T> ones(BW, T(1)), zeros(BW, T(0));
    const int mbmax = std::max(P.mb[0], P.mb[1]);
    const int nbpad = (mbmax + NRP - 1) / NRP * NRP;
    std::vector<T> ct(static_cast<size_t>(nbpad) * lda);
    std::vector<const T*> brows(nbpad);
    std::vector<T> staged(kConvert ? 3 * 4 * H * BW : 0);  // state, d_new_state, d_state rows
    for (int64_t b = g0 * gb; b < std::min(g1 * gb, blocks); ++b) {
      const int64_t n0 = b * BC, cnt = std::min<int64_t>(BC, N - n0);
      const bool first_in_group = b % gb == 0;
      // The block's view of the inputs: rows ld apart, its first coordinate at column first.
      const T *st, *dns;
      T* ds;
      int64_t ld = N, first = n0, end = N;
      if constexpr (kConvert) {
        T* buf = staged.data();
        for (int64_t r = 0; r < 4 * H; ++r) {
          stage_in(buf + r * BW, state + r * N + n0, cnt);
          stage_in(buf + (4 * H + r) * BW, d_new_state + r * N + n0, cnt);
        }
        st = buf, dns = buf + 4 * H * BW, ds = buf + 8 * H * BW, ld = BW, first = 0, end = cnt;
      } else {
        st = state, dns = d_new_state, ds = d_state;
      }
      const T* g = grad + n0 - first;
      const T* du = d_update + n0 - first;
      T* dg = d_grad + n0 - first;
#ifdef PYMETA_WGRAD_X86
      if (isa == WgradIsa::Avx512) {
        backward_block_avx512<T, HMAX>(W, s, g, st, du, dns, dg, ds, ws.data(), BW, ld, first, cnt,
                                       end);
      } else if (isa == WgradIsa::Avx2) {
        backward_block_avx2<T, HMAX>(W, s, g, st, du, dns, dg, ds, ws.data(), BW, ld, first, cnt,
                                     end);
      } else
#endif
        backward_block<HMAX, T, LN, 2>(W, s, g, st, du, dns, dg, ds, ws.data(), BW, ld, first, cnt,
                                       end);
      if constexpr (kConvert)
        for (int64_t r = 0; r < 4 * H; ++r) stage_out(d_state + r * N + n0, ds + r * BW, cnt);
      // This block's share of C_q = A_q B_q^T (see lstm_opt_pairs), added to its group's
      // partial sums (blocks in order).
      T* out = partial + (b / gb) * P.off[3];
      auto put = [first_in_group](T& o, T v) { o = first_in_group ? v : o + v; };
      auto wrow = [&](int r) -> const T* { return ws.data() + int64_t(r) * BW; };
      auto srow = [&](int r) -> const T* { return st + int64_t(r) * ld + first; };
      for (int q = 0; q < 2; ++q) {
        const int ma = P.ma[q], mb = P.mb[q];
        const int arow0 = q == 0 ? R.dz1 : R.dz2;
        // A (4H rows of gate gradients, coordinates contiguous) -> A^T (coordinate-major).
        transpose_rows(wrow(arow0), BW, ma, cnt, at_buf.data(), lda);
        int nb = 0;
        for (int k = 0; k < mb; ++k) {
          const T* brow;
          if (q == 0) brow = k < n_in ? wrow(R.x + k) : k < n_in + H ? srow(k - n_in) : ones.data();
          else brow = k < H ? wrow(R.h1 + k) : k < 2 * H ? srow(2 * H + k - H) : ones.data();
          brows[nb++] = brow;
        }
        const int nbp = (nb + NRP - 1) / NRP * NRP;
        for (; nb < nbp; ++nb) brows[nb] = zeros.data();
        wgrad_products<T>(isa, at_buf.data(), lda, static_cast<int>(cnt), brows.data(), nbp,
                          ct.data());
        T* o = out + P.off[q];
        for (int a = 0; a < ma; ++a)
          for (int k = 0; k < mb; ++k) put(o[int64_t(a) * mb + k], ct[int64_t(k) * lda + a]);
      }
      {  // q = 2: one A row (du), H + 1 dot products
        const T* arow = wrow(R.du);
        T* o = out + P.off[2];
        for (int k = 0; k < P.mb[2]; ++k)
          put(o[k], dot(arow, k < H ? wrow(R.h2 + k) : nullptr, cnt));
      }
    }
  });

  // Sum the groups in order, into each weight's gradient, one run at a time: a run is one row
  // of one weight's gradient (segment d, row r), whose entries are contiguous both there and in
  // each group's partials. Every entry sums g = 0, 1, ... in order. (Per-entry offsets, walked
  // through (segment, row, column), cost ~10 cycles an entry: ~20 of the op's ~50 us at N = 16.)
  int64_t run_start[11];
  LstmOptSegment seg[10];
  run_start[0] = 0;
  for (int d = 0; d < 10; ++d) {
    seg[d] = lstm_opt_segment(d, H, n_in);
    run_start[d + 1] = run_start[d] + seg[d].rows;
  }
  at::parallel_for(0, run_start[10], 32, [&](int64_t r0, int64_t r1) {
    T acc[kLstmOptMaxHidden > 2 ? kLstmOptMaxHidden : 2];  // cols <= max(H, n_in)
    int d = 0;
    for (int64_t run = r0; run < r1; ++run) {
      while (run >= run_start[d + 1]) ++d;
      const int64_t r = run - run_start[d];
      const int cols = seg[d].cols;
      const T* src = partial + seg[d].src_off + r * seg[d].src_stride;
      for (int c = 0; c < cols; ++c) acc[c] = T(0);
      for (int64_t b = 0; b < groups; ++b, src += P.off[3])
        for (int c = 0; c < cols; ++c) acc[c] += src[c];
      T* dst = static_cast<T*>(L.d_w[d]) + r * cols;
      for (int c = 0; c < cols; ++c) dst[c] = acc[c];
    }
  });
}

}  // namespace

int64_t lstm_opt_workspace_bytes_cpu(const LstmOptLaunch& L) {
  const int64_t blocks = (L.N + kCpuBlock - 1) / kCpuBlock;
  const int64_t gb = cpu_group_blocks(L.N), groups = (blocks + gb - 1) / gb;
  const int64_t elem = L.dtype == DType::Float64 ? 8 : 4;
  return groups * lstm_opt_pairs(L.H, L.n_in).off[3] * elem;
}

void lstm_opt_forward_cpu(const LstmOptLaunch& L) {
  if (L.state_bf16)  // float32 math only (the front checks grad's dtype)
    return dispatch_hidden(L.H, [&](auto hmax) { forward<float, decltype(hmax)::value, uint16_t>(L); });
  dispatch_dtype(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_hidden(L.H, [&](auto hmax) { forward<T, decltype(hmax)::value, T>(L); });
  });
}

void lstm_opt_backward_cpu(const LstmOptLaunch& L) {
  if (L.state_bf16)  // float32 math only (the front checks grad's dtype)
    return dispatch_hidden(L.H, [&](auto hmax) { backward<float, decltype(hmax)::value, uint16_t>(L); });
  dispatch_dtype(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_hidden(L.H, [&](auto hmax) { backward<T, decltype(hmax)::value, T>(L); });
  });
}

}  // namespace pymeta
