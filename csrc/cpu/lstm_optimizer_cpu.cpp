// CPU kernels of lstm_optimizer_step: at::parallel_for over groups of L consecutive
// coordinates, each group running the shared per-coordinate math of
// pymeta/lstm_optimizer.h on Lanes<T, L> (SIMD across coordinates).
// The backward works in fixed blocks of kLstmOptCpuBlock coordinates: each block keeps its
// workspace rows in a small local buffer (cache-resident), reduces its weight-gradient
// partial sums into the shared workspace, and a final pass sums the blocks in order.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "pymeta/lstm_optimizer.h"

namespace pymeta {
namespace {

// One 16-byte SIMD register per value (SSE2, the x86-64 baseline): wider vector types would
// be lowered through memory by the compiler.
template <typename T> struct LaneCount { static constexpr int value = 16 / sizeof(T); };

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

template <typename T, int HMAX>
void forward(const LstmOptLaunch& L) {
  constexpr int LN = LaneCount<T>::value;
  const auto W = weights_of<T>(L.w);
  const auto s = scalars_of<T>(L);
  const int64_t groups = (L.N + LN - 1) / LN;
  const auto* grad = static_cast<const T*>(L.grad);
  const auto* state = static_cast<const T*>(L.state);
  auto* update = static_cast<T*>(L.update);
  auto* new_state = static_cast<T*>(L.new_state);
  // A group costs ~ 20 H^2 flops per coordinate; aim for ~ 100k flops per task.
  const int64_t grain = std::max<int64_t>(1, 4096 / (int64_t(L.H) * L.H * LN + 1));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n = g * LN;
      const Col col{L.N, n, static_cast<int>(std::min<int64_t>(LN, L.N - n))};
      lstm_opt_forward_coord<HMAX, Lanes<T, LN>, T>(W, s, grad, state, update, new_state, col);
    }
  });
}

template <typename T, int HMAX>
void backward(const LstmOptLaunch& L) {
  constexpr int LN = LaneCount<T>::value;
  constexpr int64_t BC = kLstmOptCpuBlock;
  const auto W = weights_of<T>(L.w);
  const auto s = scalars_of<T>(L);
  const int H = L.H, n_in = L.n_in;
  const LstmOptRows R = lstm_opt_rows(H, n_in);
  const LstmOptPairs P = lstm_opt_pairs(H, n_in);
  const int64_t N = L.N, blocks = (N + BC - 1) / BC;
  const auto* grad = static_cast<const T*>(L.grad);
  const auto* state = static_cast<const T*>(L.state);
  const auto* d_update = static_cast<const T*>(L.d_update);
  const auto* d_new_state = static_cast<const T*>(L.d_new_state);
  auto* d_grad = static_cast<T*>(L.d_grad);
  auto* d_state = static_cast<T*>(L.d_state);
  auto* partial = static_cast<T*>(L.workspace);  // [blocks, P.off[3]]

  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> ws(static_cast<size_t>(R.total) * BC);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * BC, cnt = std::min<int64_t>(BC, N - n0);
      for (int64_t n = n0; n < n0 + cnt; n += LN) {
        const int c = static_cast<int>(std::min<int64_t>(LN, n0 + cnt - n));
        const Col col{N, n, c}, wc{BC, n - n0, c};
        lstm_opt_backward_coord<HMAX, Lanes<T, LN>, T>(W, s, grad, state, d_update, d_new_state,
                                                       d_grad, d_state, ws.data(), col, wc);
      }
      // This block's share of C_q = A_q B_q^T (see lstm_opt_pairs).
      T* out = partial + b * P.off[3];
      auto wrow = [&](int r) -> const T* { return ws.data() + int64_t(r) * BC; };
      auto srow = [&](int r) -> const T* { return state + int64_t(r) * N + n0; };
      for (int q = 0; q < 3; ++q) {
        for (int a = 0; a < P.ma[q]; ++a) {
          const T* arow = wrow(q == 0 ? R.dz1 + a : q == 1 ? R.dz2 + a : R.du);
          T* o = out + P.off[q] + int64_t(a) * P.mb[q];
          for (int k = 0; k < P.mb[q]; ++k) {
            const T* brow = nullptr;  // nullptr: the row of ones (bias)
            if (q == 0) brow = k < n_in ? wrow(R.x + k) : k < n_in + H ? srow(k - n_in) : nullptr;
            else if (q == 1) brow = k < H ? wrow(R.h1 + k) : k < 2 * H ? srow(2 * H + k - H) : nullptr;
            else brow = k < H ? wrow(R.h2 + k) : nullptr;
            o[k] = dot(arow, brow, cnt);
          }
        }
      }
    }
  });

  // Sum the blocks in order, into each weight's gradient.
  int64_t seg_start[11];
  LstmOptSegment seg[10];
  seg_start[0] = 0;
  for (int d = 0; d < 10; ++d) {
    seg[d] = lstm_opt_segment(d, H, n_in);
    seg_start[d + 1] = seg_start[d] + int64_t(seg[d].rows) * seg[d].cols;
  }
  at::parallel_for(0, seg_start[10], 256, [&](int64_t e0, int64_t e1) {
    int d = 0;
    for (int64_t e = e0; e < e1; ++e) {
      while (e >= seg_start[d + 1]) ++d;
      const int64_t local = e - seg_start[d];
      const int64_t i = local / seg[d].cols, j = local % seg[d].cols;
      const int64_t src = seg[d].src_off + i * seg[d].src_stride + j;
      T acc = 0;
      for (int64_t b = 0; b < blocks; ++b) acc += partial[b * P.off[3] + src];
      static_cast<T*>(L.d_w[d])[local] = acc;
    }
  });
}

}  // namespace

int64_t lstm_opt_workspace_bytes_cpu(const LstmOptLaunch& L) {
  const int64_t blocks = (L.N + kLstmOptCpuBlock - 1) / kLstmOptCpuBlock;
  const int64_t elem = L.dtype == DType::Float64 ? 8 : 4;
  return blocks * lstm_opt_pairs(L.H, L.n_in).off[3] * elem;
}

void lstm_opt_forward_cpu(const LstmOptLaunch& L) {
  dispatch_dtype(L.dtype, [&](auto tag) {
    dispatch_hidden(L.H, [&](auto hmax) { forward<decltype(tag), decltype(hmax)::value>(L); });
  });
}

void lstm_opt_backward_cpu(const LstmOptLaunch& L) {
  dispatch_dtype(L.dtype, [&](auto tag) {
    dispatch_hidden(L.H, [&](auto hmax) { backward<decltype(tag), decltype(hmax)::value>(L); });
  });
}

}  // namespace pymeta
