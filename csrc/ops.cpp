// The schemas of every pymeta op, and the pybind11 module pymeta._C (build information).
// Implementations register per device next to each op's front (csrc/<op>.cpp); fake
// kernels and autograd are registered from Python (pymeta/ops.py).
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(pymeta, m) {
  // out[i] = params[i] - lr_i * grads[i], for all i in one launch. grads[i]: [T, *S_i];
  // params[i]: S_i (shared over tasks) or [T, *S_i]; lr_i: lr_tensors[i] ([] or S_i) when
  // given, else lr_scalar. Returns [T, *S_i] tensors.
  m.def("inner_update(Tensor[] params, Tensor[] grads, Tensor[]? lr_tensors, float lr_scalar) -> Tensor[]");
  // The backward of inner_update. shared[i] != 0 marks params[i] as shared. Returns
  // (dparams for the shared params only, in order; dgrads; dlrs), each list empty when
  // its need_* flag is false (dlrs also when lr_tensors is None).
  m.def("inner_update_backward(Tensor[] grad_outs, Tensor[] grads, Tensor[]? lr_tensors, float lr_scalar, int[] shared, bool need_dparams, bool need_dgrads, bool need_dlrs) -> (Tensor[], Tensor[], Tensor[])");
}

#ifndef PYMETA_CUDA_ARCHS
#define PYMETA_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "pymeta native kernels (the ops register with torch.ops.pymeta on import)";
  m.def("build_info", [] {
    pybind11::dict d;
    d["cpu_kernels"] = true;
#ifdef PYMETA_WITH_CUDA
    d["cuda_kernels"] = true;
#else
    d["cuda_kernels"] = false;
#endif
    d["cuda_archs"] = std::string(PYMETA_CUDA_ARCHS);
    d["torch_version"] = std::string(PYMETA_TORCH_VERSION);
    return d;
  });
}
