// inner_update: the MAML inner-loop SGD step for many tensors and many tasks at once.
//   forward   out[t, j]  = param[(t,) j] - lr[j] * grad[t, j]
//   backward  dgrad[t, j] = -lr[j] * dout[t, j]
//             dparam[j]   = sum_t dout[t, j]                    (shared params only)
//             dlr[j]      = -sum_t grad[t, j] * dout[t, j]      (a [] lr: also summed over j)
// The per-element math below is what both the CPU and the CUDA kernels run.
#pragma once
#include "pymeta/common.h"

struct CUstream_st;

namespace pymeta {

template <typename acc_t>
PYMETA_HD acc_t sgd_step(acc_t param, acc_t lr, acc_t grad) { return param - lr * grad; }

template <typename acc_t>
PYMETA_HD acc_t sgd_step_dgrad(acc_t lr, acc_t dout) { return -lr * dout; }

template <typename acc_t>
PYMETA_HD acc_t sgd_step_dlr(acc_t grad, acc_t dout) { return -grad * dout; }

// Where tensor i's learning rate comes from.
enum class LrKind : int32_t {
  Scalar = 0,   // the launch's lr_scalar (a Python float)
  Tensor0d = 1, // a one-element tensor (MAML++ per-layer per-step rate)
  Full = 2,     // a tensor of the parameter's shape (Meta-SGD)
};

// Kernel arguments are passed by value, and the table stays under the classic 4 KB
// kernel-parameter limit; longer lists take one launch per group of this many tensors.
constexpr int kInnerUpdateMaxTensors = 48;

struct InnerUpdateTensor {
  const void* in0;  // forward: param, [T, n] or [n] when shared;  backward: dout [T, n]
  const void* grad; // [T, n]
  const void* lr;   // [] or [n]; null for LrKind::Scalar
  void* out;        // forward: out [T, n];  backward: dgrad [T, n], or null if not wanted
  void* dparam;     // backward: [n], for shared params when wanted, else null
  void* dlr;        // backward: [n] for LrKind::Full; for LrKind::Tensor0d, acc-type
                    // partial sums, one per column block (summed by the finish step); or null
  int32_t shared;   // param is [n], broadcast over the T tasks
  int32_t lr_kind;  // LrKind
  int32_t vec_ok;   // every pointer is 16-byte aligned and n is a multiple of the vector width
  int32_t pad_;
};

struct InnerUpdateLaunch {
  TileMap<kInnerUpdateMaxTensors> map;  // rows = T
  InnerUpdateTensor t[kInnerUpdateMaxTensors];
  double lr_scalar;
  DType dtype;
  int32_t num_tiles;
};

// Backend entry points. The CUDA ones return a cudaError_t as int (0 = success).
void inner_update_forward_cpu(const InnerUpdateLaunch& launch);
void inner_update_backward_cpu(const InnerUpdateLaunch& launch);
int inner_update_forward_cuda(const InnerUpdateLaunch& launch, int threads, CUstream_st* stream);
int inner_update_backward_cuda(const InnerUpdateLaunch& launch, int threads, CUstream_st* stream);

// After the backward: dlr[k] = sum of partials[k][0:count[k]], cast to the lr dtype, for the
// tensors with LrKind::Tensor0d. A fixed order, so results are bitwise reproducible.
constexpr int kLrFinishMax = kInnerUpdateMaxTensors;
struct LrFinishLaunch {
  const void* partials[kLrFinishMax];  // acc type
  void* dlr[kLrFinishMax];             // one element, launch dtype
  int64_t count[kLrFinishMax];
  int32_t num;
  DType dtype;
};
void inner_update_lr_finish_cpu(const LrFinishLaunch& launch);
int inner_update_lr_finish_cuda(const LrFinishLaunch& launch, CUstream_st* stream);

}  // namespace pymeta
