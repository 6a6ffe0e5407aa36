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
  // One step of the coordinatewise LSTM optimizer (Andrychowicz et al. 2016), see
  // pymeta/lstm_optimizer.h. grad: [N]; state: [4, H, N] = (h1, c1, h2, c2), feature-major;
  // weights in nn.LSTMCell / nn.Linear layouts (w_ih1 [4H, n_in], w_hh1 [4H, H], b_* [4H],
  // w_out [1, H], b_out [1]); preprocessing: 'log_sign' (n_in = 2) or 'none' (n_in = 1).
  // Returns (update [N], new_state [4, H, N]).
  m.def("lstm_optimizer_step(Tensor grad, Tensor state, Tensor w_ih1, Tensor w_hh1, Tensor b_ih1, Tensor b_hh1, Tensor w_ih2, Tensor w_hh2, Tensor b_ih2, Tensor b_hh2, Tensor w_out, Tensor b_out, str preprocessing, float p, float out_scale) -> (Tensor, Tensor)");
  // Its backward: recomputes the step from the inputs, returns the gradients of (grad,
  // state, the 10 weights). Weight gradients are summed over coordinates in a fixed order.
  m.def("lstm_optimizer_step_backward(Tensor grad_update, Tensor grad_new_state, Tensor grad, Tensor state, Tensor w_ih1, Tensor w_hh1, Tensor b_ih1, Tensor b_hh1, Tensor w_ih2, Tensor w_hh2, Tensor b_ih2, Tensor b_hh2, Tensor w_out, Tensor b_out, str preprocessing, float p, float out_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The 2x2, stride-2 max-pool of Conv-4 (CPU kernel only), see pymeta/max_pool2x2.h.
  // x: [N, C, H, W] contiguous -> (out [N, C, H/2, W/2], indices int64, as max_pool2d's).
  m.def("max_pool2x2(Tensor x) -> (Tensor, Tensor)");
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
