// Host emulation of the CUDA kernels of lstm_optimizer_step (no GPU needed): runs the
// per-thread functions of csrc/cuda/lstm_optimizer_thread.cuh the way the kernels call them
// (weights staged into a padded buffer, tiles of threads, the weight-gradient blocks stage by
// stage with every thread's load before any thread's sums) and compares them with the
// header's per-coordinate math (what the CPU kernels and the fallback CUDA kernels run).
// Built and run by tests/test_cuda_emu.py; exit status 0 = all equal.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <random>
#include <vector>

#include "emu_inputs.h"
#include "lstm_optimizer_thread.cuh"

using namespace pymeta;

static int failures = 0;

template <typename T>
static void expect_close(const char* what, const std::vector<T>& a, const std::vector<T>& b,
                         double rtol, double atol, int H, int n_in) {
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = a[i], y = b[i];
    if (!(std::fabs(x - y) <= atol + rtol * std::fabs(y))) {
      if (failures < 20)
        std::printf("FAIL %s (sizeof T %d, H %d, n_in %d) at %zu: %.17g vs %.17g\n", what,
                    int(sizeof(T)), H, n_in, i, x, y);
      ++failures;
      return;
    }
  }
}

template <typename T, int HP, int C>
static void run(int H, int n_in, int64_t N, int block, std::mt19937& rng) {
  auto rnd = [&](size_t n, double scale) { return emu_random<T>(n, scale, rng); };
  const EmuWeights<T> weights(H, n_in, rng);
  const LstmOptWeights<T> W = weights.view();
  LstmOptScalars<T> s;
  s.H = H;
  s.n_in = n_in;
  s.preproc = n_in == 2 ? int(LstmPreproc::LogSign) : int(LstmPreproc::None);
  const double p = 10.0;
  s.inv_p = T(1.0 / p);
  s.exp_p = T(std::exp(p));
  s.threshold = T(std::exp(-p));
  s.out_scale = T(0.1);
  std::vector<T> grad = rnd(N, 1e-3), state = rnd(4 * H * N, 0.5);
  grad[0] = 0;  // the g = 0 branch of log_sign

  // staged weights, with canaries past the end
  const LstmSmemLayout lo = lstm_smem_layout(H, HP);
  std::vector<T> sw(lo.total + 64, T(12345));
  for (int t = 0; t < block; ++t) lstm_stage_weights<HP>(sw.data(), W, H, n_in, t, block);
  for (int e = lo.total; e < lo.total + 64; ++e)
    if (sw[e] != T(12345)) { std::printf("FAIL staging wrote past the end\n"); ++failures; break; }
  if (lo.w2i % 4 || lo.w2h % 4 || (H * HP) % 4) { std::printf("FAIL alignment\n"); ++failures; }

  // forward: reference
  std::vector<T> u_ref(N), ns_ref(4 * H * N);
  for (int64_t n = 0; n < N; ++n)
    lstm_opt_forward_coord<kLstmOptMaxHidden, T, T>(W, s, grad.data(), state.data(), u_ref.data(),
                                                   ns_ref.data(), Col{N, n});
  // forward: persistent blocks as in forward_smem_kernel (grid of 3 blocks)
  std::vector<T> u(N, T(-777)), ns(4 * H * N, T(-777));
  const int grid = 3;
  const int64_t tile = int64_t(block) * C;
  for (int bx = 0; bx < grid; ++bx)
    for (int tx = 0; tx < block; ++tx)
      for (int64_t base = int64_t(bx) * tile; base < N; base += int64_t(grid) * tile) {
        int64_t n[C];
        bool valid[C];
        for (int c = 0; c < C; ++c) {
          const int64_t m = base + int64_t(c) * block + tx;
          valid[c] = m < N;
          n[c] = valid[c] ? m : base + tx;
        }
        if (!valid[0]) break;
        lstm_smem_forward_thread<HP, C, T>(sw.data(), s, grad.data(), state.data(), u.data(),
                                           ns.data(), N, n, valid);
      }
  const double rt = sizeof(T) == 8 ? 1e-13 : 1e-5, at = sizeof(T) == 8 ? 1e-14 : 1e-6;
  expect_close("update", u, u_ref, rt, at, H, n_in);
  expect_close("new_state", ns, ns_ref, rt, at, H, n_in);

  // backward: reference
  std::vector<T> du = rnd(N, 1.0), dns = rnd(4 * H * N, 1.0);
  const LstmOptRows R = lstm_opt_rows(H, n_in);
  // several 32-coordinate stages per chunk, or (block 16) more chunks than finish groups
  const int64_t chunk = block == 16 ? 16 : 64;
  const LstmOptPairs P = lstm_opt_pairs(H, n_in);
  const int64_t chunks = (N + chunk - 1) / chunk;
  const int64_t rows_elems = int64_t(R.total) * N;
  std::vector<T> dg_ref(N), ds_ref(4 * H * N), ws_ref(rows_elems);
  for (int64_t n = 0; n < N; ++n) {
    const Col col{N, n};
    lstm_opt_backward_coord<kLstmOptMaxHidden, T, T>(W, s, grad.data(), state.data(), du.data(),
                                                    dns.data(), dg_ref.data(), ds_ref.data(),
                                                    ws_ref.data(), col, col);
  }
  std::vector<T> dg(N, T(-777)), ds(4 * H * N, T(-777));
  std::vector<T> ws(rows_elems + chunks * P.off[3], T(-777));
  for (int bx = 0; bx < grid; ++bx)
    for (int tx = 0; tx < block; ++tx)
      for (int64_t n = int64_t(bx) * block + tx; n < N; n += int64_t(grid) * block)
        lstm_smem_backward_thread<HP, T>(sw.data(), s, grad.data(), state.data(), du.data(),
                                         dns.data(), dg.data(), ds.data(), ws.data(), N, n);
  expect_close("d_grad", dg, dg_ref, rt, at, H, n_in);
  expect_close("d_state", ds, ds_ref, rt, at, H, n_in);
  std::vector<T> ws_rows(ws.begin(), ws.begin() + rows_elems);
  expect_close("workspace rows", ws_rows, ws_ref, rt, at, H, n_in);
  {  // the plain loop (kAhead = false): the same arithmetic, so the same bits
    std::vector<T> dg0(N, T(-777)), ds0(4 * H * N, T(-777)), ws0(rows_elems, T(-777));
    for (int64_t n = 0; n < N; ++n)
      lstm_smem_backward_thread<HP, T, false>(sw.data(), s, grad.data(), state.data(), du.data(),
                                              dns.data(), dg0.data(), ds0.data(), ws0.data(), N, n);
    if (dg0 != dg || ds0 != ds || ws0 != ws_rows) {
      std::printf("FAIL backward: loads ahead differ from the plain loop (H %d)\n", H);
      ++failures;
    }
    // 32-bit offsets (PYMETA_LSTM_OFF32), both loop forms: the same bits
    for (int ahead = 0; ahead < 2; ++ahead) {
      std::vector<T> dg1(N, T(-777)), ds1(4 * H * N, T(-777)), ws1(rows_elems, T(-777));
      for (int64_t n = 0; n < N; ++n) {
        if (ahead)
          lstm_smem_backward_thread<HP, T, true, true>(sw.data(), s, grad.data(), state.data(),
                                                       du.data(), dns.data(), dg1.data(),
                                                       ds1.data(), ws1.data(), N, n);
        else
          lstm_smem_backward_thread<HP, T, false, true>(sw.data(), s, grad.data(), state.data(),
                                                        du.data(), dns.data(), dg1.data(),
                                                        ds1.data(), ws1.data(), N, n);
      }
      if (dg1 != dg || ds1 != ds || ws1 != ws_rows) {
        std::printf("FAIL backward: 32-bit offsets differ (H %d, ahead %d)\n", H, ahead);
        ++failures;
      }
    }
  }

  if constexpr (std::is_same<T, float>::value) {
    // a bfloat16 state (St = uint16_t): the float pass on the upcast state and d_new_state,
    // bit for bit, with d_state rounded; the shadow rows hold h1_prev and h2_prev as float
    std::vector<uint16_t> sb(4 * H * N), db(4 * H * N);
    std::vector<float> su(4 * H * N), du16(4 * H * N);
    for (int64_t i = 0; i < 4 * H * N; ++i) {
      sb[i] = f32_to_bf16(state[i]);
      db[i] = f32_to_bf16(dns[i]);
      su[i] = bf16_to_f32(sb[i]);
      du16[i] = bf16_to_f32(db[i]);
    }
    if (N > 2) {  // an h2_prev NaN (layer 2's recurrent input): only coordinate 2 gets NaN
      sb[int64_t(2 * H) * N + 2] = f32_to_bf16(NAN);
      su[int64_t(2 * H) * N + 2] = bf16_to_f32(sb[int64_t(2 * H) * N + 2]);
    }
    for (int ahead = 0; ahead < 2; ++ahead) {
      std::vector<float> dg0(N, -777.f), ds0(4 * H * N, -777.f), ws0(rows_elems, -777.f);
      std::vector<float> dg1(N, -777.f), ws1(rows_elems, -777.f);
      std::vector<float> sh(int64_t(lstm_opt_shadow_rows(H, true)) * N, -777.f);
      std::vector<uint16_t> ds1(4 * H * N, 0xdead);
      for (int64_t n = 0; n < N; ++n) {
        if (ahead) {
          lstm_smem_backward_thread<HP, T, true>(sw.data(), s, grad.data(), su.data(), du.data(),
                                                 du16.data(), dg0.data(), ds0.data(), ws0.data(), N, n);
          lstm_smem_backward_thread<HP, T, true, false, uint16_t>(
              sw.data(), s, grad.data(), sb.data(), du.data(), db.data(), dg1.data(), ds1.data(),
              ws1.data(), N, n, sh.data());
        } else {
          lstm_smem_backward_thread<HP, T, false>(sw.data(), s, grad.data(), su.data(), du.data(),
                                                  du16.data(), dg0.data(), ds0.data(), ws0.data(), N, n);
          lstm_smem_backward_thread<HP, T, false, false, uint16_t>(
              sw.data(), s, grad.data(), sb.data(), du.data(), db.data(), dg1.data(), ds1.data(),
              ws1.data(), N, n, sh.data());
        }
      }
      // the same bits, or both NaN (the host compiler may order a NaN's operands differently
      // in the two instantiations, and x86 keeps the first operand's payload)
      auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
        for (size_t i = 0; i < a.size(); ++i)
          if (std::memcmp(&a[i], &b[i], 4) && !(std::isnan(a[i]) && std::isnan(b[i]))) return false;
        return a.size() == b.size();
      };
      bool ok = same(dg0, dg1) && same(ws0, ws1);
      for (int64_t i = 0; ok && i < 4 * H * N; ++i)
        ok = ds1[i] == f32_to_bf16(ds0[i]) ||
             (std::isnan(ds0[i]) && std::isnan(bf16_to_f32(ds1[i])));
      for (int k = 0; ok && k < H; ++k)
        for (int64_t n = 0; ok && n < N; ++n)
          ok = !std::memcmp(&sh[int64_t(k) * N + n], &su[int64_t(k) * N + n], 4) &&
               !std::memcmp(&sh[int64_t(2 * H + k) * N + n], &su[int64_t(2 * H + k) * N + n], 4);
      if (!ok) {
        std::printf("FAIL backward: a bfloat16 state differs from the float pass on its upcast "
                    "values (H %d, ahead %d)\n", H, ahead);
        ++failures;
      }
      int bad = 0;  // the NaN reaches d_grad at coordinate 2 and stays there
      for (int64_t n = 0; n < N; ++n) bad += std::isnan(dg1[n]) != (n == 2);
      if (N > 2 && bad) {
        std::printf("FAIL backward: a bfloat16 NaN spread (H %d)\n", H);
        ++failures;
      }
    }
  }

  // weight gradients: every block of the grid (tiles x chunks), stage by stage
  const LstmWgradPlan plan = lstm_wgrad_plan(H, n_in, N, chunk, rows_elems);
  for (int tile = 0; tile < plan.tile_start[3]; ++tile)
    for (int64_t ch = 0; ch < plan.chunks; ++ch) {
      static T As[kLstmWgTile][kLstmWgTileK + 4], Bs[kLstmWgTile][kLstmWgTileK + 4];
      const LstmWgradTile tl = lstm_wgrad_tile(plan, tile, ch, N);
      T a4[kLstmWgThreads][4][4];
      for (int t = 0; t < kLstmWgThreads; ++t) lstm_wgrad_zero(a4[t]);
      std::vector<LstmWgradRows<T>> rows(kLstmWgThreads);
      for (int t = 0; t < kLstmWgThreads; ++t)
        lstm_wgrad_rows(plan, tl, ws.data(), state.data(), H, n_in, N, t, rows[t]);
      for (int64_t n = tl.n_begin; n < tl.n_end; n += kLstmWgTileK) {
        for (auto& r : As) for (auto& x : r) x = T(NAN);
        for (auto& r : Bs) for (auto& x : r) x = T(NAN);
        for (int t = 0; t < kLstmWgThreads; ++t) lstm_wgrad_load(tl, rows[t], n, As, Bs, t);
        for (int t = 0; t < kLstmWgThreads; ++t) lstm_wgrad_accumulate(As, Bs, a4[t], t);
      }
      for (int t = 0; t < kLstmWgThreads; ++t) lstm_wgrad_store(plan, tl, a4[t], ws.data(), t);
    }
  // reference partial sums, in double
  std::vector<double> want_all(P.off[3], 0.0);  // over all coordinates
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t n0 = ch * chunk, n1 = std::min<int64_t>(N, n0 + chunk);
    std::vector<T> got(P.off[3]), want(P.off[3]);
    for (int64_t e = 0; e < P.off[3]; ++e) got[e] = ws[rows_elems + ch * P.off[3] + e];
    for (int q = 0; q < 3; ++q)
      for (int a = 0; a < P.ma[q]; ++a)
        for (int b = 0; b < P.mb[q]; ++b) {
          double acc = 0;
          const int arow = (q == 0 ? R.dz1 : q == 1 ? R.dz2 : R.du) + a;
          for (int64_t n = n0; n < n1; ++n) {
            const T* br = lstm_wgrad_b_row<T>(plan.rows, q, b, ws.data(), state.data(), H, n_in, N);
            acc += double(ws[int64_t(arow) * N + n]) * (br ? double(br[n]) : 1.0);
          }
          want[P.off[q] + int64_t(a) * P.mb[q] + b] = T(acc);
          want_all[P.off[q] + int64_t(a) * P.mb[q] + b] += acc;
        }
    expect_close("weight-gradient partial sums", got, want, sizeof(T) == 8 ? 1e-12 : 1e-4,
                 sizeof(T) == 8 ? 1e-12 : 1e-4, H, n_in);
  }

  // the sum over chunks, as finish_kernel runs it: every entry of every weight, against the
  // double sum over all coordinates; every partial sum is some entry's (b_ih and b_hh share one)
  const LstmFinishPlan f = lstm_finish_plan(H, n_in, rows_elems, chunks);
  std::vector<T> got(f.seg_start[10]), want(f.seg_start[10]);
  std::vector<int> hits(P.off[3], 0);
  for (int64_t e = 0; e < f.seg_start[10]; ++e) {
    int d;
    int64_t local;
    const int64_t src = lstm_finish_entry(f, e, d, local);
    if (src < 0 || src >= P.off[3] || f.seg_start[d] + local != e) {
      std::printf("FAIL finish entry %lld maps outside (H %d)\n", (long long)e, H);
      ++failures;
      return;
    }
    T g[kLstmFinishGroups];
    for (int grp = 0; grp < kLstmFinishGroups; ++grp)
      g[grp] = lstm_finish_group_sum(f, ws.data(), src, grp);
    got[e] = lstm_finish_total(g);
    want[e] = T(want_all[src]);
    ++hits[src];
  }
  if (std::count(hits.begin(), hits.end(), 0)) {
    std::printf("FAIL finish: a partial sum belongs to no entry (H %d)\n", H);
    ++failures;
  }
  expect_close("weight gradients (sum over chunks)", got, want, sizeof(T) == 8 ? 1e-12 : 1e-4,
               sizeof(T) == 8 ? 1e-12 : 1e-4, H, n_in);
}

template <typename T>
static void run_all(std::mt19937& rng) {
  for (int n_in = 1; n_in <= 2; ++n_in) {
    run<T, 16, 1>(1, n_in, 150, 32, rng);
    run<T, 16, 2>(7, n_in, 150, 32, rng);
    run<T, 16, 1>(16, n_in, 97, 16, rng);
    run<T, 20, 1>(20, n_in, 150, 32, rng);
    run<T, 20, 2>(20, n_in, 133, 16, rng);
    run<T, 24, 1>(23, n_in, 70, 16, rng);
    run<T, 32, 1>(32, n_in, 150, 32, rng);
    run<T, 32, 2>(29, n_in, 101, 32, rng);
    run<T, 64, 1>(64, n_in, 70, 32, rng);
    run<T, 64, 1>(33, n_in, 70, 32, rng);
  }
}

// The float cell (lstm_cell's float overload: fractions sharing divisions, the host form of
// what the GPU runs with ex2 / rcp.approx) against the double cell of sigmoid and tanh, over
// gate values from 0 to the flush and overflow limits, Inf and NaN, in every gate.
static void check_float_cell(std::mt19937& rng) {
  const float inf = INFINITY, nan = NAN;
  const float zs[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 0.5f, -0.5f, 3.0f, -3.0f, 20.0f, -20.0f,
                      87.0f, -87.0f, 88.5f, -88.5f, 89.0f, -89.0f, 100.0f, -100.0f, 1e30f,
                      -1e30f, inf, -inf, nan};
  const float cps[] = {0.0f, 1.0f, -2.5f, 1e3f, -1e30f, inf, -inf};
  std::uniform_int_distribution<int> pick(0, int(sizeof(zs) / sizeof(zs[0])) - 1);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  auto same = [](double got, double want, double tol) {
    if (std::isnan(want)) return std::isnan(got);
    if (std::isinf(want)) return got == want;
    return std::fabs(got - want) <= tol;
  };
  for (int it = 0; it < 200000; ++it) {
    float z[4];
    for (int q = 0; q < 4; ++q) z[q] = it % 2 ? zs[pick(rng)] : normal(rng);
    const float cp = it % 3 ? cps[it % 7] : normal(rng);
    float c, h;
    lstm_cell(z, cp, c, h);
    const double zd[4] = {z[0], z[1], z[2], z[3]};
    double a[4], cd, tc, hd;
    lstm_cell_acts<double>(zd, double(cp), a, cd, tc, hd);
    // the GPU flushes activations below 2^-126 to 0 (as it did with a division per activation)
    const double tiny = std::ldexp(1.0, -126);
    for (double& v : a) v = std::fabs(v) < tiny ? 0.0 : v;
    cd = a[1] * cp + a[0] * a[2];
    hd = a[3] * std::tanh(cd);
    // tanh = (1 - e) / (1 + e) is exact to a few roundings in absolute terms only; c: a few
    // roundings of its terms, g's absolute error, and the flush; h: its own roundings, tanh's
    // absolute error and c's error through tanh (slope <= 1)
    const double eps = std::ldexp(1.0, -23);
    const double tol_c = 6 * eps * (std::fabs(a[1] * cp) + std::fabs(a[0] * a[2])) +
                         2 * eps * a[0] + 1e-37;
    const double tol_h = 6 * eps * std::fabs(hd) + 2 * eps * a[3] + tol_c;
    if (!same(c, cd, tol_c) || !same(h, hd, tol_h)) {
      if (failures < 20)
        std::printf("FAIL float cell z = (%g, %g, %g, %g), c_prev %g: c %.9g vs %.9g, h %.9g vs "
                    "%.9g\n", z[0], z[1], z[2], z[3], cp, c, cd, h, hd);
      ++failures;
    }
  }
}

// The bfloat16 rounding on vectors (the CPU's staging loops; a mask in place of the scalar
// form's select) against the scalar form, over every float bit pattern.
static void check_bf16_vector_rounding() {
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  int64_t bad = 0;
  for (uint64_t b = 0; b < (uint64_t(1) << 32); b += 8) {
    u32x8 v;
    for (int l = 0; l < 8; ++l) v[l] = uint32_t(b + l);
    f32_bits_to_bf16_bits(v);
    for (int l = 0; l < 8; ++l) {
      uint32_t u = uint32_t(b + l);
      f32_bits_to_bf16_bits(u);
      if (u != v[l] && bad++ < 5)
        std::printf("bf16 rounding of %08x: scalar %04x, vector %04x\n", uint32_t(b + l), u, v[l]);
    }
  }
  if (bad) ++failures;
}

int main() {
  std::mt19937 rng(1234);
  check_bf16_vector_rounding();
  check_float_cell(rng);
  run_all<double>(rng);
  run_all<float>(rng);
  std::printf(failures ? "lstm_emu: %d FAILURES\n" : "lstm_emu: all equal\n", failures);
  return failures ? 1 : 0;
}
