// The generic multi-tensor launcher: one CUDA block per tile of a TileMap (see
// pymeta/common.h), the launch table passed by value as a __grid_constant__ parameter
// (so indexing it at run time reads parameter memory, with no local copy). An op supplies
// the table type and a functor `f(table, tile)` that does one tile with the block's threads.
#pragma once
#include <cuda_runtime.h>

#include "pymeta/common.h"

namespace pymeta {

template <typename Launch, typename Functor>
__global__ void multi_tensor_kernel(const __grid_constant__ Launch launch, Functor f) {
  f(launch, locate_tile(launch.map, static_cast<int64_t>(blockIdx.x)));
}

template <typename Launch, typename Functor>
int launch_multi_tensor(const Launch& launch, int threads, cudaStream_t stream, Functor f) {
  if (launch.num_tiles == 0) return 0;
  multi_tensor_kernel<<<launch.num_tiles, threads, 0, stream>>>(launch, f);
  return static_cast<int>(cudaGetLastError());
}

// Sum of one value per thread over the block, in a fixed order (deterministic). All threads
// must call it; the result is valid in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[32];
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = (blockDim.x + 31) / 32;
    v = lane < nwarps ? warp_sums[lane] : acc_t(0);
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

}  // namespace pymeta
