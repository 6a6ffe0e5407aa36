// max_pool2x2: the 2x2, stride-2 max-pool of the Conv-4 blocks (no padding, floor mode) over
// contiguous [planes, H, W] data, with the indices of F.max_pool2d(..., return_indices=True):
// the flat position ih * W + iw of each window's maximum inside its plane. The backward is
// aten's max_pool2d_with_indices_backward on those indices (pymeta/ops.py; a kernel of our
// own that wrote the zeros in the same pass measured no faster), so values, indices and
// gradients are max_pool2d's bit for bit.
//
// Why a kernel of our own: on the CPU, torch's NCHW max-pool runs one scalar window at a time
// (about 25 ms for the [75, 128, 28, 28] query batch of a Conv-4 MAML step on 2 cores, 12x
// its channels-last kernel); this one streams two input rows per output row.
#pragma once
#include "pymeta/common.h"

namespace pymeta {

// Where window element k (0..3) sits, relative to the window's top-left element.
PYMETA_HD int64_t max_pool2x2_offset(int32_t k, int64_t W) { return (k & 1) + (k >> 1) * W; }

// The maximum of one window (v00 v01 / v10 v11) and which element holds it (0..3, row-major),
// with max_pool2d's rule: scanning in row-major order, an element replaces the running
// maximum when it is greater or NaN. So the first of equal maxima wins, and the last NaN.
template <typename T>
PYMETA_HD void max_pool2x2_window(T v00, T v01, T v10, T v11, T& m, int32_t& k) {
  // Selects, not branches: they vectorize (which element wins is a coin toss on real
  // data, so branches mispredict). v != v tests NaN.
  m = v00;
  k = 0;
  bool c = (v01 > m) | (v01 != v01);
  m = c ? v01 : m;
  k = c ? 1 : k;
  c = (v10 > m) | (v10 != v10);
  m = c ? v10 : m;
  k = c ? 2 : k;
  c = (v11 > m) | (v11 != v11);
  m = c ? v11 : m;
  k = c ? 3 : k;
}

// One launch: `planes` contiguous [H, W] planes in, [H / 2, W / 2] out (floor division).
struct MaxPool2x2Launch {
  const void* x;     // [planes, H, W]
  void* out;         // [planes, H / 2, W / 2], x's dtype
  int64_t* indices;  // [planes, H / 2, W / 2]
  int64_t planes, H, W;
  DType dtype;       // Float32 or Float64
};

void max_pool2x2_cpu(const MaxPool2x2Launch& L);

}  // namespace pymeta
