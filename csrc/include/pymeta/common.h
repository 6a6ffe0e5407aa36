// Shared by the CPU (g++) and CUDA (nvcc) kernels. Nothing from torch: the kernels see
// plain pointers and sizes, so that the .cu files compile quickly.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PYMETA_HD __host__ __device__ __forceinline__
#else
#define PYMETA_HD inline
#endif

namespace pymeta {

// Storage dtype of a launch. Math runs in float for the 16-bit types and for float,
// in double for double.
enum class DType : int32_t { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// One aligned vector of N scalars: a single 16-byte load or store on the GPU.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// A multi-tensor launch views tensor i as a [rows, n_i] matrix (rows = tasks, n_i = the
// elements of one task's copy) and cuts it into tiles of rows_per_tile x cols_per_tile.
// Tensor i owns the tiles [tile_start[i], tile_start[i + 1]); inside a tensor, tiles go
// column block first. A tensor with rows == 0 still gets one (empty) row block, so that
// reductions over rows write their zeros. One tile is one CUDA block, or one unit of at::parallel_for.
template <int MaxTensors>
struct TileMap {
  int64_t tile_start[MaxTensors + 1];
  int64_t n[MaxTensors];  // columns of tensor i
  int64_t rows;
  int64_t rows_per_tile;
  int64_t cols_per_tile;
  int32_t num_tensors;
};

struct Tile {
  int32_t tensor;     // index into the launch's tensor table
  int64_t col_block;  // which block of cols_per_tile columns
  int64_t row0, row1; // rows [row0, row1)
  int64_t col0;       // first column (the tile's columns are [col0, min(col0 + cols_per_tile, n)))
};

// Which tensor and which rows and columns tile b covers. A binary search over a few dozen
// tile_start entries: cheap next to the tile's work.
template <int MaxTensors>
PYMETA_HD Tile locate_tile(const TileMap<MaxTensors>& map, int64_t b) {
  int32_t lo = 0, hi = map.num_tensors - 1;
  while (lo < hi) {
    int32_t mid = (lo + hi + 1) / 2;
    if (map.tile_start[mid] <= b) lo = mid; else hi = mid - 1;
  }
  Tile t;
  t.tensor = lo;
  const int64_t local = b - map.tile_start[lo];
  const int64_t col_blocks = (map.n[lo] + map.cols_per_tile - 1) / map.cols_per_tile;
  t.col_block = local % col_blocks;
  const int64_t row_block = local / col_blocks;
  t.col0 = t.col_block * map.cols_per_tile;
  t.row0 = row_block * map.rows_per_tile;
  t.row1 = t.row0 + map.rows_per_tile < map.rows ? t.row0 + map.rows_per_tile : map.rows;
  return t;
}

}  // namespace pymeta
