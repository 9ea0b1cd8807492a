// Tile binning: the list of Gaussians of every 16x16 tile, front to back.
//
// Two stable radix sorts instead of one sort of 64-bit (tile | depth) keys: first the N Gaussians
// by view depth (32-bit keys; the reference breaks depth ties by Gaussian index, and so does a
// stable sort of the index sequence), then the M tile entries, written in that depth order, by
// tile index alone (only the bits the tile count needs, usually 10-12). The M-sized sort is the
// expensive one, and it shrinks from 64 to ~11 key bits and from 8-byte to 4-byte keys.
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/cub.cuh>

#include "rasterizer.h"

namespace dgr {
namespace {

constexpr int THREADS = 256;

__global__ void gather_counts_kernel(int n, const int32_t* __restrict__ order,
                                     const int32_t* __restrict__ tiles_touched, int64_t* __restrict__ out) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j < n) out[j] = tiles_touched[order[j]];
}

// One entry (tile key, Gaussian) per tile that the Gaussian can blend in (tile_hit, within the
// rectangle of its radius), Gaussians in depth order.
__global__ void duplicate_kernel(int n, Camera cam, const int32_t* __restrict__ order,
                                 const int64_t* __restrict__ offsets, const float2* __restrict__ xy,
                                 const float4* __restrict__ conic_opacity, const int32_t* __restrict__ radii,
                                 uint32_t* __restrict__ tile_keys, int32_t* __restrict__ ids) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const int g = order[j];
  const int r = radii[g];
  if (r <= 0) return;
  int x0, y0, x1, y1;
  const float2 p = xy[g];
  tile_rect(p.x, p.y, static_cast<float>(r), cam.grid_x, cam.grid_y, x0, y0, x1, y1);
  const Footprint f = make_footprint(p, conic_opacity[g], x0, y0, x1, y1);
  int k = j == 0 ? 0 : static_cast<int>(offsets[j - 1]);
  const int end = static_cast<int>(offsets[j]);
  for (int ty = f.y0; ty < f.y1; ++ty)
    for (int tx = f.x0; tx < f.x1; ++tx)
      if (k < end && tile_hit(f, tx, ty, cam.width, cam.height)) {
        tile_keys[k] = static_cast<uint32_t>(ty * cam.grid_x + tx);
        ids[k++] = g;
      }
  // the projection counted with the same arithmetic, so k == end; were it ever short, the rest
  // gets a key past the last tile, which sorts last and belongs to no tile's range
  for (; k < end; ++k) {
    tile_keys[k] = static_cast<uint32_t>(cam.grid_x * cam.grid_y);
    ids[k] = g;
  }
}

// Each tile's [start, end) in the sorted keys by binary search: one thread per tile, no zeroing
// pass, and keys past the last tile (see duplicate_kernel) fall in no range.
__device__ __forceinline__ int lower_bound(const uint32_t* keys, int m, uint32_t value) {
  int lo = 0, hi = m;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (keys[mid] < value) lo = mid + 1; else hi = mid;
  }
  return lo;
}

__global__ void ranges_kernel(int m, int num_tiles, const uint32_t* __restrict__ keys, int2* __restrict__ ranges) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < num_tiles) ranges[t] = make_int2(lower_bound(keys, m, t), lower_bound(keys, m, t + 1));
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

template <typename T>
T* as(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

}  // namespace

void bin_gaussians(int n, const Camera& cam, const at::Tensor& xy, const at::Tensor& conic_opacity,
                   const at::Tensor& radii, at::Tensor work, at::Tensor& point_ids, at::Tensor& ranges) {
  const int num_tiles = cam.grid_x * cam.grid_y;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto i32 = radii.options();
  ranges = at::empty({num_tiles, 2}, i32);
  int m = 0;
  at::Tensor keys, ids;  // entries: tile key and Gaussian, with the other halves of the sort's double buffers
  if (n > 0) {
    const int blocks = (n + THREADS - 1) / THREADS;
    // 1. Gaussians by depth (stable: equal depths keep index order); double buffers: no copy in temp
    int32_t* rows = as<int32_t>(work);  // [5, n]: tiles_touched, depth keys, order, two spare rows
    cub::DoubleBuffer<uint32_t> dkeys(reinterpret_cast<uint32_t*>(rows + n), reinterpret_cast<uint32_t*>(rows + 3 * n));
    cub::DoubleBuffer<int32_t> dorder(rows + 2 * n, rows + 4 * n);
    size_t sort_bytes = 0, scan_bytes = 0;
    cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, dkeys, dorder, n, 0, 32, stream);
    cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, (int64_t*)nullptr, (int64_t*)nullptr, n, stream);
    at::Tensor temp = workspace(std::max(sort_bytes, scan_bytes), radii);
    cub::DeviceRadixSort::SortPairs(temp.data_ptr(), sort_bytes, dkeys, dorder, n, 0, 32, stream);
    const int32_t* by_depth = dorder.Current();

    // 2. where each Gaussian's entries end: inclusive sum of tile counts in depth order (64-bit, so
    // that an overflowing total is caught rather than wrapped)
    at::Tensor offsets = at::empty({n}, i32.dtype(at::kLong));
    gather_counts_kernel<<<blocks, THREADS, 0, stream>>>(n, by_depth, rows, as<int64_t>(offsets));
    check_launch("gather_counts");
    cub::DeviceScan::InclusiveSum(temp.data_ptr(), scan_bytes, as<int64_t>(offsets), as<int64_t>(offsets), n, stream);
    int64_t total = 0;  // the one host synchronisation of a render
    C10_CUDA_CHECK(cudaMemcpyAsync(&total, as<int64_t>(offsets) + n - 1, sizeof(total), cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    TORCH_CHECK(total < (int64_t(1) << 31), "rasterizer: ", total,
                " (tile, Gaussian) pairs, more than 2^31; render fewer or smaller Gaussians");
    m = static_cast<int>(total);

    // 3. the entries, Gaussians in depth order
    keys = at::empty({2, m}, i32);
    ids = at::empty({m}, i32);
    if (m > 0) {
      duplicate_kernel<<<blocks, THREADS, 0, stream>>>(
          n, cam, by_depth, as<int64_t>(offsets), as<float2>(xy), as<float4>(conic_opacity), as<int32_t>(radii),
          as<uint32_t>(keys), as<int32_t>(ids));
      check_launch("duplicate");
    }
  }
  work.reset();  // done with: free it before the entries' sort buffers peak

  // 4. a stable sort of the entries by tile, on the bits the tile index needs
  point_ids = at::empty({m}, i32);
  const uint32_t* sorted_keys = nullptr;
  if (m > 0) {
    int bits = 1;
    while ((1 << bits) <= num_tiles) ++bits;  // room for the key num_tiles too
    cub::DoubleBuffer<uint32_t> tkeys(as<uint32_t>(keys), as<uint32_t>(keys) + m);
    cub::DoubleBuffer<int32_t> tids(as<int32_t>(ids), as<int32_t>(point_ids));
    size_t bytes = 0;
    cub::DeviceRadixSort::SortPairs(nullptr, bytes, tkeys, tids, m, 0, bits, stream);
    at::Tensor temp = workspace(bytes, radii);
    cub::DeviceRadixSort::SortPairs(temp.data_ptr(), bytes, tkeys, tids, m, 0, bits, stream);
    if (tids.Current() == as<int32_t>(ids)) point_ids = ids;  // the sort ended in the other buffer
    sorted_keys = tkeys.Current();
  }

  // 5. each tile's [start, end)
  ranges_kernel<<<(num_tiles + THREADS - 1) / THREADS, THREADS, 0, stream>>>(m, num_tiles, sorted_keys,
                                                                           as<int2>(ranges));
  check_launch("ranges");
}

}  // namespace dgr
