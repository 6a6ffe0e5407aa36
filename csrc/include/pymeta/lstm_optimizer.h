// lstm_optimizer_step: one step of the coordinatewise LSTM optimizer of Andrychowicz et al.
// (2016). Every coordinate n of the optimizee is one batch element of a 2-layer LSTM
// (hidden size H, shared weights, PyTorch gate order i, f, g, o) and a linear head:
//   x        = preprocess(grad[n])                    (n_in = 2 for log_sign, 1 for none)
//   h1, c1   = LSTMCell(x,  (h1, c1); w_ih1, w_hh1, b_ih1, b_hh1)
//   h2, c2   = LSTMCell(h1, (h2, c2); w_ih2, w_hh2, b_ih2, b_hh2)
//   update   = out_scale * (w_out . h2 + b_out)
// State layout: [4, H, N] (h1, c1, h2, c2), feature-major, so that for one feature the
// coordinates are contiguous (coalesced on the GPU, SIMD lanes on the CPU).
//
// The cell math below is written once over a value type V: a scalar (one CUDA thread = one
// coordinate) or Lanes<T, L> (the CPU's chunks run L consecutive coordinates at once). The
// whole-coordinate steps (lstm_opt_*_coord) run on scalars: the CUDA-core kernels and the
// emulator's references.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "pymeta/common.h"

struct CUstream_st;

namespace pymeta {

constexpr int kLstmOptMaxHidden = 64;
enum class LstmPreproc : int32_t { None = 0, LogSign = 1 };

// PYMETA_FOR_K(k, H) { ... }: k = 0 .. H-1. On the GPU, a loop unrolled to the bucket size
// HMAX with a guard, so that per-thread arrays indexed by k stay in registers; on the CPU a
// plain loop (the arrays are in memory anyway, and unrolling would only bloat the code).
#if defined(__CUDACC__)
#define PYMETA_UNROLL _Pragma("unroll")
#define PYMETA_FOR_K(k, H) _Pragma("unroll") for (int k = 0; k < HMAX; ++k) if (k < (H))
#else
#define PYMETA_UNROLL
#define PYMETA_FOR_K(k, H) for (int k = 0; k < (H); ++k)
#endif

// ---- scalar math (host and device) ---------------------------------------------------------
PYMETA_HD float v_exp(float x) { return expf(x); }
PYMETA_HD double v_exp(double x) { return exp(x); }
PYMETA_HD float v_log(float x) { return logf(x); }
PYMETA_HD double v_log(double x) { return log(x); }
// float tanh and sigmoid on the GPU: one MUFU.EX2 and one MUFU.RCP each (tanhf and a
// correctly rounded division cost ~10x the instructions, as much as the gate products at
// H = 20). tanh is the CPU lanes' formula, sign(x) (1 - e) / (1 + e) with e = exp(-2|x|):
// exact to a few roundings in absolute terms. Double keeps the libm functions.
#if defined(__CUDA_ARCH__)
// 2^x as one MUFU.EX2 (ex2.approx.ftz): a result below 2^-126 flushes to 0. __expf(y) is the
// same instruction on fl(y log2 e) plus a compare and two predicated multiplies (to return
// subnormals); in 1 / (1 + e) and (1 - e) / (1 + e) a subnormal e rounds away anyway.
// The callers fold their factor into the constant: fl(-2 log2 e) = -2 fl(log2 e) exactly, so
// the argument, and hence every result above 2^-126, is bitwise __expf's.
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
constexpr float kLog2e = 1.4426950408889634f;
// 1 / x as one MUFU.RCP (rcp.approx.ftz): 0 for x > 2^126. a * rcp_ftz(b) is __fdividef(a, b)
// bit for bit for |b| >= 2^-126, without the compare and the two predicated multiplies by 2^24
// that __fdividef adds for a subnormal b (the dens here are >= 1).
__device__ __forceinline__ float rcp_ftz(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif
PYMETA_HD float v_tanh(float x) {
#if defined(__CUDA_ARCH__)
  const float e = ex2_ftz(fabsf(x) * (-2.0f * kLog2e));
  return copysignf((1.0f - e) * rcp_ftz(1.0f + e), x);
#else
  return tanhf(x);
#endif
}
PYMETA_HD double v_tanh(double x) { return tanh(x); }
PYMETA_HD float v_abs(float x) { return fabsf(x); }
PYMETA_HD double v_abs(double x) { return fabs(x); }
template <typename T>
PYMETA_HD T v_sign(T x) { return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0)); }
template <typename T>
PYMETA_HD bool v_ge(T a, T b) { return a >= b; }
template <typename T>
PYMETA_HD T v_select(bool m, T a, T b) { return m ? a : b; }
template <typename T>
PYMETA_HD T v_sigmoid(T x) { return T(1) / (T(1) + v_exp(-x)); }
PYMETA_HD float v_sigmoid(float x) {
#if defined(__CUDA_ARCH__)
  return __fdividef(1.0f, 1.0f + ex2_ftz(x * -kLog2e));  // 0 once exp(-x) > 2^126
#else
  return 1.0f / (1.0f + v_exp(-x));
#endif
}

// Loads and stores of one value per coordinate. Row `row` of a feature-major array starts at
// p + row * stride; the coordinate is at idx.
struct Col {
  int64_t stride;
  int64_t idx;
};

template <typename V>
struct Access {  // scalar V
  template <typename T>
  PYMETA_HD static V ld(const T* p, int64_t row, const Col& c) { return p[row * c.stride + c.idx]; }
  template <typename T>
  PYMETA_HD static void st(T* p, int64_t row, const Col& c, V v) { p[row * c.stride + c.idx] = v; }
};

#if !defined(__CUDACC__)
// L coordinates at once on the CPU, as a GCC/Clang vector type: every operation is a SIMD
// instruction (or a few, on narrower hardware), and every lane runs the same operations in
// the same order as a CUDA thread does for its one coordinate.
template <typename T, int L>
struct Lanes {
  typedef T vec_t __attribute__((vector_size(sizeof(T) * L)));
  vec_t v;
  Lanes() = default;
  Lanes(T s) { v = vec_t{} + s; }  // NOLINT: broadcast
  static Lanes of(vec_t x) {
    Lanes r;
    r.v = x;
    return r;
  }
};
template <int L>
struct LaneMask {
  bool m[L];
};

#define PYMETA_LANES_BINOP(op)                                                               \
  template <typename T, int L>                                                              \
  inline Lanes<T, L> operator op(const Lanes<T, L>& a, const Lanes<T, L>& b) {              \
    return Lanes<T, L>::of(a.v op b.v);                                                     \
  }                                                                                         \
  template <typename T, int L>                                                              \
  inline Lanes<T, L> operator op(T a, const Lanes<T, L>& b) { return Lanes<T, L>::of(a op b.v); } \
  template <typename T, int L>                                                              \
  inline Lanes<T, L> operator op(const Lanes<T, L>& a, T b) { return Lanes<T, L>::of(a.v op b); }
PYMETA_LANES_BINOP(+)
PYMETA_LANES_BINOP(-)
PYMETA_LANES_BINOP(*)
PYMETA_LANES_BINOP(/)
#undef PYMETA_LANES_BINOP

template <typename T, int L>
inline Lanes<T, L> operator-(const Lanes<T, L>& a) { return Lanes<T, L>::of(-a.v); }
template <typename T, int L>
inline Lanes<T, L>& operator+=(Lanes<T, L>& a, const Lanes<T, L>& b) {
  a.v += b.v;
  return a;
}

// ---- float activations on K lane vectors at once -------------------------------------------
// Every step runs over the K vectors before the next step: K independent dependency chains
// side by side, so that the long exp -> division chains of the cell overlap (the forward's
// cell runs on a whole register tile, K = its NV vectors; single vectors use K = 1).
#define PYMETA_EACH_K _Pragma("GCC unroll 16") for (int k = 0; k < K; ++k)
template <int L>
struct FloatLanes {
  typedef typename Lanes<float, L>::vec_t fv;
  typedef uint32_t uv __attribute__((vector_size(sizeof(uint32_t) * L)));
};

// e = exp(-scale |y|) (scale 1 or 2) and the sign bits of y, in vector instructions (no libm
// calls): 2^n P(r) with x = n ln2 + r, |r| <= ln2 / 2, P the degree-7 Taylor polynomial
// (relative error < 1e-7). n comes from adding 1.5 * 2^23 to x log2(e): the sum is rounded to
// an integer and holds n in its low mantissa bits, so 2^n is a shift of those bits (no
// conversions). The argument is <= 0, so exp never overflows and one clamp, x >= -87, keeps
// n + 127 in [1, 127]. NaN stays NaN; -|y| and the sign bit are bit operations. The rounding
// relies on (k - 1.5 * 2^23) not being reassociated: never build this with -ffast-math or
// -fassociative-math.
template <int L, int K>
inline void v_exp_neg_abs(const typename FloatLanes<L>::fv (&y)[K], float scale,
                          typename FloatLanes<L>::fv (&e)[K], typename FloatLanes<L>::uv (&sign)[K]) {
  typedef typename FloatLanes<L>::fv fv;
  typedef typename FloatLanes<L>::uv uv;
  fv x[K], kk[K], r[K], p[K];
  PYMETA_EACH_K {
    uv b;
    std::memcpy(&b, &y[k], sizeof(b));
    sign[k] = b & 0x80000000u;
    b |= 0x80000000u;
    std::memcpy(&x[k], &b, sizeof(b));
  }
  PYMETA_EACH_K x[k] = x[k] * scale;
  PYMETA_EACH_K x[k] = x[k] < -87.0f ? fv{} - 87.0f : x[k];
  PYMETA_EACH_K kk[k] = x[k] * 1.44269504088896341f + 12582912.0f;
  PYMETA_EACH_K {
    const fv fn = kk[k] - 12582912.0f;
    r[k] = (x[k] - fn * 0.693359375f) + fn * 2.12194440e-4f;
  }
  PYMETA_EACH_K p[k] = r[k] * (1.0f / 5040.0f) + 1.0f / 720.0f;
  PYMETA_EACH_K p[k] = p[k] * r[k] + 1.0f / 120.0f;
  PYMETA_EACH_K p[k] = p[k] * r[k] + 1.0f / 24.0f;
  PYMETA_EACH_K p[k] = p[k] * r[k] + 1.0f / 6.0f;
  PYMETA_EACH_K p[k] = p[k] * r[k] + 0.5f;
  PYMETA_EACH_K p[k] = p[k] * r[k] + 1.0f;
  PYMETA_EACH_K p[k] = p[k] * r[k] + 1.0f;
  PYMETA_EACH_K {
    uv bits;
    std::memcpy(&bits, &kk[k], sizeof(bits));
    bits = (bits + 127u) << 23;  // (n + 127) << 23: the bits are 0x4B400000 + n, the top shifts out
    fv two_n;
    std::memcpy(&two_n, &bits, sizeof(two_n));
    e[k] = p[k] * two_n;
  }
}
// sigmoid(y) = num / den: num = 1 for y >= 0, e below; den = 1 + e in [1, 2], e = exp(-|y|).
template <int L, int K>
inline void v_sigmoid_frac(const typename FloatLanes<L>::fv (&y)[K],
                           typename FloatLanes<L>::fv (&num)[K], typename FloatLanes<L>::fv (&den)[K]) {
  typedef typename FloatLanes<L>::fv fv;
  fv e[K];
  typename FloatLanes<L>::uv sign[K];
  v_exp_neg_abs<L, K>(y, 1.0f, e, sign);
  PYMETA_EACH_K num[k] = y[k] >= 0.0f ? fv{} + 1.0f : e[k];
  PYMETA_EACH_K den[k] = 1.0f + e[k];
}
// tanh(y) = num / den: num = sign(y) (1 - e) (the sign as a bit, so tanh(-0) = -0), den = 1 + e,
// e = exp(-2|y|): exact to rounding in absolute terms.
template <int L, int K>
inline void v_tanh_frac(const typename FloatLanes<L>::fv (&y)[K],
                        typename FloatLanes<L>::fv (&num)[K], typename FloatLanes<L>::fv (&den)[K]) {
  typedef typename FloatLanes<L>::fv fv;
  typedef typename FloatLanes<L>::uv uv;
  fv e[K];
  uv sign[K];
  v_exp_neg_abs<L, K>(y, 2.0f, e, sign);
  PYMETA_EACH_K {
    const fv t = 1.0f - e[k];
    uv b;
    std::memcpy(&b, &t, sizeof(b));
    b ^= sign[k];
    std::memcpy(&num[k], &b, sizeof(b));
    den[k] = 1.0f + e[k];
  }
}
template <int L>
inline Lanes<float, L> v_sigmoid(const Lanes<float, L>& a) {
  typename FloatLanes<L>::fv y[1] = {a.v}, num[1], den[1];
  v_sigmoid_frac<L, 1>(y, num, den);
  return Lanes<float, L>::of(num[0] / den[0]);
}
template <int L>
inline Lanes<float, L> v_tanh(const Lanes<float, L>& a) {
  typename FloatLanes<L>::fv y[1] = {a.v}, num[1], den[1];
  v_tanh_frac<L, 1>(y, num, den);
  return Lanes<float, L>::of(num[0] / den[0]);
}

template <int L>
inline Lanes<double, L> v_exp(const Lanes<double, L>& a) {
  Lanes<double, L> r;
  for (int l = 0; l < L; ++l) r.v[l] = std::exp(a.v[l]);
  return r;
}
template <typename T, int L>
inline Lanes<T, L> v_log(const Lanes<T, L>& a) {
  Lanes<T, L> r;
  for (int l = 0; l < L; ++l) r.v[l] = std::log(a.v[l]);
  return r;
}
template <typename T, int L>
inline Lanes<T, L> v_abs(const Lanes<T, L>& a) {
  return Lanes<T, L>::of(a.v < T(0) ? -a.v : a.v);
}
template <typename T, int L>
inline Lanes<T, L> v_sign(const Lanes<T, L>& a) {
  typedef typename Lanes<T, L>::vec_t vt;
  return Lanes<T, L>::of(a.v > T(0) ? vt{} + T(1) : (a.v < T(0) ? vt{} - T(1) : vt{}));
}
// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): one exp, exact to rounding in
// absolute terms (relative accuracy degrades only where tanh itself is tiny).
template <typename T, int L>
inline Lanes<T, L> v_tanh(const Lanes<T, L>& a) {
  const auto ax = a.v < T(0) ? -a.v : a.v;
  const auto e = v_exp(Lanes<T, L>::of(ax * T(-2))).v;
  const auto t = (T(1) - e) / (T(1) + e);
  return Lanes<T, L>::of(a.v < T(0) ? -t : t);
}
template <typename T, int L>
inline LaneMask<L> v_ge(const Lanes<T, L>& a, const Lanes<T, L>& b) {
  LaneMask<L> m;
  for (int l = 0; l < L; ++l) m.m[l] = a.v[l] >= b.v[l];
  return m;
}
template <typename T, int L>
inline Lanes<T, L> v_select(const LaneMask<L>& m, const Lanes<T, L>& a, const Lanes<T, L>& b) {
  Lanes<T, L> r;
  for (int l = 0; l < L; ++l) r.v[l] = m.m[l] ? a.v[l] : b.v[l];
  return r;
}

#endif  // !__CUDACC__

// ---- the parameters of one call --------------------------------------------------------------

template <typename T>
struct LstmOptWeights {  // contiguous, in nn.LSTMCell / nn.Linear layouts
  const T* w_ih1;  // [4H, n_in]
  const T* w_hh1;  // [4H, H]
  const T* b_ih1;  // [4H]
  const T* b_hh1;  // [4H]
  const T* w_ih2;  // [4H, H]
  const T* w_hh2;  // [4H, H]
  const T* b_ih2;  // [4H]
  const T* b_hh2;  // [4H]
  const T* w_out;  // [1, H]
  const T* b_out;  // [1]
};

template <typename T>
struct LstmOptScalars {
  int H;
  int n_in;
  int preproc;  // LstmPreproc
  T inv_p, exp_p, threshold, out_scale;  // 1/p, e^p, e^-p
};

// ---- preprocessing (paper, appendix A) -----------------------------------------------------
// log_sign: |g| >= e^-p -> (log|g| / p, sign g), else (-1, e^p g); g = 0 takes the second
// branch, giving (-1, 0). none: x = g.
template <typename V, typename T>
PYMETA_HD void lstm_preprocess(const V& g, const LstmOptScalars<T>& s, V x[2]) {
  if (s.preproc == static_cast<int>(LstmPreproc::None)) {
    x[0] = g;
    x[1] = V(T(0));
    return;
  }
  const V a = v_abs(g);
  const auto big = v_ge(a, V(s.threshold));
  x[0] = v_select(big, v_log(v_select(big, a, V(T(1)))) * s.inv_p, V(T(-1)));
  x[1] = v_select(big, v_sign(g), g * s.exp_p);
}

// d grad from d x. The sign branch has zero derivative; d log|g| / dg = 1 / g.
template <typename V, typename T>
PYMETA_HD V lstm_preprocess_backward(const V& g, const LstmOptScalars<T>& s, const V dx[2]) {
  if (s.preproc == static_cast<int>(LstmPreproc::None)) return dx[0];
  const auto big = v_ge(v_abs(g), V(s.threshold));
  return v_select(big, dx[0] * s.inv_p / v_select(big, g, V(T(1))), dx[1] * s.exp_p);
}

// ---- LSTM cell pointwise part: z = the 4 gate pre-activations (i, f, g, o) -----------------
// The cell with its activations: a = (i, f, g, o) = (sigmoid, sigmoid, tanh, sigmoid)(z),
// c = f c_prev + i g, tc = tanh(c), h = o tc.
template <typename V>
PYMETA_HD void lstm_cell_acts(const V z[4], const V& c_prev, V a[4], V& c, V& tc, V& h) {
  a[0] = v_sigmoid(z[0]);
  a[1] = v_sigmoid(z[1]);
  a[2] = v_tanh(z[2]);
  a[3] = v_sigmoid(z[3]);
  c = a[1] * c_prev + a[0] * a[2];
  tc = v_tanh(c);
  h = a[3] * tc;
}
template <typename V>
PYMETA_HD void lstm_cell(const V z[4], const V& c_prev, V& c, V& h) {
  V a[4], tc;
  lstm_cell_acts(z, c_prev, a, c, tc, h);
}

// The float cell's exp and divisions. GPU: one MUFU each (ex2.approx.ftz; rcp.approx.ftz, 0
// once den > 2^126). Host (the emulators): the same flushes, correctly rounded.
// e^-(k y) for k = 1, 2 (the factor folded into the constant, as in v_tanh: one FMUL)
template <int k>
PYMETA_HD float cell_exp_neg(float y) {
#if defined(__CUDA_ARCH__)
  return ex2_ftz(y * (float(-k) * kLog2e));
#else
  const float e = expf(float(-k) * y);
  return e < 0x1p-126f ? 0.0f : e;
#endif
}
PYMETA_HD float cell_div(float num, float den) {  // |num| <= 1, den >= 1
#if defined(__CUDA_ARCH__)
  return num * rcp_ftz(den);
#else
  return den > 0x1p126f ? 0.0f * num : num / den;
#endif
}
// The float cell (lstm_cell for V = float: the GPU's forward and the backward's recompute).
// 8 special-function ops (5 exp, 3 divisions) instead of 10, and two instructions fewer:
// i g and o tanh(c) are each one division of products,
//   i g = ng / (di dg),  h = nc / (dn dc),
// with di = 1 + e^-z_i, dn = 1 + e^-z_o in [1, inf] and, for tanh(y) = ny / dy,
// ny = sign(y) (1 - e^-2|y|), dy = 1 + e^-2|y| in [1, 2]. A den product past 2^126 (inf
// included) gives +-0, the limit, as the separate divisions did; |ny| <= 1, so no Inf / Inf.
// Only f keeps a division of its own (f c_prev). NaN stays in its cell.
PYMETA_HD void lstm_cell(const float z[4], const float& c_prev, float& c, float& h) {
  const float di = 1.0f + cell_exp_neg<1>(z[0]);
  const float f = cell_div(1.0f, 1.0f + cell_exp_neg<1>(z[1]));
  const float eg = cell_exp_neg<2>(fabsf(z[2]));
  const float dn = 1.0f + cell_exp_neg<1>(z[3]);
  c = f * c_prev + cell_div(copysignf(1.0f - eg, z[2]), di * (1.0f + eg));
  const float ec = cell_exp_neg<2>(fabsf(c));
  h = cell_div(copysignf(1.0f - ec, c), dn * (1.0f + ec));
}
#if !defined(__CUDACC__)
// The forward cell (c, h of lstm_cell) of K float lane vectors at once, with 3 divisions
// instead of 5: every activation is a fraction num / den with den in [1, 2], so i g and
// o tanh(c) each take one division of products (dens in [1, 4]: nothing overflows).
template <int L, int K>
inline void lstm_cell_lanes(const Lanes<float, L> (&z)[4][K], const Lanes<float, L> (&c_prev)[K],
                            Lanes<float, L> (&c)[K], Lanes<float, L> (&h)[K]) {
  // Each fraction is folded into the next value as soon as it is complete (i g, then c, then
  // h), so few vectors are live at once: all four gates first kept 8 K of them and spilled.
  typedef typename FloatLanes<L>::fv fv;
  fv y[K], ni[K], di[K], ng[K], dg[K], ig[K], nf[K], df[K], no[K], dn[K], nc[K], dc[K];
  PYMETA_EACH_K y[k] = z[0][k].v;
  v_sigmoid_frac<L, K>(y, ni, di);
  PYMETA_EACH_K y[k] = z[2][k].v;
  v_tanh_frac<L, K>(y, ng, dg);
  PYMETA_EACH_K ig[k] = (ni[k] * ng[k]) / (di[k] * dg[k]);
  PYMETA_EACH_K y[k] = z[1][k].v;
  v_sigmoid_frac<L, K>(y, nf, df);
  PYMETA_EACH_K c[k].v = nf[k] / df[k] * c_prev[k].v + ig[k];
  PYMETA_EACH_K y[k] = c[k].v;
  v_tanh_frac<L, K>(y, nc, dc);
  PYMETA_EACH_K y[k] = z[3][k].v;
  v_sigmoid_frac<L, K>(y, no, dn);
  PYMETA_EACH_K h[k].v = (no[k] * nc[k]) / (dn[k] * dc[k]);
}
// lstm_cell_acts of K float lane vectors at once (the CPU backward's recompute), every value
// by lstm_cell_acts' own operations, so the same bits (a NaN's payload aside: x86 keeps the
// first operand's, and the compiler may order them differently). Taking the tile by reference keeps it in
// registers: lstm_cell_acts on a copied z[4] went through the stack, whose 32-byte reloads of
// 16-byte stores missed store forwarding (the hottest instructions of the AVX2 backward).
template <int L, int K>
inline void lstm_cell_acts_lanes(const Lanes<float, L> (&z)[4][K],
                                 const Lanes<float, L> (&c_prev)[K], Lanes<float, L> (&a)[4][K],
                                 Lanes<float, L> (&c)[K], Lanes<float, L> (&tc)[K],
                                 Lanes<float, L> (&h)[K]) {
  typedef typename FloatLanes<L>::fv fv;
  fv y[K], num[K], den[K];
  for (int q = 0; q < 4; ++q) {
    PYMETA_EACH_K y[k] = z[q][k].v;
    if (q == 2) v_tanh_frac<L, K>(y, num, den);
    else v_sigmoid_frac<L, K>(y, num, den);
    PYMETA_EACH_K a[q][k].v = num[k] / den[k];
  }
  PYMETA_EACH_K c[k] = a[1][k] * c_prev[k] + a[0][k] * a[2][k];
  PYMETA_EACH_K y[k] = c[k].v;
  v_tanh_frac<L, K>(y, num, den);
  PYMETA_EACH_K {
    tc[k].v = num[k] / den[k];
    h[k] = a[3][k] * tc[k];
  }
}
#endif

// Given dh and dc (the gradients w.r.t. the cell's outputs), the gradients w.r.t. z and
// c_prev, from the activations a and tc of lstm_cell_acts.
template <typename V>
PYMETA_HD void lstm_cell_backward_acts(const V a[4], const V& tc, const V& c_prev, const V& dh,
                                       const V& dc_in, V dz[4], V& dc_prev) {
  const V i = a[0], f = a[1], gg = a[2], o = a[3];
  const V dc = dc_in + dh * o * (V(1) - tc * tc);
  dz[0] = dc * gg * i * (V(1) - i);
  dz[1] = dc * c_prev * f * (V(1) - f);
  dz[2] = dc * i * (V(1) - gg * gg);
  dz[3] = dh * tc * o * (V(1) - o);
  dc_prev = dc * f;
}
// The same from z: recomputes the activations rather than storing them.
template <typename V>
PYMETA_HD void lstm_cell_backward(const V z[4], const V& c_prev, const V& dh, const V& dc_in,
                                  V dz[4], V& dc_prev) {
  V a[4], c, tc, h;
  lstm_cell_acts(z, c_prev, a, c, tc, h);
  lstm_cell_backward_acts(a, tc, c_prev, dh, dc_in, dz, dc_prev);
}

// ---- workspace rows of the backward (feature-major, one column per coordinate) ---------------
// The backward writes, per coordinate: dz1 (layer-1 gate gradients), x, h1 (new), dz2, h2
// (new), du (= d_update * out_scale). The weight gradients are then sums over coordinates of
// products of these rows ("pairs": A rows times B rows), reduced deterministically.
struct LstmOptRows {
  int dz1, x, h1, dz2, h2, du, total;
};
PYMETA_HD LstmOptRows lstm_opt_rows(int H, int n_in) {
  LstmOptRows r;
  r.dz1 = 0;
  r.x = 4 * H;
  r.h1 = r.x + n_in;
  r.dz2 = r.h1 + H;
  r.h2 = r.dz2 + 4 * H;
  r.du = r.h2 + H;
  r.total = r.du + 1;
  return r;
}

// The weight-gradient pairs, C_q[a, b] = sum_n A_q[a, n] * B_q[b, n]:
//   q = 0: A = dz1 (4H), B = [x (n_in); h1_prev (H); 1]   -> d w_ih1, d w_hh1, d b1
//   q = 1: A = dz2 (4H), B = [h1 (H); h2_prev (H); 1]     -> d w_ih2, d w_hh2, d b2
//   q = 2: A = du (1),   B = [h2 (H); 1]                  -> d w_out, d b_out
// The partial sums of one block of coordinates are laid out C_0, C_1, C_2, row-major.
struct LstmOptPairs {
  int ma[3], mb[3];
  int64_t off[4];  // off[3] = P, the size of one block's partial sums
};
PYMETA_HD LstmOptPairs lstm_opt_pairs(int H, int n_in) {
  LstmOptPairs p;
  p.ma[0] = 4 * H; p.mb[0] = n_in + H + 1;
  p.ma[1] = 4 * H; p.mb[1] = 2 * H + 1;
  p.ma[2] = 1;     p.mb[2] = H + 1;
  p.off[0] = 0;
  for (int q = 0; q < 3; ++q) p.off[q + 1] = p.off[q] + int64_t(p.ma[q]) * p.mb[q];
  return p;
}

// Which part of the pairs' sums is the gradient of weight d (0..9, in LstmOptWeights order):
// dst[i, j] = C[src_off + i * src_stride + j] for i < rows, j < cols.
struct LstmOptSegment {
  int rows, cols;
  int64_t src_off, src_stride;
};
PYMETA_HD LstmOptSegment lstm_opt_segment(int d, int H, int n_in) {
  const LstmOptPairs p = lstm_opt_pairs(H, n_in);
  const int64_t s0 = p.mb[0], s1 = p.mb[1], s2 = p.mb[2];
  switch (d) {
    case 0: return {4 * H, n_in, p.off[0], s0};
    case 1: return {4 * H, H, p.off[0] + n_in, s0};
    case 2:
    case 3: return {4 * H, 1, p.off[0] + n_in + H, s0};
    case 4: return {4 * H, H, p.off[1], s1};
    case 5: return {4 * H, H, p.off[1] + H, s1};
    case 6:
    case 7: return {4 * H, 1, p.off[1] + 2 * H, s1};
    case 8: return {1, H, p.off[2], s2};
    default: return {1, 1, p.off[2] + H, s2};
  }
}

// z[q] += sum_k w[(q H + j) H + k] * in[k], q = 0..3 (the 4 gates of unit j): the four
// sums advance together (independent chains), each in the order k = 0 .. H-1.
template <int HMAX, typename V, typename T>
PYMETA_HD void lstm_gate_dots(V z[4], const T* w, int H, int j, const V* in) {
  const int64_t gate = int64_t(H) * H;
  const T* w0 = w + int64_t(j) * H;
  const T* w1 = w0 + gate;
  const T* w2 = w1 + gate;
  const T* w3 = w2 + gate;
  PYMETA_FOR_K(k, H) {
    const V v = in[k];
    z[0] = z[0] + w0[k] * v;
    z[1] = z[1] + w1[k] * v;
    z[2] = z[2] + w2[k] * v;
    z[3] = z[3] + w3[k] * v;
  }
}

// z[q] = b_ih2 + b_hh2 + w_ih2 h1 + w_hh2 h2 for the 4 gates of layer-2 unit j (the forward
// and the backward's recompute).
template <int HMAX, typename V, typename T>
PYMETA_HD void lstm_layer2_gates(const LstmOptWeights<T>& W, int H, int j, const V (&h1)[HMAX],
                                 const V (&h2)[HMAX], V z[4]) {
  PYMETA_UNROLL
  for (int q = 0; q < 4; ++q) z[q] = V(W.b_ih2[q * H + j] + W.b_hh2[q * H + j]);
  lstm_gate_dots<HMAX>(z, W.w_ih2, H, j, h1);
  lstm_gate_dots<HMAX>(z, W.w_hh2, H, j, h2);
}

// z[q] = b_ih1 + b_hh1 + w_ih1 x for the 4 gates of layer-1 unit j (before the recurrent
// products), in the order the forward and the backward's recompute both use.
template <typename V, typename T>
PYMETA_HD void lstm_layer1_input(const LstmOptWeights<T>& W, int H, int n_in, int j,
                                 const V x[2], V z[4]) {
  PYMETA_UNROLL
  for (int q = 0; q < 4; ++q) {
    const int r = q * H + j;
    V acc = V(W.b_ih1[r] + W.b_hh1[r]);
    PYMETA_UNROLL
    for (int i = 0; i < 2; ++i)
      if (i < n_in) acc = acc + W.w_ih1[r * n_in + i] * x[i];
    z[q] = acc;
  }
}

// ---- one coordinate: forward ----------------------------------------------------------------
// HMAX >= H bounds the unrolled loops over hidden units, so that the per-coordinate arrays
// are indexed by compile-time constants only (registers on the GPU).
template <int HMAX, typename V, typename T>
PYMETA_HD void lstm_opt_forward_coord(const LstmOptWeights<T>& W, const LstmOptScalars<T>& s,
                                      const T* grad, const T* state, T* update, T* new_state,
                                      const Col& col) {
  using A = Access<V>;
  const int H = s.H, n_in = s.n_in;
  V x[2];
  lstm_preprocess(A::ld(grad, 0, col), s, x);

  V in[HMAX], rec[HMAX];
  PYMETA_FOR_K(k, H)
    rec[k] = A::ld(state, k, col);  // h1
  for (int j = 0; j < H; ++j) {
    V z[4];
    lstm_layer1_input<V>(W, H, n_in, j, x, z);
    lstm_gate_dots<HMAX>(z, W.w_hh1, H, j, rec);
    V c, h;
    lstm_cell(z, A::ld(state, H + j, col), c, h);
    A::st(new_state, j, col, h);
    A::st(new_state, H + j, col, c);
  }

  PYMETA_FOR_K(k, H) {
    in[k] = A::ld(new_state, k, col);       // h1 (new): the input of layer 2
    rec[k] = A::ld(state, 2 * H + k, col);  // h2
  }
  V out = V(W.b_out[0]);
  for (int j = 0; j < H; ++j) {
    V z[4];
    lstm_layer2_gates<HMAX>(W, H, j, in, rec, z);
    V c, h;
    lstm_cell(z, A::ld(state, 3 * H + j, col), c, h);
    A::st(new_state, 2 * H + j, col, h);
    A::st(new_state, 3 * H + j, col, c);
    out = out + W.w_out[j] * h;
  }
  A::st(update, 0, col, out * s.out_scale);
}

// ---- one coordinate: backward ---------------------------------------------------------------
// Recomputes the forward (writing gate pre-activations, x, h1, h2 to the workspace `ws`,
// addressed by `wc`), then backpropagates, overwriting the pre-activations with their
// gradients. d_state rows 0..H-1 hold d h1(new) until layer 1's backward is done.
template <int HMAX, typename V, typename T>
PYMETA_HD void lstm_opt_backward_coord(const LstmOptWeights<T>& W, const LstmOptScalars<T>& s,
                                       const T* grad, const T* state, const T* d_update,
                                       const T* d_new_state, T* d_grad, T* d_state, T* ws,
                                       const Col& col, const Col& wc) {
  using A = Access<V>;
  const int H = s.H, n_in = s.n_in;
  const LstmOptRows R = lstm_opt_rows(H, n_in);
  const V g = A::ld(grad, 0, col);
  V x[2];
  lstm_preprocess(g, s, x);
  PYMETA_UNROLL
  for (int i = 0; i < 2; ++i)
    if (i < n_in) A::st(ws, R.x + i, wc, x[i]);

  // forward, layer 1
  V a1[HMAX], a2[HMAX];
  PYMETA_FOR_K(k, H)
    a2[k] = A::ld(state, k, col);
  for (int j = 0; j < H; ++j) {
    V z[4];
    lstm_layer1_input<V>(W, H, n_in, j, x, z);
    lstm_gate_dots<HMAX>(z, W.w_hh1, H, j, a2);
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) A::st(ws, R.dz1 + q * H + j, wc, z[q]);
    V c, h;
    lstm_cell(z, A::ld(state, H + j, col), c, h);
    A::st(ws, R.h1 + j, wc, h);
  }
  // forward, layer 2
  PYMETA_FOR_K(k, H) {
    a1[k] = A::ld(ws, R.h1 + k, wc);
    a2[k] = A::ld(state, 2 * H + k, col);
  }
  for (int j = 0; j < H; ++j) {
    V z[4];
    lstm_layer2_gates<HMAX>(W, H, j, a1, a2, z);
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) A::st(ws, R.dz2 + q * H + j, wc, z[q]);
    V c, h;
    lstm_cell(z, A::ld(state, 3 * H + j, col), c, h);
    A::st(ws, R.h2 + j, wc, h);
  }

  // backward, head and layer 2: a1 accumulates d h1(new), a2 d h2_prev
  const V du = A::ld(d_update, 0, col) * s.out_scale;
  A::st(ws, R.du, wc, du);
  PYMETA_FOR_K(k, H) {
    a1[k] = A::ld(d_new_state, k, col);
    a2[k] = V(T(0));
  }
  for (int j = 0; j < H; ++j) {
    V z[4], dz[4], dc_prev;
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) z[q] = A::ld(ws, R.dz2 + q * H + j, wc);
    const V dh = du * W.w_out[j] + A::ld(d_new_state, 2 * H + j, col);
    lstm_cell_backward(z, A::ld(state, 3 * H + j, col), dh, A::ld(d_new_state, 3 * H + j, col),
                       dz, dc_prev);
    A::st(d_state, 3 * H + j, col, dc_prev);
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) {
      const int r = q * H + j;
      A::st(ws, R.dz2 + r, wc, dz[q]);
      const T* wi = W.w_ih2 + int64_t(r) * H;
      const T* wh = W.w_hh2 + int64_t(r) * H;
      PYMETA_FOR_K(k, H) {
        a1[k] = a1[k] + wi[k] * dz[q];
        a2[k] = a2[k] + wh[k] * dz[q];
      }
    }
  }
  PYMETA_FOR_K(k, H) {
    A::st(d_state, 2 * H + k, col, a2[k]);
    A::st(d_state, k, col, a1[k]);  // d h1(new), read back by unit below
    a2[k] = V(T(0));
  }

  // backward, layer 1: a2 accumulates d h1_prev
  V dx[2] = {V(T(0)), V(T(0))};
  for (int j = 0; j < H; ++j) {
    V z[4], dz[4], dc_prev;
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) z[q] = A::ld(ws, R.dz1 + q * H + j, wc);
    lstm_cell_backward(z, A::ld(state, H + j, col), A::ld(d_state, j, col),
                       A::ld(d_new_state, H + j, col), dz, dc_prev);
    A::st(d_state, H + j, col, dc_prev);
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) {
      const int r = q * H + j;
      A::st(ws, R.dz1 + r, wc, dz[q]);
      PYMETA_UNROLL
      for (int i = 0; i < 2; ++i)
        if (i < n_in) dx[i] = dx[i] + W.w_ih1[r * n_in + i] * dz[q];
      const T* wh = W.w_hh1 + int64_t(r) * H;
      PYMETA_FOR_K(k, H)
        a2[k] = a2[k] + wh[k] * dz[q];
    }
  }
  PYMETA_FOR_K(k, H)
    A::st(d_state, k, col, a2[k]);
  A::st(d_grad, 0, col, lstm_preprocess_backward(g, s, dx));
}

// ---- bfloat16 storage of the state (float32 math) --------------------------------------------
// A bfloat16 value is the top 16 bits of a float32; stored as uint16_t. Rounding to nearest
// even, as torch rounds, so the kernels' stores equal `new_state.float().bfloat16()` bit for
// bit for every non-NaN value (overflow to Inf, subnormals and -0 included). A NaN stays a
// NaN with its sign and top payload bits, quieted (torch's scalar and vector conversions
// disagree on NaN bits, so no choice matches both).
// A value's bits as another type of its size: a memcpy, which compiles to a register move on
// the host and on the device (the SASS is that of __float_as_uint / __uint_as_float).
template <typename To, typename From>
PYMETA_HD To bits_as(From x) {
  static_assert(sizeof(To) == sizeof(From), "bits_as: sizes differ");
  To y;
  memcpy(&y, &x, sizeof(To));
  return y;
}
PYMETA_HD uint32_t f32_bits(float x) { return bits_as<uint32_t>(x); }
PYMETA_HD float bits_f32(uint32_t u) { return bits_as<float>(u); }
PYMETA_HD float bf16_to_f32(uint16_t b) { return bits_f32(uint32_t(b) << 16); }
// Float bits u -> the bfloat16 bits (in the low 16 bits), rounded to nearest even; a NaN
// stays a NaN (quiet; 0x7fc0 for the default NaN, as torch rounds on the CPU). U: uint32_t,
// or a vector of them on the CPU (the staging loops).
template <typename U>
PYMETA_HD void f32_bits_to_bf16_bits(U& u) {
  const U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  if constexpr (std::is_integral<U>::value) {
    u = (u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded;
  } else {
    // Vectors: the NaN test as a mask from a sign bit (0x7f800000 - |u| wraps past 2^31 exactly
    // when |u| > 0x7f800000). AVX2 has no unsigned compare, and GCC made the select above
    // per-lane scalar code there: most of the bfloat16 forward's cost over float32.
    const U nan = U{} - ((0x7f800000u - (u & 0x7fffffffu)) >> 31);
    u = (nan & ((u >> 16) | 0x40u)) | (~nan & rounded);
  }
}
PYMETA_HD uint16_t f32_to_bf16(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // One instruction (F2FP) instead of ~9: the same rounding, as torch's own CUDA conversion
  // does it (cuda_bf16.h); only a NaN's bits differ (0x7fff, torch's on the GPU too).
  uint16_t r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
#else
  uint32_t u = f32_bits(x);
  f32_bits_to_bf16_bits(u);
  return static_cast<uint16_t>(u);
#endif
}
// Loads and stores of a state value in its storage type (float, double or bfloat16 bits).
template <typename T>
PYMETA_HD T state_ld(const T& v) { return v; }
PYMETA_HD float state_ld(const uint16_t& v) { return bf16_to_f32(v); }
template <typename T>
PYMETA_HD void state_st(T& o, T v) { o = v; }
PYMETA_HD void state_st(uint16_t& o, float v) { o = f32_to_bf16(v); }

// ---- launch table and entry points ------------------------------------------------------------

struct LstmOptLaunch {
  const void* grad;         // [N]
  const void* state;        // [4, H, N]
  const void* w[10];        // LstmOptWeights order
  void* update;             // forward: [N]
  void* new_state;          // forward: [4, H, N]
  const void* d_update;     // backward: [N]
  const void* d_new_state;  // backward: [4, H, N]
  void* d_grad;             // backward: [N]
  void* d_state;            // backward: [4, H, N]
  void* d_w[10];            // backward: the weights' gradients, weight shapes
  void* workspace;          // backward: lstm_opt_workspace_bytes_*() bytes
  int64_t N;
  int32_t H;
  int32_t n_in;
  int32_t preproc;  // LstmPreproc
  DType dtype;      // Float32 or Float64
  // state, new_state (forward), d_new_state and d_state (backward) are bfloat16 bits
  // (uint16_t), the rest float32. The CPU forward and backward, the CUDA tensor-core forward
  // and the CUDA backward take it; lstm_opt_forward_cuda and lstm_opt_backward_cuda return
  // kLstmOptNoKernel, having launched nothing, where no bfloat16 kernel applies (the caller
  // converts instead).
  int32_t state_bf16;
  // Forward only: state and new_state in the blocked layout [ceil(N / 16)][4H][16] (16
  // coordinates' 4H rows together; the padding coordinates N .. 16 ceil(N / 16) - 1 are
  // stepped with a zero grad). Only lstm_opt_forward_cuda takes it, and returns
  // kLstmOptNoKernel where no blocked kernel applies (the caller converts instead).
  int32_t blocked;
  double p;
  double out_scale;
};

// Coordinates per chunk of the GPU's deterministic weight-gradient reduction: each chunk's
// partial sums are written to the workspace, then summed in a fixed order. A fixed size (not
// an SM count), so results are bitwise reproducible on any GPU of one kind. (The CPU's
// blocks and groups are lstm_optimizer_cpu.cpp's own.)
constexpr int64_t kLstmOptCudaChunk = 2048;

constexpr int kLstmOptNoKernel = -1;

int64_t lstm_opt_workspace_bytes_cpu(const LstmOptLaunch& L);
void lstm_opt_forward_cpu(const LstmOptLaunch& L);
void lstm_opt_backward_cpu(const LstmOptLaunch& L);
int64_t lstm_opt_workspace_bytes_cuda(const LstmOptLaunch& L);
// Whether lstm_opt_backward_cuda takes L's bfloat16 state itself (asked before the workspace is
// allocated; lstm_opt_backward_cuda returns kLstmOptNoKernel where this is false).
bool lstm_opt_backward_reads_bf16_cuda(const LstmOptLaunch& L);
int lstm_opt_forward_cuda(const LstmOptLaunch& L, CUstream_st* stream);
int lstm_opt_backward_cuda(const LstmOptLaunch& L, CUstream_st* stream);

}  // namespace pymeta
