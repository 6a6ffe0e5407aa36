// The torch-facing front of inner_update: argument checks (once, for every device),
// output allocation, the tile plan, and the per-device kernel registrations. The kernels
// themselves (csrc/cpu/inner_update_cpu.cpp, csrc/cuda/inner_update_cuda.cu) see only the
// plain launch table of pymeta/inner_update.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <sstream>
#include <vector>

#include "pymeta/inner_update.h"

#ifdef PYMETA_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace pymeta {
namespace {

using at::Tensor;
using at::TensorList;

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << s;
  return o.str();
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Tile geometry per device: the CUDA block size and the columns a thread owns set the
// columns of a tile; forward tiles take a few tasks each (more blocks to fill the GPU),
// backward tiles take every task (the sums over tasks stay in one thread, no atomics).
struct Geometry {
  int threads;
  int64_t cols_per_tile;
  int64_t rows_per_tile;  // 0: all rows
};

Geometry geometry(const Tensor& like, bool backward) {
  const int64_t vec = 16 / static_cast<int64_t>(like.element_size());
  if (like.is_cuda()) {
    const int threads = backward ? 128 : 256;
    return {threads, threads * vec, backward ? 0 : 4};
  }
  // CPU: long contiguous runs per row (hardware prefetchers stop at 4 KB pages, so short
  // row segments at large strides stream badly); backward keeps a row of sums per tile.
  return {0, backward ? 4096 : 16384, backward ? 0 : 1};
}

// The common checks. Returns T; fills `shared` and `lr_kinds`.
int64_t check_args(const char* op, TensorList params_or_douts, const char* pname, TensorList grads,
                   const std::optional<TensorList>& lr_tensors, bool params_may_be_shared,
                   std::vector<int32_t>* shared, std::vector<LrKind>* lr_kinds) {
  const int64_t count = static_cast<int64_t>(grads.size());
  TORCH_CHECK_VALUE(!params_or_douts.empty(), op, ": ", pname, " is an empty list");
  TORCH_CHECK_VALUE(static_cast<int64_t>(params_or_douts.size()) == count, op, ": ", pname, " has ",
              params_or_douts.size(), " tensors but grads has ", count);
  if (lr_tensors.has_value())
    TORCH_CHECK_VALUE(static_cast<int64_t>(lr_tensors->size()) == count, op, ": lr has ",
                      lr_tensors->size(), " tensors but ", pname, " has ", count);
  const Tensor& g0 = grads[0];
  TORCH_CHECK_VALUE(g0.defined() && g0.dim() >= 1, op,
                    ": grads[0] must have a leading task dimension [T, ...]");
  const int64_t T = g0.size(0);
  const auto dtype = params_or_douts[0].scalar_type();
  const auto device = g0.device();
  TORCH_CHECK_TYPE(supported_dtype(dtype), op, ": ", pname, "[0] has dtype ", dtype,
                   "; supported are float32, float64, float16 and bfloat16");
  auto check_tensor = [&](const Tensor& t, const char* name, int64_t i) {
    TORCH_CHECK_VALUE(t.defined(), op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, "[", i, "] has dtype ",
                     t.scalar_type(), " but ", pname, "[0] has ", dtype, "; all tensors of one call share a dtype");
    TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(),
                      " but grads[0] is on ", device, "; all tensors of one call share a device");
  };
  shared->assign(count, 0);
  lr_kinds->assign(count, LrKind::Scalar);
  for (int64_t i = 0; i < count; ++i) {
    const Tensor& p = params_or_douts[i];
    const Tensor& g = grads[i];
    check_tensor(p, pname, i);
    check_tensor(g, "grads", i);
    TORCH_CHECK_VALUE(g.dim() >= 1 && g.size(0) == T, op, ": grads[", i, "] has shape ",
                      shape_str(g.sizes()), " but grads[0] has T = ", T,
                      " tasks; every grads[i] is [T, ...] with the same T");
    const auto task_shape = g.sizes().slice(1);
    if (p.sizes() == g.sizes()) {
      (*shared)[i] = 0;
    } else if (params_may_be_shared && p.sizes() == task_shape) {
      (*shared)[i] = 1;
    } else {
      TORCH_CHECK_VALUE(false, op, ": ", pname, "[", i, "] has shape ", shape_str(p.sizes()),
                        " but grads[", i, "] has shape ", shape_str(g.sizes()), "; expected ",
                        params_may_be_shared ? shape_str(task_shape) + " (shared over tasks) or "
                                             : "",
                        shape_str(g.sizes()));
    }
    if (lr_tensors.has_value()) {
      const Tensor& lr = (*lr_tensors)[i];
      check_tensor(lr, "lr", i);
      if (lr.dim() == 0) {
        (*lr_kinds)[i] = LrKind::Tensor0d;
      } else if (lr.sizes() == task_shape) {
        (*lr_kinds)[i] = LrKind::Full;
      } else {
        TORCH_CHECK_VALUE(false, op, ": lr[", i, "] has shape ", shape_str(lr.sizes()),
                          "; expected [] (one rate for the tensor) or ", shape_str(task_shape),
                          " (one rate per element, the shape of params[", i, "])");
      }
    }
  }
  return T;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Fills tensor i's tiles into the launch, returning the next free tile index.
int64_t plan_tensor(InnerUpdateLaunch& L, int slot, int64_t n, int64_t T, const Geometry& geo,
                    int64_t tile) {
  const int64_t rpt = geo.rows_per_tile > 0 ? geo.rows_per_tile : std::max<int64_t>(T, 1);
  const int64_t col_blocks = (n + geo.cols_per_tile - 1) / geo.cols_per_tile;
  const int64_t row_blocks = T == 0 ? 1 : (T + rpt - 1) / rpt;
  L.map.n[slot] = n;
  L.map.tile_start[slot] = tile;
  return tile + col_blocks * row_blocks;
}

// Runs `run_launch(L)` for each group of at most kInnerUpdateMaxTensors tensors.
template <typename Fill, typename Run>
void for_each_group(int64_t count, int64_t T, const Geometry& geo, DType dtype, double lr_scalar,
                    Fill fill, Run run_launch) {
  for (int64_t g0 = 0; g0 < count; g0 += kInnerUpdateMaxTensors) {
    const int64_t g1 = std::min<int64_t>(count, g0 + kInnerUpdateMaxTensors);
    InnerUpdateLaunch L{};
    L.map.rows = T;
    L.map.rows_per_tile = geo.rows_per_tile > 0 ? geo.rows_per_tile : std::max<int64_t>(T, 1);
    L.map.cols_per_tile = geo.cols_per_tile;
    L.map.num_tensors = static_cast<int32_t>(g1 - g0);
    L.lr_scalar = lr_scalar;
    L.dtype = dtype;
    int64_t tile = 0;
    for (int64_t i = g0; i < g1; ++i) {
      const int slot = static_cast<int>(i - g0);
      tile = plan_tensor(L, slot, fill(L.t[slot], i), T, geo, tile);
    }
    L.map.tile_start[L.map.num_tensors] = tile;
    TORCH_CHECK(tile < (int64_t(1) << 31), "pymeta.inner_update: too many tiles for one launch");
    L.num_tiles = static_cast<int32_t>(tile);
    run_launch(L);
  }
}

void run_forward(const InnerUpdateLaunch& L, const Tensor& like, const Geometry& geo) {
  if (like.is_cpu()) {
    inner_update_forward_cpu(L);
    return;
  }
#ifdef PYMETA_WITH_CUDA
  C10_CUDA_CHECK(static_cast<cudaError_t>(inner_update_forward_cuda(
      L, geo.threads, c10::cuda::getCurrentCUDAStream(like.device().index()).stream())));
#endif
}

void run_backward(const InnerUpdateLaunch& L, const Tensor& like, const Geometry& geo) {
  if (like.is_cpu()) {
    inner_update_backward_cpu(L);
    return;
  }
#ifdef PYMETA_WITH_CUDA
  C10_CUDA_CHECK(static_cast<cudaError_t>(inner_update_backward_cuda(
      L, geo.threads, c10::cuda::getCurrentCUDAStream(like.device().index()).stream())));
#endif
}

void run_lr_finish(const LrFinishLaunch& F, const Tensor& like) {
  if (like.is_cpu()) {
    inner_update_lr_finish_cpu(F);
    return;
  }
#ifdef PYMETA_WITH_CUDA
  C10_CUDA_CHECK(static_cast<cudaError_t>(inner_update_lr_finish_cuda(
      F, c10::cuda::getCurrentCUDAStream(like.device().index()).stream())));
#endif
}

std::vector<Tensor> contiguous_all(TensorList ts) {
  std::vector<Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

#ifdef PYMETA_WITH_CUDA
#define PYMETA_DEVICE_GUARD(t) \
  std::optional<c10::cuda::CUDAGuard> guard_; \
  if ((t).is_cuda()) guard_.emplace((t).device())
#else
#define PYMETA_DEVICE_GUARD(t) (void)0
#endif

std::vector<Tensor> inner_update(TensorList params_in, TensorList grads_in,
                                 std::optional<TensorList> lr_in, double lr_scalar) {
  std::vector<int32_t> shared;
  std::vector<LrKind> kinds;
  const char* op = "pymeta.inner_update";
  const int64_t T = check_args(op, params_in, "params", grads_in, lr_in, true, &shared, &kinds);
  PYMETA_DEVICE_GUARD(grads_in[0]);
  const auto params = contiguous_all(params_in);
  const auto grads = contiguous_all(grads_in);
  const auto lrs = lr_in.has_value() ? contiguous_all(*lr_in) : std::vector<Tensor>{};
  const int64_t count = static_cast<int64_t>(grads.size());
  std::vector<Tensor> outs;
  outs.reserve(count);
  for (const auto& g : grads) outs.push_back(at::empty_like(g, at::MemoryFormat::Contiguous));

  const Tensor& like = grads[0];
  const Geometry geo = geometry(like, /*backward=*/false);
  const int64_t vec = 16 / static_cast<int64_t>(like.element_size());
  for_each_group(count, T, geo, to_dtype(like.scalar_type()), lr_scalar,
      [&](InnerUpdateTensor& e, int64_t i) {
        const int64_t n = c10::multiply_integers(grads[i].sizes().slice(1));
        e.in0 = params[i].data_ptr();
        e.grad = grads[i].data_ptr();
        e.lr = lrs.empty() ? nullptr : lrs[i].data_ptr();
        e.out = outs[i].data_ptr();
        e.dparam = nullptr;
        e.dlr = nullptr;
        e.shared = shared[i];
        e.lr_kind = static_cast<int32_t>(kinds[i]);
        e.vec_ok = n % vec == 0 && aligned16(e.in0) && aligned16(e.grad) && aligned16(e.out) &&
                   (kinds[i] != LrKind::Full || aligned16(e.lr));
        return n;
      },
      [&](const InnerUpdateLaunch& L) { run_forward(L, like, geo); });
  return outs;
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> inner_update_backward(
    TensorList douts_in, TensorList grads_in, std::optional<TensorList> lr_in, double lr_scalar,
    at::IntArrayRef shared_flags, bool need_dparams, bool need_dgrads, bool need_dlrs) {
  std::vector<int32_t> shared_unused;
  std::vector<LrKind> kinds;
  const char* op = "pymeta.inner_update_backward";
  const int64_t T =
      check_args(op, douts_in, "grad_outs", grads_in, lr_in, false, &shared_unused, &kinds);
  const int64_t count = static_cast<int64_t>(grads_in.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(shared_flags.size()) == count, op, ": shared has ",
                    shared_flags.size(), " entries but grads has ", count);
  PYMETA_DEVICE_GUARD(grads_in[0]);
  need_dlrs = need_dlrs && lr_in.has_value();
  const auto douts = contiguous_all(douts_in);
  const auto grads = contiguous_all(grads_in);
  const auto lrs = lr_in.has_value() ? contiguous_all(*lr_in) : std::vector<Tensor>{};

  const Tensor& like = grads[0];
  const Geometry geo = geometry(like, /*backward=*/true);
  const int64_t vec = 16 / static_cast<int64_t>(like.element_size());
  const auto acc_type = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  std::vector<Tensor> dparams, dgrads, dlrs, partials;
  std::vector<Tensor> dparam_of(count), dlr_of(count), partial_of(count);
  for (int64_t i = 0; i < count; ++i) {
    const auto task_shape = grads[i].sizes().slice(1);
    const int64_t n = c10::multiply_integers(task_shape);
    if (need_dgrads) dgrads.push_back(at::empty_like(grads[i], at::MemoryFormat::Contiguous));
    if (need_dparams && shared_flags[i]) {
      dparam_of[i] = at::empty(task_shape, grads[i].options());
      dparams.push_back(dparam_of[i]);
    }
    if (need_dlrs) {
      dlr_of[i] = at::empty(lrs[i].sizes(), lrs[i].options());
      dlrs.push_back(dlr_of[i]);
      if (kinds[i] == LrKind::Tensor0d) {
        // Every column block writes its partial; an empty tensor has none and sums to 0.
        const int64_t col_blocks = (n + geo.cols_per_tile - 1) / geo.cols_per_tile;
        const auto opts = grads[i].options().dtype(acc_type);
        partial_of[i] = col_blocks > 0 ? at::empty({col_blocks}, opts) : at::zeros({1}, opts);
      }
    }
  }
  int64_t dg_index = 0;
  for_each_group(count, T, geo, to_dtype(like.scalar_type()), lr_scalar,
      [&](InnerUpdateTensor& e, int64_t i) {
        const int64_t n = c10::multiply_integers(grads[i].sizes().slice(1));
        e.in0 = douts[i].data_ptr();
        e.grad = grads[i].data_ptr();
        e.lr = lrs.empty() ? nullptr : lrs[i].data_ptr();
        e.out = need_dgrads ? dgrads[dg_index++].data_ptr() : nullptr;
        e.dparam = dparam_of[i].defined() ? dparam_of[i].data_ptr() : nullptr;
        e.dlr = !need_dlrs ? nullptr
              : kinds[i] == LrKind::Tensor0d ? partial_of[i].data_ptr() : dlr_of[i].data_ptr();
        e.shared = static_cast<int32_t>(shared_flags[i] != 0);
        e.lr_kind = static_cast<int32_t>(kinds[i]);
        e.vec_ok = n % vec == 0 && aligned16(e.in0) && aligned16(e.grad) &&
                   (!e.out || aligned16(e.out)) && (!e.dparam || aligned16(e.dparam)) &&
                   (kinds[i] != LrKind::Full || (aligned16(e.lr) && (!e.dlr || aligned16(e.dlr))));
        return n;
      },
      [&](const InnerUpdateLaunch& L) { run_backward(L, like, geo); });

  if (need_dlrs) {  // fold the per-column-block partial sums of the [] rates
    LrFinishLaunch F{};
    F.dtype = to_dtype(like.scalar_type());
    auto flush = [&] {
      run_lr_finish(F, like);
      F.num = 0;
    };
    for (int64_t i = 0; i < count; ++i) {
      if (kinds[i] != LrKind::Tensor0d) continue;
      F.partials[F.num] = partial_of[i].data_ptr();
      F.dlr[F.num] = dlr_of[i].data_ptr();
      F.count[F.num] = partial_of[i].numel();
      if (++F.num == kLrFinishMax) flush();
    }
    if (F.num > 0) flush();
  }
  return {dparams, dgrads, dlrs};
}

}  // namespace

TORCH_LIBRARY_IMPL(pymeta, CPU, m) {
  m.impl("inner_update", &inner_update);
  m.impl("inner_update_backward", &inner_update_backward);
}

#ifdef PYMETA_WITH_CUDA
TORCH_LIBRARY_IMPL(pymeta, CUDA, m) {
  m.impl("inner_update", &inner_update);
  m.impl("inner_update_backward", &inner_update_backward);
}
#endif

}  // namespace pymeta
