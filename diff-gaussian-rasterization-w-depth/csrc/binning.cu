// Tile binning: the list of Gaussians of every 16x16 tile, front to back.
//
// Two stable radix sorts instead of one sort of 64-bit (tile | depth) keys: first the N Gaussians
// by view depth (32-bit keys; the reference breaks depth ties by Gaussian index, and so does a
// stable sort of the index sequence), then the M tile entries, written in that depth order, by
// tile index alone (16-bit keys whenever the image has fewer than 65,535 tiles, on only the bits
// the tile count needs, usually 10-12). The M-sized sort is the expensive one, and it shrinks from
// 64 to ~11 key bits and from 8-byte to 2-byte keys.
//
// The number of entries M must reach the host to size the entry buffers. The projection adds it
// up as it counts each Gaussian's tiles; its copy to the host is queued right after the
// projection, and the host queues the depth sort and the scan before it waits for the copy, so
// the GPU has work while the host reads M and queues the rest.
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/cub.cuh>
#include <thrust/iterator/permutation_iterator.h>

#include "rasterizer.h"

namespace dgr {
namespace {

constexpr int THREADS = 256;

// One entry (tile key, Gaussian) per tile that the Gaussian can blend in (tile_hit, within the
// rectangle of its radius), Gaussians in depth order; offsets: inclusive sum of the tile counts.
template <typename Key>
__global__ void duplicate_kernel(int n, Camera cam, const int32_t* __restrict__ order,
                                 const int32_t* __restrict__ offsets, const float2* __restrict__ xy,
                                 const float4* __restrict__ conic_opacity, const int32_t* __restrict__ radii,
                                 Key* __restrict__ tile_keys, int32_t* __restrict__ ids) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const int g = order[j];
  const int r = radii[g];
  if (r <= 0) return;
  int x0, y0, x1, y1;
  const float2 p = xy[g];
  tile_rect(p.x, p.y, static_cast<float>(r), cam.grid_x, cam.grid_y, x0, y0, x1, y1);
  const Footprint f = make_footprint(p, conic_opacity[g], x0, y0, x1, y1);
  int k = j == 0 ? 0 : offsets[j - 1];
  const int end = offsets[j];
  for (int ty = f.y0; ty < f.y1; ++ty)
    for (int tx = f.x0; tx < f.x1; ++tx)
      if (k < end && tile_hit(f, tx, ty, cam.width, cam.height)) {
        tile_keys[k] = static_cast<Key>(ty * cam.grid_x + tx);
        ids[k++] = g;
      }
  // the projection counted with the same arithmetic, so k == end; were it ever short, the rest
  // gets a key past the last tile, which sorts last and belongs to no tile's range
  for (; k < end; ++k) {
    tile_keys[k] = static_cast<Key>(cam.grid_x * cam.grid_y);
    ids[k] = g;
  }
}

// Each tile's [start, end) in the sorted keys by binary search: one thread per tile, no zeroing
// pass, and keys past the last tile (see duplicate_kernel) fall in no range.
template <typename Key>
__device__ __forceinline__ int lower_bound(const Key* keys, int m, int value) {
  int lo = 0, hi = m;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (static_cast<int>(keys[mid]) < value) lo = mid + 1; else hi = mid;
  }
  return lo;
}

template <typename Key>
__global__ void ranges_kernel(int m, int num_tiles, const Key* __restrict__ keys, int2* __restrict__ ranges) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < num_tiles) ranges[t] = make_int2(lower_bound(keys, m, t), lower_bound(keys, m, t + 1));
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

template <typename T>
T* as(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

struct Event {  // a CUDA event that is destroyed on every way out
  cudaEvent_t event;
  Event() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming)); }
  ~Event() { cudaEventDestroy(event); }
};

// Steps 3 to 5 of bin_gaussians for tile keys of type Key (uint16_t or uint32_t).
template <typename Key>
void list_and_sort(int n, int m, const Camera& cam, const int32_t* by_depth, const int32_t* offsets,
                   const at::Tensor& xy, const at::Tensor& conic_opacity, const at::Tensor& radii,
                   at::Tensor& work, at::Tensor& point_ids, at::Tensor& ranges, cudaStream_t stream) {
  const int num_tiles = cam.grid_x * cam.grid_y;
  // 3. the entries, Gaussians in depth order; keys [2, m] (the second half is the sort's other buffer)
  at::Tensor keys = workspace(2 * sizeof(Key) * static_cast<size_t>(m), radii);
  at::Tensor ids = at::empty({m}, radii.options());
  if (m > 0) {
    duplicate_kernel<Key><<<(n + THREADS - 1) / THREADS, THREADS, 0, stream>>>(
        n, cam, by_depth, offsets, as<float2>(xy), as<float4>(conic_opacity), as<int32_t>(radii), as<Key>(keys),
        as<int32_t>(ids));
    check_launch("duplicate");
  }
  work.reset();  // done with: free it before the entries' sort buffers peak

  // 4. a stable sort of the entries by tile, on the bits the tile index needs
  point_ids = at::empty({m}, radii.options());
  const Key* sorted_keys = as<Key>(keys);
  if (m > 0) {
    int bits = 1;
    while ((1 << bits) <= num_tiles) ++bits;  // room for the key num_tiles too
    cub::DoubleBuffer<Key> tkeys(as<Key>(keys), as<Key>(keys) + m);
    cub::DoubleBuffer<int32_t> tids(as<int32_t>(ids), as<int32_t>(point_ids));
    size_t bytes = 0;
    cub::DeviceRadixSort::SortPairs(nullptr, bytes, tkeys, tids, m, 0, bits, stream);
    at::Tensor temp = workspace(bytes, radii);
    cub::DeviceRadixSort::SortPairs(temp.data_ptr(), bytes, tkeys, tids, m, 0, bits, stream);
    if (tids.Current() == as<int32_t>(ids)) point_ids = ids;  // the sort ended in the other buffer
    sorted_keys = tkeys.Current();
  }

  // 5. each tile's [start, end)
  ranges_kernel<Key><<<(num_tiles + THREADS - 1) / THREADS, THREADS, 0, stream>>>(m, num_tiles, sorted_keys,
                                                                                as<int2>(ranges));
  check_launch("ranges");
}

}  // namespace

void bin_gaussians(int n, const Camera& cam, const at::Tensor& xy, const at::Tensor& conic_opacity,
                   const at::Tensor& radii, at::Tensor work, at::Tensor& point_ids, at::Tensor& ranges) {
  const int num_tiles = cam.grid_x * cam.grid_y;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ranges = at::empty({num_tiles, 2}, radii.options());
  int32_t* rows = as<int32_t>(work);  // see work_layout in rasterizer.h

  // the entry count, on its way to the host while the GPU sorts by depth
  const at::Tensor count_host = at::empty({1}, radii.options().dtype(at::kLong).device(at::kCPU).pinned_memory(true));
  C10_CUDA_CHECK(cudaMemcpyAsync(count_host.data_ptr(), rows + entry_count_offset(n), sizeof(int64_t),
                                 cudaMemcpyDeviceToHost, stream));
  const Event counted;
  C10_CUDA_CHECK(cudaEventRecord(counted.event, stream));

  const int32_t* by_depth = rows + 2 * n;
  const int32_t* offsets = nullptr;
  if (n > 0) {
    // 1. Gaussians by depth (stable: equal depths keep index order); double buffers: no copy in temp
    cub::DoubleBuffer<uint32_t> dkeys(reinterpret_cast<uint32_t*>(rows + n), reinterpret_cast<uint32_t*>(rows + 3 * n));
    cub::DoubleBuffer<int32_t> dorder(rows + 2 * n, rows + 4 * n);
    // 2. where each Gaussian's entries end: inclusive sum of its tile count in depth order, into the
    // depth keys' buffer, free after the sort (int32: M < 2^31 is checked before anything reads it)
    auto counts_by_depth = thrust::make_permutation_iterator(static_cast<const int32_t*>(rows),
                                                             static_cast<const int32_t*>(nullptr));
    size_t sort_bytes = 0, scan_bytes = 0;
    cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, dkeys, dorder, n, 0, 32, stream);
    cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, counts_by_depth, static_cast<int32_t*>(nullptr), n, stream);
    at::Tensor temp = workspace(std::max(sort_bytes, scan_bytes), radii);
    cub::DeviceRadixSort::SortPairs(temp.data_ptr(), sort_bytes, dkeys, dorder, n, 0, 32, stream);
    by_depth = dorder.Current();
    int32_t* ends = reinterpret_cast<int32_t*>(dkeys.Current());
    counts_by_depth = thrust::make_permutation_iterator(static_cast<const int32_t*>(rows), by_depth);
    cub::DeviceScan::InclusiveSum(temp.data_ptr(), scan_bytes, counts_by_depth, ends, n, stream);
    offsets = ends;
  }

  C10_CUDA_CHECK(cudaEventSynchronize(counted.event));  // the one host synchronisation of a render
  const int64_t total = *count_host.data_ptr<int64_t>();
  TORCH_CHECK(total < (int64_t(1) << 31), "rasterizer: ", total,
              " (tile, Gaussian) pairs, more than 2^31; render fewer or smaller Gaussians");
  const int m = static_cast<int>(total);
  if (num_tiles < 0xFFFF)
    list_and_sort<uint16_t>(n, m, cam, by_depth, offsets, xy, conic_opacity, radii, work, point_ids, ranges, stream);
  else
    list_and_sort<uint32_t>(n, m, cam, by_depth, offsets, xy, conic_opacity, radii, work, point_ids, ranges, stream);
}

}  // namespace dgr
