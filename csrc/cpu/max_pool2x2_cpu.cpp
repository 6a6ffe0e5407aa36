// CPU kernel of max_pool2x2: at::parallel_for over planes; per output row, one pass over the
// two input rows under it.
#include <ATen/Parallel.h>

#include <algorithm>

#include "pymeta/max_pool2x2.h"

namespace pymeta {
namespace {

// Output elements per inner pass: the window codes of one pass stay in a small local buffer.
constexpr int64_t kChunk = 64;

// One chunk of an output row: the window maxima (stride-2 loads, selects: gcc vectorizes it
// into 16-byte vectors) and each window's code k; then the int64 indices from the codes.
template <typename T>
inline void pool_chunk(const T* __restrict r0, const T* __restrict r1, T* __restrict out,
                       int64_t* __restrict idx, int64_t first, int64_t count, int64_t W) {
  int32_t code[kChunk];
  for (int64_t i = 0; i < count; ++i)
    max_pool2x2_window(r0[2 * i], r0[2 * i + 1], r1[2 * i], r1[2 * i + 1], out[i], code[i]);
  for (int64_t i = 0; i < count; ++i) idx[i] = first + 2 * i + max_pool2x2_offset(code[i], W);
}

template <typename T>
void pool_planes(const MaxPool2x2Launch& L, int64_t begin, int64_t end) {
  const int64_t H = L.H, W = L.W, OH = H / 2, OW = W / 2;
  const T* x = static_cast<const T*>(L.x) + begin * H * W;
  T* out = static_cast<T*>(L.out) + begin * OH * OW;
  int64_t* idx = L.indices + begin * OH * OW;
  for (int64_t pl = begin; pl < end; ++pl, x += H * W) {
    for (int64_t oh = 0; oh < OH; ++oh, out += OW, idx += OW) {
      const T* r0 = x + 2 * oh * W;
      for (int64_t c = 0; c < OW; c += kChunk)
        pool_chunk(r0 + 2 * c, r0 + W + 2 * c, out + c, idx + c, 2 * oh * W + 2 * c,
                   std::min(kChunk, OW - c), W);
    }
  }
}

}  // namespace

void max_pool2x2_cpu(const MaxPool2x2Launch& L) {
  // grain: about 16k input elements per task, so small layers stay on one thread
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, L.H * L.W));
  at::parallel_for(0, L.planes, grain, [&](int64_t begin, int64_t end) {
    if (L.dtype == DType::Float64)
      pool_planes<double>(L, begin, end);
    else
      pool_planes<float>(L, begin, end);
  });
}

}  // namespace pymeta
