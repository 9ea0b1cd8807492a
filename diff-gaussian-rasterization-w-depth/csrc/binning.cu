// Tile binning: the list of Gaussians of every 16x16 tile, front to back.
//
// Two stable radix sorts instead of one sort of 64-bit (tile | depth) keys: first the N Gaussians
// by view depth (32-bit keys; the reference breaks depth ties by Gaussian index, and so does a
// stable sort of the index sequence), then the M tile entries, written in that depth order, by
// tile index alone (only the bits the tile count needs, usually 10-12). The M-sized sort is the
// expensive one, and it shrinks from 64 to ~11 key bits and from 8-byte to 4-byte keys.
#include <ATen/ATen.h>
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

// One entry (tile key, Gaussian) per tile of each Gaussian's rectangle, Gaussians in depth order.
__global__ void duplicate_kernel(int n, Camera cam, const int32_t* __restrict__ order,
                                 const int64_t* __restrict__ offsets, const float2* __restrict__ xy,
                                 const int32_t* __restrict__ radii, uint32_t* __restrict__ tile_keys,
                                 int32_t* __restrict__ ids) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const int g = order[j];
  const int r = radii[g];
  if (r <= 0) return;
  int x0, y0, x1, y1;
  const float2 p = xy[g];
  tile_rect(p.x, p.y, static_cast<float>(r), cam.grid_x, cam.grid_y, x0, y0, x1, y1);
  int k = j == 0 ? 0 : static_cast<int>(offsets[j - 1]);
  for (int ty = y0; ty < y1; ++ty)
    for (int tx = x0; tx < x1; ++tx, ++k) {
      tile_keys[k] = static_cast<uint32_t>(ty * cam.grid_x + tx);
      ids[k] = g;
    }
}

__global__ void ranges_kernel(int m, const uint32_t* __restrict__ keys, int2* __restrict__ ranges) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= m) return;
  const uint32_t tile = keys[k];
  if (k == 0 || keys[k - 1] != tile) ranges[tile].x = k;
  if (k == m - 1 || keys[k + 1] != tile) ranges[tile].y = k + 1;
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

}  // namespace

void bin_gaussians(int n, const Camera& cam, const at::Tensor& xy, const at::Tensor& radii,
                   const at::Tensor& tiles_touched, const at::Tensor& depth_keys,
                   const at::Tensor& order, at::Tensor& point_ids, at::Tensor& ranges) {
  const int num_tiles = cam.grid_x * cam.grid_y;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ranges = at::zeros({num_tiles, 2}, radii.options());
  point_ids = at::empty({0}, radii.options());
  if (n == 0) return;
  const int blocks = (n + THREADS - 1) / THREADS;

  // 1. Gaussians by depth (stable: equal depths keep index order)
  at::Tensor keys_sorted = at::empty_like(depth_keys), order_sorted = at::empty_like(order);
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, (const uint32_t*)nullptr, (uint32_t*)nullptr,
                                  (const int32_t*)nullptr, (int32_t*)nullptr, n, 0, 32, stream);
  at::Tensor temp = workspace(bytes, radii);
  cub::DeviceRadixSort::SortPairs(temp.data_ptr(), bytes,
                                  reinterpret_cast<const uint32_t*>(depth_keys.data_ptr<int32_t>()),
                                  reinterpret_cast<uint32_t*>(keys_sorted.data_ptr<int32_t>()),
                                  order.data_ptr<int32_t>(), order_sorted.data_ptr<int32_t>(), n, 0, 32, stream);

  // 2. where each Gaussian's entries start: inclusive sum of tile counts in depth order (64-bit,
  // so that an overflowing total is caught rather than wrapped)
  at::Tensor counts = at::empty({n}, radii.options().dtype(at::kLong)), offsets = at::empty_like(counts);
  gather_counts_kernel<<<blocks, THREADS, 0, stream>>>(n, order_sorted.data_ptr<int32_t>(),
                                                      tiles_touched.data_ptr<int32_t>(), counts.data_ptr<int64_t>());
  check_launch("gather_counts");
  bytes = 0;
  cub::DeviceScan::InclusiveSum(nullptr, bytes, (const int64_t*)nullptr, (int64_t*)nullptr, n, stream);
  temp = workspace(bytes, radii);
  cub::DeviceScan::InclusiveSum(temp.data_ptr(), bytes, counts.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), n, stream);
  const int64_t total = offsets[n - 1].item<int64_t>();  // the one host synchronisation of a render
  TORCH_CHECK(total < (int64_t(1) << 31), "rasterizer: ", total,
              " (tile, Gaussian) pairs, more than 2^31; render fewer or smaller Gaussians");
  const int m = static_cast<int>(total);
  if (m == 0) return;

  // 3. the entries, then a stable sort by tile
  at::Tensor keys = at::empty({m}, radii.options()), ids = at::empty({m}, radii.options());
  duplicate_kernel<<<blocks, THREADS, 0, stream>>>(
      n, cam, order_sorted.data_ptr<int32_t>(), offsets.data_ptr<int64_t>(),
      reinterpret_cast<const float2*>(xy.data_ptr<float>()), radii.data_ptr<int32_t>(),
      reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>()), ids.data_ptr<int32_t>());
  check_launch("duplicate");
  int bits = 1;
  while ((1 << bits) < num_tiles) ++bits;
  at::Tensor keys_out = at::empty_like(keys);
  point_ids = at::empty_like(ids);
  bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, (const uint32_t*)nullptr, (uint32_t*)nullptr,
                                  (const int32_t*)nullptr, (int32_t*)nullptr, m, 0, bits, stream);
  temp = workspace(bytes, radii);
  cub::DeviceRadixSort::SortPairs(temp.data_ptr(), bytes, reinterpret_cast<const uint32_t*>(keys.data_ptr<int32_t>()),
                                  reinterpret_cast<uint32_t*>(keys_out.data_ptr<int32_t>()),
                                  ids.data_ptr<int32_t>(), point_ids.data_ptr<int32_t>(), m, 0, bits, stream);

  // 4. each tile's [start, end)
  ranges_kernel<<<(m + THREADS - 1) / THREADS, THREADS, 0, stream>>>(
      m, reinterpret_cast<const uint32_t*>(keys_out.data_ptr<int32_t>()),
      reinterpret_cast<int2*>(ranges.data_ptr<int32_t>()));
  check_launch("ranges");
}

}  // namespace dgr
