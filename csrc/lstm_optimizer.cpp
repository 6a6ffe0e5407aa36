// The torch-facing front of lstm_optimizer_step: argument checks (each naming the argument),
// output and workspace allocation, and the per-device registrations. The kernels
// (csrc/cpu/lstm_optimizer_cpu.cpp, csrc/cuda/lstm_optimizer_cuda.cu) see only the plain
// launch table of pymeta/lstm_optimizer.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "pymeta/lstm_optimizer.h"

#ifdef PYMETA_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace pymeta {
namespace {

using at::Tensor;

const char* const kWeightNames[10] = {"w_ih1", "w_hh1", "b_ih1", "b_hh1", "w_ih2",
                                      "w_hh2", "b_ih2", "b_hh2", "w_out", "b_out"};

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << s;
  return o.str();
}

struct Dims {
  int64_t N;
  int64_t H;
  int64_t n_in;
  LstmPreproc preproc;
  bool blocked;  // state [ceil(N / 16), 4, H, 16] (see lstm_optimizer_step below)
};

std::vector<int64_t> weight_shape(int d, int64_t H, int64_t n_in) {
  switch (d) {
    case 0: return {4 * H, n_in};
    case 1: case 4: case 5: return {4 * H, H};
    case 8: return {1, H};
    case 9: return {1};
    default: return {4 * H};
  }
}

// The checks shared by the forward and the backward; messages match pymeta/reference.py.
Dims check_args(const char* op, const Tensor& grad, const Tensor& state,
                const std::vector<Tensor>& w, const std::string& preprocessing, double p,
                double out_scale) {
  Dims d{};
  TORCH_CHECK_VALUE(preprocessing == "log_sign" || preprocessing == "none", op,
                    ": preprocessing must be 'log_sign' or 'none', not '", preprocessing, "'");
  d.preproc = preprocessing == "log_sign" ? LstmPreproc::LogSign : LstmPreproc::None;
  d.n_in = d.preproc == LstmPreproc::LogSign ? 2 : 1;
  TORCH_CHECK_VALUE(d.preproc == LstmPreproc::None || (std::isfinite(p) && p > 0), op,
                    ": p must be a finite number > 0 for log_sign preprocessing, got ", p);
  TORCH_CHECK_VALUE(std::isfinite(out_scale), op, ": out_scale must be a finite number, got ",
                    out_scale);
  TORCH_CHECK_TYPE(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble, op,
                   ": grad has dtype ", grad.scalar_type(),
                   "; supported are float32 and float64");
  TORCH_CHECK_VALUE(grad.dim() == 1, op, ": grad must be 1-D [N] (flatten it), got shape ",
                    shape_str(grad.sizes()));
  {
    // log_sign's threshold e^-p must be a normal number of the math dtype (so is then its
    // factor e^p): past it e^p overflows, or a flushed e^-p sends a zero grad down the log
    // branch (NaN). reference.LSTM_MAX_P has the bounds.
    const bool f64 = grad.scalar_type() == at::kDouble;
    const double tiny = f64 ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
    TORCH_CHECK_VALUE(d.preproc == LstmPreproc::None || std::exp(-p) >= tiny, op, ": p = ", p,
                      " is too large for ", f64 ? "float64" : "float32",
                      " math: e^-p must be a normal number, p <= ", f64 ? "708.39" : "87.33");
  }
  d.N = grad.size(0);
  const auto dtype = grad.scalar_type();
  const auto device = grad.device();
  auto same = [&](const Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(),
                     " but grad has ", dtype, "; all tensors of one call share a dtype");
    TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(),
                      " but grad is on ", device, "; all tensors of one call share a device");
  };
  // The state may also be stored in bfloat16 when the math is float32 (state_dtype_ok).
  TORCH_CHECK_TYPE(state.scalar_type() == dtype ||
                       (state.scalar_type() == at::kBFloat16 && dtype == at::kFloat),
                   op, ": state has dtype ", state.scalar_type(), " but grad has ", dtype,
                   "; state shares grad's dtype, or is bfloat16 with float32 grad "
                   "(bfloat16 storage, float32 math)");
  TORCH_CHECK_VALUE(state.device() == device, op, ": state is on ", state.device(),
                    " but grad is on ", device, "; all tensors of one call share a device");
  // feature-major [4, H, N], or blocked [ceil(N / 16), 4, H, 16]: told apart by the rank
  d.blocked = state.dim() == 4;
  const int64_t blocks = (d.N + 15) / 16;
  TORCH_CHECK_VALUE(d.blocked ? state.size(0) == blocks && state.size(1) == 4 &&
                                    state.size(3) == 16
                              : state.dim() == 3 && state.size(0) == 4 && state.size(2) == d.N,
                    op, ": state has shape ", shape_str(state.sizes()),
                    "; expected [4, H, N] with N = ", d.N,
                    " (h1, c1, h2, c2, feature-major), or the blocked layout [", blocks,
                    ", 4, H, 16] ([ceil(N / 16), 4, H, 16])");
  d.H = state.size(d.blocked ? 2 : 1);
  TORCH_CHECK_VALUE(d.H >= 1 && d.H <= kLstmOptMaxHidden, op, ": hidden size H = ", d.H,
                    d.blocked ? " (state.shape[2])" : " (state.shape[1])",
                    " is not supported; 1 <= H <= ", kLstmOptMaxHidden);
  TORCH_CHECK_VALUE(state.is_contiguous(), op, ": state must be contiguous (layout ",
                    d.blocked ? "[ceil(N / 16), 4, H, 16], blocked" : "[4, H, N], feature-major",
                    ")");
  TORCH_CHECK_VALUE(w.size() == 10, op, ": expected 10 weight tensors, got ", w.size());
  for (int i = 0; i < 10; ++i) {
    same(w[i], kWeightNames[i]);
    const auto expect = weight_shape(i, d.H, d.n_in);
    TORCH_CHECK_VALUE(w[i].sizes() == at::IntArrayRef(expect), op, ": ", kWeightNames[i],
                      " has shape ", shape_str(w[i].sizes()), "; expected ", shape_str(expect),
                      " for H = ", d.H, " and n_in = ", d.n_in);
  }
  return d;
}

DType to_dtype(at::ScalarType t) { return t == at::kDouble ? DType::Float64 : DType::Float32; }

#ifdef PYMETA_WITH_CUDA
#define PYMETA_DEVICE_GUARD(t) \
  std::optional<c10::cuda::CUDAGuard> guard_; \
  if ((t).is_cuda()) guard_.emplace((t).device())
#else
#define PYMETA_DEVICE_GUARD(t) (void)0
#endif

LstmOptLaunch make_launch(const Dims& d, const Tensor& grad, const Tensor& state,
                          const std::vector<Tensor>& w, double p, double out_scale) {
  LstmOptLaunch L{};
  L.grad = grad.data_ptr();
  L.state = state.data_ptr();
  for (int i = 0; i < 10; ++i) L.w[i] = w[i].data_ptr();
  L.N = d.N;
  L.H = static_cast<int32_t>(d.H);
  L.n_in = static_cast<int32_t>(d.n_in);
  L.preproc = static_cast<int32_t>(d.preproc);
  L.dtype = to_dtype(grad.scalar_type());
  L.p = p;
  L.out_scale = out_scale;
  return L;
}

std::vector<Tensor> contiguous_weights(const std::vector<Tensor>& w) {
  std::vector<Tensor> out;
  out.reserve(w.size());
  for (const auto& t : w) out.push_back(t.contiguous());
  return out;
}

// ---- bfloat16 state storage -------------------------------------------------------------------
// A bfloat16 state (float32 grad and weights) keeps the math float32. The kernels that read
// bfloat16 directly (the CPU forward and backward; on the GPU the tensor-core forward, H <= 32,
// sm_80+, and the backward's CUDA-core pass where its shared memory fits) convert on load and
// round on store. Elsewhere (the other GPU forward kernels, a GPU without the shared memory,
// or PYMETA_LSTM_BF16_NATIVE=0) the state's columns are converted in chunks of
// bf16_chunk(N) coordinates into a float32 scratch buffer, the float32 kernels run on the
// chunk, and new_state / d_state are rounded back. Either way the results are exactly the float32 op's
// on state.float(), rounded (nearest even). The chunks' extra memory is two (forward) or three
// (backward) float32 scratch chunks rather than float32 copies of whole tensors; the GPU
// backward reads bfloat16 only while its workspace stays under a limit
// (lstm_opt_backward_reads_bf16_cuda), because it grows with N.
// PYMETA_LSTM_BF16_CHUNK overrides the chunk length (tests use it to cross chunk borders).
int64_t bf16_chunk(const Tensor& grad) {
  if (const char* env = std::getenv("PYMETA_LSTM_BF16_CHUNK")) {
    const long long v = std::atoll(env);
    if (v > 0) return v;
  }
  // CPU: 16k coordinates = 5 MB per float32 scratch chunk at H = 20 (stays in cache between
  // the conversion and the kernel); CUDA: 128k = 42 MB per chunk at H = 20 (the backward's
  // three chunks stay well under its bfloat16 tensors at large N; ~15 launches per chunk).
  return grad.is_cpu() ? (int64_t(1) << 14) : (int64_t(1) << 17);
}

bool bf16_direct() {
  const char* env = std::getenv("PYMETA_LSTM_BF16_NATIVE");
  return !(env && env[0] == '0');
}

// A contiguous [4, H, n] float32 view of the first 4 H n elements of a flat scratch buffer.
Tensor scratch_view(const Tensor& buf, int64_t H, int64_t n) {
  return buf.narrow(0, 0, 4 * H * n).view({4, H, n});
}

// ---- forward ----------------------------------------------------------------------------------
// The kernels on one contiguous call of d.N coordinates: grad and update of grad's dtype,
// state and new_state of state's (grad's, or bfloat16; update and new_state may be slices of
// larger outputs). Returns false, having done nothing, when the state is bfloat16 and no
// kernel of this device reads it directly.
bool run_forward(const Dims& d, const Tensor& grad, const Tensor& state,
                 const std::vector<Tensor>& w, double p, double out_scale, const Tensor& update,
                 const Tensor& new_state) {
  if (d.N == 0) return true;
  LstmOptLaunch L = make_launch(d, grad, state, w, p, out_scale);
  L.update = update.data_ptr();
  L.new_state = new_state.data_ptr();
  L.state_bf16 = state.scalar_type() == at::kBFloat16;
  if (grad.is_cpu()) {
    lstm_opt_forward_cpu(L);
    return true;
  }
#ifdef PYMETA_WITH_CUDA
  const int err = lstm_opt_forward_cuda(
      L, c10::cuda::getCurrentCUDAStream(grad.device().index()).stream());
  if (err == kLstmOptNoKernel) return false;
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
#endif
  return true;
}

// ---- the blocked state layout -----------------------------------------------------------------
// state [B, 4, H, 16], B = ceil(N / 16): the 4H rows of coordinates 16 b .. 16 b + 15 in one
// block, so that the GPU's warp step of 16 coordinates reads and writes one contiguous run
// (feature-major, it touches 4H separate 64-byte pieces). The op is defined as the
// feature-major op on the 16 B coordinates with grad padded by zeros: padding coordinates
// have state of their own, stepped with a zero grad, and never reach update. Where no kernel
// reads it (the CPU, the backward, float64, other H), these convert around the feature-major
// kernels.
Tensor to_feature_major(const Tensor& blocked) {  // [B, 4, H, 16] -> [4, H, 16 B]
  return blocked.permute({1, 2, 0, 3}).reshape({4, blocked.size(2), 16 * blocked.size(0)});
}
Tensor to_blocked(const Tensor& fm) {  // [4, H, 16 B] -> [B, 4, H, 16], a tensor of its own
  // (at B <= 1 the permuted view is already contiguous: .contiguous() would return a view)
  return fm.view({4, fm.size(1), fm.size(2) / 16, 16})
      .permute({2, 0, 1, 3})
      .clone(at::MemoryFormat::Contiguous);
}
Tensor pad_to_blocks(const Tensor& v) {  // [N] -> [16 ceil(N / 16)], zeros past N
  const int64_t N = v.size(0), pad = (N + 15) / 16 * 16 - N;
  return pad ? at::constant_pad_nd(v, {0, pad}, 0) : v;
}
Tensor first_n(const Tensor& v, int64_t N) {  // a tensor of its own (an op's output)
  return v.size(0) == N ? v : v.narrow(0, 0, N).clone();
}

std::tuple<Tensor, Tensor> lstm_optimizer_step(
    const Tensor& grad_in, const Tensor& state, const Tensor& w_ih1, const Tensor& w_hh1,
    const Tensor& b_ih1, const Tensor& b_hh1, const Tensor& w_ih2, const Tensor& w_hh2,
    const Tensor& b_ih2, const Tensor& b_hh2, const Tensor& w_out, const Tensor& b_out,
    c10::string_view preprocessing, double p, double out_scale) {
  const char* op = "pymeta.lstm_optimizer_step";
  const std::vector<Tensor> w_in{w_ih1, w_hh1, b_ih1, b_hh1, w_ih2, w_hh2, b_ih2, b_hh2, w_out, b_out};
  const Dims d = check_args(op, grad_in, state, w_in, std::string(preprocessing), p, out_scale);
  PYMETA_DEVICE_GUARD(grad_in);
  const Tensor grad = grad_in.contiguous();
  const auto w = contiguous_weights(w_in);
  if (d.blocked) {
#ifdef PYMETA_WITH_CUDA
    // a kernel that reads the blocked layout, if one applies (bfloat16: unless
    // PYMETA_LSTM_BF16_NATIVE=0 asks for the conversion, see bf16_direct)
    if (grad.is_cuda() && d.N > 0 && (state.scalar_type() == grad.scalar_type() || bf16_direct())) {
      Tensor update = at::empty({d.N}, grad.options());
      Tensor new_state = at::empty(state.sizes(), state.options());
      LstmOptLaunch L = make_launch(d, grad, state, w, p, out_scale);
      L.update = update.data_ptr();
      L.new_state = new_state.data_ptr();
      L.state_bf16 = state.scalar_type() == at::kBFloat16;
      L.blocked = 1;
      const int err = lstm_opt_forward_cuda(
          L, c10::cuda::getCurrentCUDAStream(grad.device().index()).stream());
      if (err != kLstmOptNoKernel) {
        C10_CUDA_CHECK(static_cast<cudaError_t>(err));
        return {update, new_state};
      }
    }
#endif
    auto [update, new_state] = lstm_optimizer_step(
        pad_to_blocks(grad), to_feature_major(state), w[0], w[1], w[2], w[3], w[4], w[5], w[6],
        w[7], w[8], w[9], preprocessing, p, out_scale);
    return {first_n(update, d.N), to_blocked(new_state)};
  }
  Tensor update = at::empty({d.N}, grad.options());
  Tensor new_state = at::empty({4, d.H, d.N}, state.options());
  if ((state.scalar_type() == grad.scalar_type() || bf16_direct()) &&
      run_forward(d, grad, state, w, p, out_scale, update, new_state))
    return {update, new_state};
  // bfloat16 state, converted in chunks
  const int64_t C = std::min(bf16_chunk(grad), d.N);
  const Tensor s_buf = at::empty({4 * d.H * C}, grad.options());
  const Tensor n_buf = at::empty({4 * d.H * C}, grad.options());
  for (int64_t c0 = 0; c0 < d.N; c0 += C) {
    Dims dc = d;
    dc.N = std::min(C, d.N - c0);
    const Tensor s = scratch_view(s_buf, d.H, dc.N), ns = scratch_view(n_buf, d.H, dc.N);
    s.copy_(state.narrow(2, c0, dc.N));
    run_forward(dc, grad.narrow(0, c0, dc.N), s, w, p, out_scale, update.narrow(0, c0, dc.N), ns);
    new_state.narrow(2, c0, dc.N).copy_(ns);
  }
  return {update, new_state};
}

// ---- backward ---------------------------------------------------------------------------------
using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                  Tensor, Tensor, Tensor, Tensor, Tensor>;

// The kernels on one contiguous call (state, grad_new_state and d_state of state's dtype: grad's,
// or bfloat16; the rest of grad's; d_grad and d_state may be slices of larger outputs). Writes
// the weight gradients of these d.N coordinates into dw. Returns false, having done nothing,
// when the state is bfloat16 and no kernel of this device reads it directly.
bool run_backward(const Dims& d, const Tensor& grad, const Tensor& state,
                  const std::vector<Tensor>& w, double p, double out_scale,
                  const Tensor& grad_update, const Tensor& grad_new_state, const Tensor& d_grad,
                  const Tensor& d_state, const std::vector<Tensor>& dw) {
  if (d.N == 0) {
    for (const auto& t : dw) t.zero_();
    return true;
  }
  LstmOptLaunch L = make_launch(d, grad, state, w, p, out_scale);
  L.state_bf16 = state.scalar_type() == at::kBFloat16;
  L.d_update = grad_update.data_ptr();
  L.d_new_state = grad_new_state.data_ptr();
  L.d_grad = d_grad.data_ptr();
  L.d_state = d_state.data_ptr();
  for (int i = 0; i < 10; ++i) L.d_w[i] = dw[i].data_ptr();
  if (grad.is_cpu()) {
    Tensor ws = at::empty({lstm_opt_workspace_bytes_cpu(L)}, grad.options().dtype(at::kByte));
    L.workspace = ws.data_ptr();
    lstm_opt_backward_cpu(L);
  } else {
#ifdef PYMETA_WITH_CUDA
    if (L.state_bf16 && !lstm_opt_backward_reads_bf16_cuda(L)) return false;
    Tensor ws = at::empty({lstm_opt_workspace_bytes_cuda(L)}, grad.options().dtype(at::kByte));
    L.workspace = ws.data_ptr();
    const int err = lstm_opt_backward_cuda(
        L, c10::cuda::getCurrentCUDAStream(grad.device().index()).stream());
    if (err == kLstmOptNoKernel) return false;
    C10_CUDA_CHECK(static_cast<cudaError_t>(err));
#endif
  }
  return true;
}

BackwardResult lstm_optimizer_step_backward(
    const Tensor& grad_update_in, const Tensor& grad_new_state_in, const Tensor& grad_in,
    const Tensor& state, const Tensor& w_ih1, const Tensor& w_hh1, const Tensor& b_ih1,
    const Tensor& b_hh1, const Tensor& w_ih2, const Tensor& w_hh2, const Tensor& b_ih2,
    const Tensor& b_hh2, const Tensor& w_out, const Tensor& b_out,
    c10::string_view preprocessing, double p, double out_scale) {
  const char* op = "pymeta.lstm_optimizer_step_backward";
  const std::vector<Tensor> w_in{w_ih1, w_hh1, b_ih1, b_hh1, w_ih2, w_hh2, b_ih2, b_hh2, w_out, b_out};
  const Dims d = check_args(op, grad_in, state, w_in, std::string(preprocessing), p, out_scale);
  auto same = [&](const Tensor& t, const char* name, const Tensor& like, const char* like_name,
                  at::IntArrayRef shape) {
    TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ",
                     t.scalar_type(), " but ", like_name, " has ", like.scalar_type(),
                     "; the gradient of an output has that output's dtype");
    TORCH_CHECK_VALUE(t.device() == grad_in.device(), op, ": ", name, " is on ", t.device(),
                      " but grad is on ", grad_in.device(),
                      "; all tensors of one call share a device");
    TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " has shape ", shape_str(t.sizes()),
                      "; expected ", shape_str(shape));
  };
  same(grad_update_in, "grad_update", grad_in, "grad", {d.N});
  same(grad_new_state_in, "grad_new_state", state, "state", state.sizes());
  PYMETA_DEVICE_GUARD(grad_in);
  const Tensor grad = grad_in.contiguous();
  const Tensor grad_update = grad_update_in.contiguous();
  const Tensor grad_new_state = grad_new_state_in.contiguous();
  const auto w = contiguous_weights(w_in);
  if (d.blocked) {  // through the feature-major backward (see to_feature_major)
    auto r = lstm_optimizer_step_backward(
        pad_to_blocks(grad_update), to_feature_major(grad_new_state), pad_to_blocks(grad),
        to_feature_major(state), w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9],
        preprocessing, p, out_scale);
    std::get<0>(r) = first_n(std::get<0>(r), d.N);
    std::get<1>(r) = to_blocked(std::get<1>(r));
    return r;
  }

  Tensor d_grad = at::empty({d.N}, grad.options());
  Tensor d_state = at::empty({4, d.H, d.N}, state.options());
  std::vector<Tensor> dw(10);
  for (int i = 0; i < 10; ++i) dw[i] = at::empty(w[i].sizes(), grad.options());
  if (!((state.scalar_type() == grad.scalar_type() || d.N == 0 || bf16_direct()) &&
        run_backward(d, grad, state, w, p, out_scale, grad_update, grad_new_state, d_grad,
                     d_state, dw))) {
    // bfloat16 state where no kernel reads it (or PYMETA_LSTM_BF16_NATIVE=0): float32 chunks
    // (see bf16_chunk); the weight gradients of the chunks are added in chunk order, so the
    // result does not depend on threads or timing.
    const int64_t C = std::min(bf16_chunk(grad), d.N);
    const Tensor s_buf = at::empty({4 * d.H * C}, grad.options());
    const Tensor g_buf = at::empty({4 * d.H * C}, grad.options());
    const Tensor o_buf = at::empty({4 * d.H * C}, grad.options());
    std::vector<Tensor> dw_chunk(10);
    for (int i = 0; i < 10; ++i) dw_chunk[i] = at::empty(w[i].sizes(), grad.options());
    for (int64_t c0 = 0; c0 < d.N; c0 += C) {
      Dims dc = d;
      dc.N = std::min(C, d.N - c0);
      const Tensor s = scratch_view(s_buf, d.H, dc.N), gns = scratch_view(g_buf, d.H, dc.N),
                   ds = scratch_view(o_buf, d.H, dc.N);
      s.copy_(state.narrow(2, c0, dc.N));
      gns.copy_(grad_new_state.narrow(2, c0, dc.N));
      run_backward(dc, grad.narrow(0, c0, dc.N), s, w, p, out_scale,
                   grad_update.narrow(0, c0, dc.N), gns, d_grad.narrow(0, c0, dc.N), ds,
                   c0 == 0 ? dw : dw_chunk);
      d_state.narrow(2, c0, dc.N).copy_(ds);
      if (c0 > 0)
        for (int i = 0; i < 10; ++i) dw[i].add_(dw_chunk[i]);
    }
  }
  return {d_grad, d_state, dw[0], dw[1], dw[2], dw[3], dw[4], dw[5], dw[6], dw[7], dw[8], dw[9]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pymeta, CPU, m) {
  m.impl("lstm_optimizer_step", &lstm_optimizer_step);
  m.impl("lstm_optimizer_step_backward", &lstm_optimizer_step_backward);
}

#ifdef PYMETA_WITH_CUDA
TORCH_LIBRARY_IMPL(pymeta, CUDA, m) {
  m.impl("lstm_optimizer_step", &lstm_optimizer_step);
  m.impl("lstm_optimizer_step_backward", &lstm_optimizer_step_backward);
}
#endif

}  // namespace pymeta
