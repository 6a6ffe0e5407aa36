// CPU kernels of inner_update: at::parallel_for over the tiles of the launch, plain
// contiguous inner loops (the compiler vectorizes them) over the shared math.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "pymeta/inner_update.h"

namespace pymeta {
namespace {

template <typename scalar_t>
struct Acc { using type = float; };
template <>
struct Acc<double> { using type = double; };

// Calls f.template operator()<scalar_t>() for the launch dtype.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f(float{}); break;
    case DType::Float64: f(double{}); break;
    case DType::Float16: f(c10::Half{}); break;
    case DType::BFloat16: f(c10::BFloat16{}); break;
  }
}

template <typename scalar_t>
void forward_tile(const InnerUpdateLaunch& L, const Tile& tile) {
  using acc_t = typename Acc<scalar_t>::type;
  const InnerUpdateTensor& e = L.t[tile.tensor];
  const int64_t n = L.map.n[tile.tensor];
  const int64_t c0 = tile.col0, c1 = std::min(n, c0 + L.map.cols_per_tile);
  const auto* __restrict p = static_cast<const scalar_t*>(e.in0);
  const auto* __restrict g = static_cast<const scalar_t*>(e.grad);
  const auto* __restrict lr = static_cast<const scalar_t*>(e.lr);
  auto* __restrict out = static_cast<scalar_t*>(e.out);
  const auto kind = static_cast<LrKind>(e.lr_kind);
  const acc_t lr0 = kind == LrKind::Scalar ? static_cast<acc_t>(L.lr_scalar)
                  : kind == LrKind::Tensor0d ? static_cast<acc_t>(lr[0]) : acc_t(0);
  for (int64_t r = tile.row0; r < tile.row1; ++r) {
    const scalar_t* __restrict pr = e.shared ? p : p + r * n;
    const scalar_t* __restrict gr = g + r * n;
    scalar_t* __restrict outr = out + r * n;
    if (kind == LrKind::Full) {
      for (int64_t c = c0; c < c1; ++c)
        outr[c] = static_cast<scalar_t>(sgd_step<acc_t>(pr[c], lr[c], gr[c]));
    } else {
      for (int64_t c = c0; c < c1; ++c)
        outr[c] = static_cast<scalar_t>(sgd_step<acc_t>(pr[c], lr0, gr[c]));
    }
  }
}

template <typename scalar_t>
void backward_tile(const InnerUpdateLaunch& L, const Tile& tile) {
  using acc_t = typename Acc<scalar_t>::type;
  const InnerUpdateTensor& e = L.t[tile.tensor];
  const int64_t n = L.map.n[tile.tensor];
  const int64_t c0 = tile.col0, c1 = std::min(n, c0 + L.map.cols_per_tile), w = c1 - c0;
  const auto* __restrict dout = static_cast<const scalar_t*>(e.in0);
  const auto* __restrict g = static_cast<const scalar_t*>(e.grad);
  const auto* __restrict lr = static_cast<const scalar_t*>(e.lr);
  auto* __restrict dg = static_cast<scalar_t*>(e.out);
  const auto kind = static_cast<LrKind>(e.lr_kind);
  const acc_t lr0 = kind == LrKind::Scalar ? static_cast<acc_t>(L.lr_scalar)
                  : kind == LrKind::Tensor0d ? static_cast<acc_t>(lr[0]) : acc_t(0);
  // Sums over tasks, one per column of the tile, in a fixed order.
  std::vector<acc_t> dp(e.dparam ? w : 0, acc_t(0)), dl(e.dlr ? w : 0, acc_t(0));
  for (int64_t r = tile.row0; r < tile.row1; ++r) {
    const scalar_t* __restrict dor = dout + r * n + c0;
    const scalar_t* __restrict gr = g + r * n + c0;
    if (dg) {
      scalar_t* __restrict dgr = dg + r * n + c0;
      if (kind == LrKind::Full) {
        for (int64_t c = 0; c < w; ++c)
          dgr[c] = static_cast<scalar_t>(sgd_step_dgrad<acc_t>(lr[c0 + c], dor[c]));
      } else {
        for (int64_t c = 0; c < w; ++c)
          dgr[c] = static_cast<scalar_t>(sgd_step_dgrad<acc_t>(lr0, dor[c]));
      }
    }
    if (e.dparam)
      for (int64_t c = 0; c < w; ++c) dp[c] += static_cast<acc_t>(dor[c]);
    if (e.dlr)
      for (int64_t c = 0; c < w; ++c) dl[c] += sgd_step_dlr<acc_t>(gr[c], dor[c]);
  }
  if (e.dparam) {
    auto* dpo = static_cast<scalar_t*>(e.dparam) + c0;
    for (int64_t c = 0; c < w; ++c) dpo[c] = static_cast<scalar_t>(dp[c]);
  }
  if (e.dlr) {
    if (kind == LrKind::Full) {
      auto* dlo = static_cast<scalar_t*>(e.dlr) + c0;
      for (int64_t c = 0; c < w; ++c) dlo[c] = static_cast<scalar_t>(dl[c]);
    } else {  // Tensor0d: one partial sum per column block
      acc_t s = 0;
      for (int64_t c = 0; c < w; ++c) s += dl[c];
      static_cast<acc_t*>(e.dlr)[tile.col_block] = s;
    }
  }
}

template <typename TileFn>
void for_each_tile(const InnerUpdateLaunch& L, TileFn fn) {
  at::parallel_for(0, L.num_tiles, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(L, locate_tile(L.map, b));
  });
}

}  // namespace

void inner_update_forward_cpu(const InnerUpdateLaunch& L) {
  dispatch_dtype(L.dtype, [&](auto tag) {
    for_each_tile(L, forward_tile<decltype(tag)>);
  });
}

void inner_update_backward_cpu(const InnerUpdateLaunch& L) {
  dispatch_dtype(L.dtype, [&](auto tag) {
    for_each_tile(L, backward_tile<decltype(tag)>);
  });
}

void inner_update_lr_finish_cpu(const LrFinishLaunch& L) {
  dispatch_dtype(L.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename Acc<scalar_t>::type;
    for (int k = 0; k < L.num; ++k) {
      const auto* part = static_cast<const acc_t*>(L.partials[k]);
      acc_t s = 0;
      for (int64_t i = 0; i < L.count[k]; ++i) s += part[i];
      *static_cast<scalar_t*>(L.dlr[k]) = static_cast<scalar_t>(s);
    }
  });
}

}  // namespace pymeta
