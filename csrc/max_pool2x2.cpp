// The torch-facing front of max_pool2x2: argument checks (each naming the argument), output
// allocation and the CPU registration. CPU only: on CUDA, torch's own max-pool is fast and
// pymeta.models calls F.max_pool2d there.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "pymeta/max_pool2x2.h"

namespace pymeta {
namespace {

using at::Tensor;

// Messages match pymeta/reference.py.
std::tuple<Tensor, Tensor> max_pool2x2(const Tensor& x) {
  const char* op = "pymeta.max_pool2x2";
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   ": x must be float32 or float64, not torch.",
                   c10::getDtypeNames(x.scalar_type()).first);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be [N, C, H, W]; got ", x.dim(), " dimensions");
  TORCH_CHECK_VALUE(x.size(2) >= 2 && x.size(3) >= 2, op, ": x must be at least 2x2 in H and W; got ",
                    x.size(2), "x", x.size(3));
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous (NCHW); call .contiguous() first");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  Tensor out = at::empty({N, C, H / 2, W / 2}, x.options());
  Tensor indices = at::empty({N, C, H / 2, W / 2}, x.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, indices};
  MaxPool2x2Launch L{x.data_ptr(), out.data_ptr(), indices.data_ptr<int64_t>(), N * C, H, W,
                     x.scalar_type() == at::kDouble ? DType::Float64 : DType::Float32};
  max_pool2x2_cpu(L);
  return {out, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(pymeta, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2);
}

}  // namespace pymeta
