// The per-thread work of the shared-memory CUDA kernels of lstm_optimizer_step, written as
// host + device functions so that a host program can run them too (tests/cuda_emu checks
// them against the CPU op without a GPU).
//
// The weights are staged once per block into shared memory in a padded layout: every
// [4H, H] matrix gets rows of HP >= H entries (HP a multiple of 4, the extra entries 0), so
// that a row is read with 16-byte vector loads (one load feeds 4 FMAs of each gate) and the
// loops over k run to the compile-time HP without guards. The padding adds exact zeros
// (0 * 0) to the sums, which run in the same order (k ascending) as in the header's math.
#pragma once
#include "pymeta/lstm_optimizer.h"

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

namespace pymeta {

// Offsets (in elements) of the staged weights. Rows r = q H + j (gate q of unit j).
struct LstmSmemLayout {
  int w1h;   // [4H][HP] w_hh1
  int w2i;   // [4H][HP] w_ih2
  int w2h;   // [4H][HP] w_hh2
  int b1;    // [4H]     b_ih1 + b_hh1
  int b2;    // [4H]     b_ih2 + b_hh2
  int wi1;   // [4H][2]  w_ih1 (column 1 is 0 when n_in = 1)
  int wout;  // [HP]     w_out (padded with 0)
  int bout;  // [1]
  int total;
};

PYMETA_HD LstmSmemLayout lstm_smem_layout(int H, int HP) {
  LstmSmemLayout s;
  s.w1h = 0;
  s.w2i = 4 * H * HP;
  s.w2h = 8 * H * HP;
  s.b1 = 12 * H * HP;
  s.b2 = s.b1 + 4 * H;
  s.wi1 = s.b2 + 4 * H;
  s.wout = s.wi1 + 8 * H;
  s.bout = s.wout + HP;
  s.total = s.bout + 1;
  return s;
}

// Thread `tid` of `nthreads` writes its share of the staged weights (the caller syncs).
template <int HP, typename T>
PYMETA_HD void lstm_stage_weights(T* sw, const LstmOptWeights<T>& W, int H, int n_in, int tid,
                                  int nthreads) {
  const LstmSmemLayout lo = lstm_smem_layout(H, HP);
  const int rows = 4 * H, m = rows * HP;
  constexpr int kBatch = 4;  // 12 loads in flight per thread: staging is latency-bound
  for (int e0 = tid; e0 < m; e0 += kBatch * nthreads) {
    T v[kBatch][3];
    PYMETA_UNROLL
    for (int j = 0; j < kBatch; ++j) {
      const int e = e0 + j * nthreads;
      const int r = e / HP, k = e - r * HP;
      const bool ok = e < m && k < H;
      const int src = r * H + k;
      v[j][0] = ok ? W.w_hh1[src] : T(0);
      v[j][1] = ok ? W.w_ih2[src] : T(0);
      v[j][2] = ok ? W.w_hh2[src] : T(0);
    }
    PYMETA_UNROLL
    for (int j = 0; j < kBatch; ++j) {
      const int e = e0 + j * nthreads;
      if (e >= m) break;
      sw[lo.w1h + e] = v[j][0];
      sw[lo.w2i + e] = v[j][1];
      sw[lo.w2h + e] = v[j][2];
    }
  }
  for (int r = tid; r < rows; r += nthreads) {
    sw[lo.b1 + r] = W.b_ih1[r] + W.b_hh1[r];
    sw[lo.b2 + r] = W.b_ih2[r] + W.b_hh2[r];
    sw[lo.wi1 + 2 * r] = W.w_ih1[r * n_in];
    sw[lo.wi1 + 2 * r + 1] = n_in > 1 ? W.w_ih1[r * n_in + 1] : T(0);
  }
  for (int k = tid; k < HP; k += nthreads) sw[lo.wout + k] = k < H ? W.w_out[k] : T(0);
  if (tid == 0) sw[lo.bout] = W.b_out[0];
}

// 4 consecutive values from a 16-byte aligned address (shared memory on the GPU).
PYMETA_HD void lstm_load4(const float* p, float o[4]) {
#if defined(__CUDA_ARCH__)
  const float4 v = *reinterpret_cast<const float4*>(p);
  o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
#else
  for (int i = 0; i < 4; ++i) o[i] = p[i];
#endif
}
PYMETA_HD void lstm_load4(const double* p, double o[4]) {
#if defined(__CUDA_ARCH__)
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  o[0] = a.x; o[1] = a.y; o[2] = b.x; o[3] = b.y;
#else
  for (int i = 0; i < 4; ++i) o[i] = p[i];
#endif
}

// z[c][q] += sum_k w[q gs + k] * in[c][k], k = 0 .. HP-1 in order, for C coordinates.
// w: the row of gate 0 of unit j; gs: the distance between the gates' rows (H HP).
template <int HP, int C, typename T>
PYMETA_HD void lstm_smem_gate_dots(T (&z)[C][4], const T* w, int gs, const T (&in)[C][HP]) {
  PYMETA_UNROLL
  for (int k = 0; k < HP; k += 4) {
    T w4[4][4];
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) lstm_load4(w + q * gs + k, w4[q]);
    PYMETA_UNROLL
    for (int kk = 0; kk < 4; ++kk) {
      PYMETA_UNROLL
      for (int c = 0; c < C; ++c) {
        PYMETA_UNROLL
        for (int q = 0; q < 4; ++q) z[c][q] = z[c][q] + w4[q][kk] * in[c][k + kk];
      }
    }
  }
}

// acc[k] += w[k] * d, k = 0 .. HP-1 (a row of a [4H][HP] matrix times one gate gradient).
template <int HP, typename T>
PYMETA_HD void lstm_smem_axpy(T (&acc)[HP], const T* w, const T& d) {
  PYMETA_UNROLL
  for (int k = 0; k < HP; k += 4) {
    T w4[4];
    lstm_load4(w + k, w4);
    PYMETA_UNROLL
    for (int kk = 0; kk < 4; ++kk) acc[k + kk] = acc[k + kk] + w4[kk] * d;
  }
}

// ---- forward: C coordinates n[c] (valid[c]: in range; an invalid one repeats a valid
// index, is computed and not stored) --------------------------------------------------------
template <int HP, int C, typename T>
PYMETA_HD void lstm_smem_forward_thread(const T* sw, const LstmOptScalars<T>& s, const T* grad,
                                        const T* state, T* update, T* new_state, int64_t N,
                                        const int64_t (&n)[C], const bool (&valid)[C]) {
  const int H = s.H, n_in = s.n_in;
  const LstmSmemLayout lo = lstm_smem_layout(H, HP);
  const int gs = H * HP;
  T x[C][2];
  PYMETA_UNROLL
  for (int c = 0; c < C; ++c) lstm_preprocess(grad[n[c]], s, x[c]);

  T in[C][HP];
  PYMETA_UNROLL
  for (int c = 0; c < C; ++c) {
    PYMETA_UNROLL
    for (int k = 0; k < HP; ++k) in[c][k] = k < H ? state[int64_t(k) * N + n[c]] : T(0);  // h1
  }
  // layer 1; c_prev of the next unit is loaded one unit ahead (hides the global latency)
  T cp[C];
  PYMETA_UNROLL
  for (int c = 0; c < C; ++c) cp[c] = state[int64_t(H) * N + n[c]];
  for (int j = 0; j < H; ++j) {
    T cp_next[C];
    PYMETA_UNROLL
    for (int c = 0; c < C; ++c)
      cp_next[c] = j + 1 < H ? state[int64_t(H + j + 1) * N + n[c]] : T(0);
    T z[C][4];
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) {
      const int r = q * H + j;
      const T b = sw[lo.b1 + r], w0 = sw[lo.wi1 + 2 * r], w1 = sw[lo.wi1 + 2 * r + 1];
      PYMETA_UNROLL
      for (int c = 0; c < C; ++c) {
        T acc = b;
        acc = acc + w0 * x[c][0];
        if (n_in > 1) acc = acc + w1 * x[c][1];
        z[c][q] = acc;
      }
    }
    lstm_smem_gate_dots<HP, C>(z, sw + lo.w1h + j * HP, gs, in);
    PYMETA_UNROLL
    for (int c = 0; c < C; ++c) {
      T cc, hh;
      lstm_cell(z[c], cp[c], cc, hh);
      if (valid[c]) {
        new_state[int64_t(j) * N + n[c]] = hh;
        new_state[int64_t(H + j) * N + n[c]] = cc;
      }
      cp[c] = cp_next[c];
    }
  }

  // layer 2: input h1 (new, read back from what this thread wrote), recurrent h2
  T rec[C][HP];
  PYMETA_UNROLL
  for (int c = 0; c < C; ++c) {
    PYMETA_UNROLL
    for (int k = 0; k < HP; ++k) {
      in[c][k] = k < H && valid[c] ? new_state[int64_t(k) * N + n[c]] : T(0);
      rec[c][k] = k < H ? state[int64_t(2 * H + k) * N + n[c]] : T(0);
    }
    cp[c] = state[int64_t(3 * H) * N + n[c]];
  }
  T out[C];
  PYMETA_UNROLL
  for (int c = 0; c < C; ++c) out[c] = sw[lo.bout];
  for (int j = 0; j < H; ++j) {
    T cp_next[C];
    PYMETA_UNROLL
    for (int c = 0; c < C; ++c)
      cp_next[c] = j + 1 < H ? state[int64_t(3 * H + j + 1) * N + n[c]] : T(0);
    T z[C][4];
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) {
      const T b = sw[lo.b2 + q * H + j];
      PYMETA_UNROLL
      for (int c = 0; c < C; ++c) z[c][q] = b;
    }
    lstm_smem_gate_dots<HP, C>(z, sw + lo.w2i + j * HP, gs, in);
    lstm_smem_gate_dots<HP, C>(z, sw + lo.w2h + j * HP, gs, rec);
    const T wo = sw[lo.wout + j];
    PYMETA_UNROLL
    for (int c = 0; c < C; ++c) {
      T cc, hh;
      lstm_cell(z[c], cp[c], cc, hh);
      if (valid[c]) {
        new_state[int64_t(2 * H + j) * N + n[c]] = hh;
        new_state[int64_t(3 * H + j) * N + n[c]] = cc;
      }
      out[c] = out[c] + wo * hh;
      cp[c] = cp_next[c];
    }
  }
  PYMETA_UNROLL
  for (int c = 0; c < C; ++c)
    if (valid[c]) update[n[c]] = out[c] * s.out_scale;
}

// Element offset of row `row`, coordinate n, of a feature-major array of N columns: in 64 bits,
// or (kOff32, where the array has fewer than 2^31 elements) in 32, which saves the 64-bit
// products and LEA pairs of each access (~10% of the CUDA-core backward pass's instructions).
template <bool kOff32>
PYMETA_HD auto lstm_row_offset(int row, int64_t N, int64_t n) {
  if constexpr (kOff32) return row * int(N) + int(n);
  else return int64_t(row) * N + n;
}

// The backward's recompute of unit j of one layer: the gate pre-activations z go to workspace
// rows z_row + qH + j, the cell's h to row h_row + j; cp moves on to the next unit's c_prev.
template <bool kOff32 = false, typename T>
PYMETA_HD void lstm_recompute_unit(const T (&z)[4], T& cp, const T& cp_next, T* ws, int64_t N,
                                   int64_t n, int z_row, int h_row, int H, int j) {
  PYMETA_UNROLL
  for (int q = 0; q < 4; ++q) ws[lstm_row_offset<kOff32>(z_row + q * H + j, N, n)] = z[q];
  T c, h;
  lstm_cell(z, cp, c, h);
  ws[lstm_row_offset<kOff32>(h_row + j, N, n)] = h;
  cp = cp_next;
}

// Float rows of N after the backward's workspace rows for a bfloat16 state
// (lstm_smem_backward_thread's `sh`), none for a float one.
PYMETA_HD int lstm_opt_shadow_rows(int H, bool state_bf16) { return state_bf16 ? 3 * H : 0; }

// ---- backward: one coordinate n < N. Same work, order and workspace rows as
// lstm_opt_backward_coord (pymeta/lstm_optimizer.h), with the weights from shared memory.
// kAhead: the two backward loops load unit j + 1's inputs (its 4 z rows, c_prev, the incoming
// d h and d c) before unit j's math, so that their global latency overlaps a unit's work; the
// compiler can't hoist them itself past unit j's workspace stores (it can't rule out
// aliasing). The same arithmetic in the same order: the same bits either way. Measured 4%
// faster at H = 20 and slower at H = 32 (the kernels' choice: lstm_optimizer_cuda.cu).
// kOff32: 32-bit offsets (lstm_row_offset; the workspace rows, the largest array, have fewer
// than 2^31 elements).
// St: the storage type of state, d_new_state and d_state: T, or uint16_t (bfloat16 bits, with
// T = float: loads convert, d_state stores round to nearest even). A bfloat16 state also takes
// `sh`, 3H float rows of N (lstm_opt_shadow_rows): rows 0..H-1 and 2H..3H-1 get h1_prev and
// h2_prev as float, where the weight-gradient kernels read them (they read a float32 state's
// own rows), and rows H..2H-1 hold d h1(new) between the two layers (a float32 state keeps
// it in d_state's h1 rows; rounding it there would change layer 1's gradients). So the
// results are the float32 pass's on the upcast state, bit for bit, with d_state rounded.
template <int HP, typename T, bool kAhead = true, bool kOff32 = false, typename St = T>
PYMETA_HD void lstm_smem_backward_thread(const T* sw, const LstmOptScalars<T>& s, const T* grad,
                                         const St* state, const T* d_update,
                                         const St* d_new_state, T* d_grad, St* d_state, T* ws,
                                         int64_t N, int64_t n, T* sh = nullptr) {
  constexpr bool kCast = !std::is_same<St, T>::value;
  static_assert(!kCast || (std::is_same<T, float>::value && std::is_same<St, uint16_t>::value),
                "a state stored in another type is bfloat16 bits with float math");
  const int H = s.H, n_in = s.n_in;
  const LstmSmemLayout lo = lstm_smem_layout(H, HP);
  const LstmOptRows R = lstm_opt_rows(H, n_in);
  const int gs = H * HP;
  auto at = [N, n](int row) { return lstm_row_offset<kOff32>(row, N, n); };
  // d h1(new) between the layers: d_state's h1 rows (float state), or sh's rows H..2H-1
  T* dh1;
  if constexpr (kCast) dh1 = sh + int64_t(H) * N;
  else dh1 = d_state;
  const T g = grad[n];
  T x[1][2];
  lstm_preprocess(g, s, x[0]);
  ws[at(R.x)] = x[0][0];
  if (n_in > 1) ws[at(R.x + 1)] = x[0][1];

  // forward, layer 1
  T a1[1][HP], a2[1][HP];
  PYMETA_UNROLL
  for (int k = 0; k < HP; ++k) a2[0][k] = k < H ? state_ld(state[at(k)]) : T(0);
  if constexpr (kCast) {  // h1_prev as float, for the weight gradients
    PYMETA_UNROLL
    for (int k = 0; k < HP; ++k)
      if (k < H) sh[at(k)] = a2[0][k];
  }
  T cp = state_ld(state[at(H)]);
  for (int j = 0; j < H; ++j) {
    const T cp_next = j + 1 < H ? state_ld(state[at(H + j + 1)]) : T(0);
    T z[1][4];
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) {
      const int r = q * H + j;
      T acc = sw[lo.b1 + r];
      acc = acc + sw[lo.wi1 + 2 * r] * x[0][0];
      if (n_in > 1) acc = acc + sw[lo.wi1 + 2 * r + 1] * x[0][1];
      z[0][q] = acc;
    }
    lstm_smem_gate_dots<HP, 1>(z, sw + lo.w1h + j * HP, gs, a2);
    lstm_recompute_unit<kOff32>(z[0], cp, cp_next, ws, N, n, R.dz1, R.h1, H, j);
  }
  // forward, layer 2
  PYMETA_UNROLL
  for (int k = 0; k < HP; ++k) {
    a1[0][k] = k < H ? ws[at(R.h1 + k)] : T(0);
    a2[0][k] = k < H ? state_ld(state[at(2 * H + k)]) : T(0);
    if constexpr (kCast)  // h2_prev as float, for the weight gradients
      if (k < H) sh[at(2 * H + k)] = a2[0][k];
  }
  cp = state_ld(state[at(3 * H)]);
  for (int j = 0; j < H; ++j) {
    const T cp_next = j + 1 < H ? state_ld(state[at(3 * H + j + 1)]) : T(0);
    T z[1][4];
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) z[0][q] = sw[lo.b2 + q * H + j];
    lstm_smem_gate_dots<HP, 1>(z, sw + lo.w2i + j * HP, gs, a1);
    lstm_smem_gate_dots<HP, 1>(z, sw + lo.w2h + j * HP, gs, a2);
    lstm_recompute_unit<kOff32>(z[0], cp, cp_next, ws, N, n, R.dz2, R.h2, H, j);
  }

  // backward, head and layer 2: a1 accumulates d h1(new), a2 d h2_prev
  const T du = d_update[n] * s.out_scale;
  ws[at(R.du)] = du;
  PYMETA_UNROLL
  for (int k = 0; k < HP; ++k) {
    a1[0][k] = k < H ? state_ld(d_new_state[at(k)]) : T(0);
    a2[0][k] = T(0);
  }
  // unit j's loads: z (4 rows), d h2 from d_new_state, c2_prev, d c2 from d_new_state
  T nz[4], nv[3];
  auto load2 = [&](int j) {
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) nz[q] = ws[at(R.dz2 + q * H + j)];
    nv[0] = state_ld(d_new_state[at(2 * H + j)]);
    nv[1] = state_ld(state[at(3 * H + j)]);
    nv[2] = state_ld(d_new_state[at(3 * H + j)]);
  };
  if (kAhead) load2(0);
  for (int j = 0; j < H; ++j) {
    T z[4], dz[4], dc_prev, v[3];
    if (!kAhead) load2(j);
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) z[q] = nz[q];
    PYMETA_UNROLL
    for (int i = 0; i < 3; ++i) v[i] = nv[i];
    if (kAhead) load2(j + 1 < H ? j + 1 : j);  // the last unit reloads its own (unused)
    const T dh = du * sw[lo.wout + j] + v[0];
    lstm_cell_backward(z, v[1], dh, v[2], dz, dc_prev);
    state_st(d_state[at(3 * H + j)], dc_prev);
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) {
      const int r = q * H + j;
      ws[at(R.dz2 + r)] = dz[q];
      lstm_smem_axpy<HP>(a1[0], sw + lo.w2i + r * HP, dz[q]);
      lstm_smem_axpy<HP>(a2[0], sw + lo.w2h + r * HP, dz[q]);
    }
  }
  PYMETA_UNROLL
  for (int k = 0; k < HP; ++k) {
    if (k < H) {
      state_st(d_state[at(2 * H + k)], a2[0][k]);
      dh1[at(k)] = a1[0][k];  // d h1(new), read back by unit below
    }
    a2[0][k] = T(0);
  }

  // backward, layer 1: a2 accumulates d h1_prev
  T dx[2] = {T(0), T(0)};
  // unit j's loads: z (4 rows), c1_prev, d h1 (above, in dh1), d c1 from d_new_state
  auto load1 = [&](int j) {
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) nz[q] = ws[at(R.dz1 + q * H + j)];
    nv[0] = state_ld(state[at(H + j)]);
    nv[1] = dh1[at(j)];
    nv[2] = state_ld(d_new_state[at(H + j)]);
  };
  if (kAhead) load1(0);
  for (int j = 0; j < H; ++j) {
    T z[4], dz[4], dc_prev, v[3];
    if (!kAhead) load1(j);
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) z[q] = nz[q];
    PYMETA_UNROLL
    for (int i = 0; i < 3; ++i) v[i] = nv[i];
    if (kAhead) load1(j + 1 < H ? j + 1 : j);
    lstm_cell_backward(z, v[0], v[1], v[2], dz, dc_prev);
    state_st(d_state[at(H + j)], dc_prev);
    PYMETA_UNROLL
    for (int q = 0; q < 4; ++q) {
      const int r = q * H + j;
      ws[at(R.dz1 + r)] = dz[q];
      dx[0] = dx[0] + sw[lo.wi1 + 2 * r] * dz[q];
      if (n_in > 1) dx[1] = dx[1] + sw[lo.wi1 + 2 * r + 1] * dz[q];
      lstm_smem_axpy<HP>(a2[0], sw + lo.w1h + r * HP, dz[q]);
    }
  }
  PYMETA_UNROLL
  for (int k = 0; k < HP; ++k)
    if (k < H) state_st(d_state[at(k)], a2[0][k]);
  d_grad[n] = lstm_preprocess_backward(g, s, dx);
}

// ---- weight gradients: C_q = A_q B_q^T over one chunk of coordinates, one block per
// (kLstmWgTile x kLstmWgTile tile of C_q, chunk) -----------------------------------------------
// Shared tiles are row-major by A (B) row with kLstmWgTileK coordinates per row, padded to
// kLstmWgTileK + 4: 16-byte rows, and the 4 rows one thread reads at once fall in distinct
// banks. Loads: thread t reads coordinate t % 32 of rows t / 32 + 2 i (a warp reads 128
// contiguous bytes of one row). Sums: thread (ta, tb) = (t / 8, t % 8) owns entries
// (a0 + ta + 8 i, b0 + tb + 8 jj), i, jj < 4, each summed over the chunk's coordinates in
// ascending order, so the partial sums are bitwise reproducible.
constexpr int kLstmWgTile = 32;
constexpr int kLstmWgTileK = 32;
constexpr int kLstmWgThreads = 64;

struct LstmWgradPlan {
  LstmOptPairs pairs;
  LstmOptRows rows;
  int tile_start[4];       // tiles of pair q: [tile_start[q], tile_start[q + 1])
  int tiles_b[3];          // tiles along B rows of pair q
  int64_t partial_offset;  // elements from the workspace start to the partial sums
  int64_t chunks, chunk;
};

PYMETA_HD LstmWgradPlan lstm_wgrad_plan(int H, int n_in, int64_t N, int64_t chunk,
                                        int64_t partial_offset) {
  LstmWgradPlan p{};
  p.pairs = lstm_opt_pairs(H, n_in);
  p.rows = lstm_opt_rows(H, n_in);
  p.tile_start[0] = 0;
  for (int q = 0; q < 3; ++q) {
    p.tiles_b[q] = (p.pairs.mb[q] + kLstmWgTile - 1) / kLstmWgTile;
    p.tile_start[q + 1] =
        p.tile_start[q] + ((p.pairs.ma[q] + kLstmWgTile - 1) / kLstmWgTile) * p.tiles_b[q];
  }
  p.partial_offset = partial_offset;
  p.chunk = chunk;
  p.chunks = (N + chunk - 1) / chunk;
  return p;
}

struct LstmWgradTile {
  int q, a0, b0, ma, mb, arow0;
  int64_t chunk_index, n_begin, n_end;
};

PYMETA_HD LstmWgradTile lstm_wgrad_tile(const LstmWgradPlan& p, int tile, int64_t chunk_index,
                                        int64_t N) {
  LstmWgradTile t;
  t.q = tile < p.tile_start[1] ? 0 : tile < p.tile_start[2] ? 1 : 2;
  const int local = tile - p.tile_start[t.q];
  t.a0 = (local / p.tiles_b[t.q]) * kLstmWgTile;
  t.b0 = (local % p.tiles_b[t.q]) * kLstmWgTile;
  t.ma = p.pairs.ma[t.q];
  t.mb = p.pairs.mb[t.q];
  t.arow0 = t.q == 0 ? p.rows.dz1 : t.q == 1 ? p.rows.dz2 : p.rows.du;
  t.chunk_index = chunk_index;
  t.n_begin = chunk_index * p.chunk;
  t.n_end = t.n_begin + p.chunk < N ? t.n_begin + p.chunk : N;
  return t;
}

// Row k of B_q (see lstm_opt_pairs); nullptr is the row of ones.
template <typename T>
PYMETA_HD const T* lstm_wgrad_b_row(const LstmOptRows& R, int q, int k, const T* ws,
                                    const T* state, int H, int n_in, int64_t N) {
  if (q == 0)
    return k < n_in ? ws + (R.x + k) * N : k < n_in + H ? state + int64_t(k - n_in) * N : nullptr;
  if (q == 1)
    return k < H ? ws + (R.h1 + k) * N : k < 2 * H ? state + int64_t(2 * H + k - H) * N : nullptr;
  return k < H ? ws + (R.h2 + k) * N : nullptr;
}

template <typename T>
PYMETA_HD void lstm_wgrad_zero(T (&acc)[4][4]) {
  PYMETA_UNROLL
  for (int i = 0; i < 4; ++i) {
    PYMETA_UNROLL
    for (int jj = 0; jj < 4; ++jj) acc[i][jj] = T(0);
  }
}

// The rows thread t loads (lr + 2 i, i < 16, lr = t / 32), resolved once per block:
// a[i] / b[i] point at the row's coordinate t % 32 (nullptr: a row past the tile's end, read
// as 0); b_ones bit i: B row i is the row of ones.
template <typename T>
struct LstmWgradRows {
  const T* a[kLstmWgTile / 2];
  const T* b[kLstmWgTile / 2];
  unsigned b_ones;
};

template <typename T>
PYMETA_HD void lstm_wgrad_rows(const LstmWgradPlan& p, const LstmWgradTile& tl, const T* ws,
                               const T* state, int H, int n_in, int64_t N, int t,
                               LstmWgradRows<T>& r) {
  const int lk = t % 32, lr = t / 32;
  r.b_ones = 0;
  PYMETA_UNROLL
  for (int i = 0; i < kLstmWgTile / 2; ++i) {
    const int row = lr + 2 * i;
    const int a = tl.a0 + row, b = tl.b0 + row;
    r.a[i] = a < tl.ma ? ws + int64_t(tl.arow0 + a) * N + lk : nullptr;
    r.b[i] = nullptr;
    if (b < tl.mb) {
      const T* br = lstm_wgrad_b_row<T>(p.rows, tl.q, b, ws, state, H, n_in, N);
      if (br) r.b[i] = br + lk;
      else r.b_ones |= 1u << i;
    }
  }
}

// Thread t's share of one stage: coordinates [n, n + kLstmWgTileK) of the tile's rows.
template <typename T>
PYMETA_HD void lstm_wgrad_load(const LstmWgradTile& tl, const LstmWgradRows<T>& r, int64_t n,
                               T (&As)[kLstmWgTile][kLstmWgTileK + 4],
                               T (&Bs)[kLstmWgTile][kLstmWgTileK + 4], int t) {
  const int lk = t % 32, lr = t / 32;
  const bool in = n + lk < tl.n_end;
  PYMETA_UNROLL
  for (int i = 0; i < kLstmWgTile / 2; ++i) {
    const int row = lr + 2 * i;
    As[row][lk] = in && r.a[i] ? r.a[i][n] : T(0);
    Bs[row][lk] = !in ? T(0) : r.b[i] ? r.b[i][n] : (r.b_ones >> i & 1u) ? T(1) : T(0);
  }
}

template <typename T>
PYMETA_HD void lstm_wgrad_accumulate(const T (&As)[kLstmWgTile][kLstmWgTileK + 4],
                                     const T (&Bs)[kLstmWgTile][kLstmWgTileK + 4],
                                     T (&acc)[4][4], int t) {
  const int ta = t / 8, tb = t % 8;
  PYMETA_UNROLL
  for (int k = 0; k < kLstmWgTileK; k += 4) {
    T av[4][4], bv[4][4];
    PYMETA_UNROLL
    for (int i = 0; i < 4; ++i) {
      lstm_load4(&As[ta + 8 * i][k], av[i]);
      lstm_load4(&Bs[tb + 8 * i][k], bv[i]);
    }
    PYMETA_UNROLL
    for (int kk = 0; kk < 4; ++kk) {
      PYMETA_UNROLL
      for (int i = 0; i < 4; ++i) {
        PYMETA_UNROLL
        for (int jj = 0; jj < 4; ++jj) acc[i][jj] = acc[i][jj] + av[i][kk] * bv[jj][kk];
      }
    }
  }
}

template <typename T>
PYMETA_HD void lstm_wgrad_store(const LstmWgradPlan& p, const LstmWgradTile& tl,
                                const T (&acc)[4][4], T* workspace, int t) {
  const int ta = t / 8, tb = t % 8;
  T* partial = workspace + p.partial_offset + tl.chunk_index * p.pairs.off[3] + p.pairs.off[tl.q];
  PYMETA_UNROLL
  for (int i = 0; i < 4; ++i) {
    PYMETA_UNROLL
    for (int jj = 0; jj < 4; ++jj) {
      const int a = tl.a0 + ta + 8 * i, b = tl.b0 + tb + 8 * jj;
      if (a < tl.ma && b < tl.mb) partial[int64_t(a) * tl.mb + b] = acc[i][jj];
    }
  }
}

// ---- the sum over chunks (finish_kernel) ------------------------------------------------------
// Weight-gradient entry e (of seg_start[10], the 10 weights in order) sums its partial sum over
// every chunk: group g of kLstmFinishGroups sums chunks g, g + G, ... in order, then the group
// sums are added in order g = 0, 1, ...: a fixed order, so bitwise reproducible.
constexpr int kLstmFinishGroups = 8;

struct LstmFinishPlan {
  LstmOptSegment seg[10];
  int64_t seg_start[11];
  int64_t partial_offset, P, chunks;
};

PYMETA_HD LstmFinishPlan lstm_finish_plan(int H, int n_in, int64_t partial_offset,
                                          int64_t chunks) {
  LstmFinishPlan f{};
  f.seg_start[0] = 0;
  for (int d = 0; d < 10; ++d) {
    f.seg[d] = lstm_opt_segment(d, H, n_in);
    f.seg_start[d + 1] = f.seg_start[d] + int64_t(f.seg[d].rows) * f.seg[d].cols;
  }
  f.partial_offset = partial_offset;
  f.P = lstm_opt_pairs(H, n_in).off[3];
  f.chunks = chunks;
  return f;
}

// Entry e: its weight d and index `local` there; returns its offset in a chunk's partial sums.
PYMETA_HD int64_t lstm_finish_entry(const LstmFinishPlan& f, int64_t e, int& d, int64_t& local) {
  d = 0;
  while (e >= f.seg_start[d + 1]) ++d;
  local = e - f.seg_start[d];
  const int64_t i = local / f.seg[d].cols, j = local % f.seg[d].cols;
  return f.seg[d].src_off + i * f.seg[d].src_stride + j;
}

template <typename T>
PYMETA_HD T lstm_finish_group_sum(const LstmFinishPlan& f, const T* workspace, int64_t src,
                                  int group) {
  const T* part = workspace + f.partial_offset + src;
  T acc = T(0);
  for (int64_t c = group; c < f.chunks; c += kLstmFinishGroups) acc += part[c * f.P];
  return acc;
}

template <typename T>
PYMETA_HD T lstm_finish_total(const T (&group_sums)[kLstmFinishGroups]) {
  T total = group_sums[0];
  for (int g = 1; g < kLstmFinishGroups; ++g) total += group_sums[g];
  return total;
}

}  // namespace pymeta
