// Tile binning: the list of Gaussians of every 16x16 tile, front to back.
//
// Two stable radix sorts instead of one sort of 64-bit (tile | depth) keys: first the N Gaussians
// by view depth (32-bit keys; the reference breaks depth ties by Gaussian index, and so does a
// stable sort of the index sequence), then the M tile entries, listed in that depth order, by tile
// index alone (16-bit keys whenever the image has fewer than 65,535 tiles, on only the bits the
// tile count needs). The M-sized sort is the expensive one, and it shrinks from 64 to ~11 key bits
// and from 8-byte to 2-byte keys.
//
// A render is short enough that launching kernels costs the host about as much as running them
// costs the GPU, so binning launches few: each sort is one kernel per 8-bit digit (single-pass
// "onesweep" passes: every block ranks its keys, learns the counts of the blocks before it by
// decoupled look-back, and scatters), the digit histograms they need are counted by the kernels
// that write the keys (the projection, the listing), and the prefix sum that places each
// Gaussian's entries is fused into the listing kernel. The depth sort's and the listing's state is
// zeroed with the entry counter in one memset before the projection, the tile sort's in one memset
// before the listing. The number of entries M must reach the host to size the entry buffers: the
// projection adds it up, its copy is queued right after the projection, and the host queues the
// depth sort before it waits.
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_scan.cuh>

#include "rasterizer.h"

namespace dgr {
namespace {

constexpr int THREADS = 256;
constexpr unsigned FULL = 0xFFFFFFFFu;

// ---- decoupled look-back: a running sum across the blocks of one kernel in a single pass.
// A status word holds a flag (2 bits) and a count (30 bits): zero = not yet published, AGGREGATE =
// the block's own count, INCLUSIVE = the count of it and every block before it.
constexpr uint32_t AGGREGATE = 1u << 30, INCLUSIVE = 2u << 30, COUNT_MASK = AGGREGATE - 1;

// The sum of the counts of blocks 0..tile-1, from their statuses at status[b * stride]; publishes
// this block's own count first and its inclusive sum after. Blocks take their tile numbers in the
// order they start (see take_ticket), so every block waited for has started and will publish.
__device__ uint32_t look_back(uint32_t* status, int stride, int tile, uint32_t count) {
  volatile uint32_t* s = status;
  if (tile == 0) {
    s[0] = INCLUSIVE | count;
    return 0;
  }
  s[static_cast<int64_t>(tile) * stride] = AGGREGATE | count;
  uint32_t prefix = 0;
  for (int b = tile - 1; b >= 0;) {
    const uint32_t v = s[static_cast<int64_t>(b) * stride];
    if (v == 0) continue;  // published soon: the block has started
    prefix += v & COUNT_MASK;
    if (v & INCLUSIVE) break;
    --b;
  }
  s[static_cast<int64_t>(tile) * stride] = INCLUSIVE | (prefix + count);
  return prefix;
}

// The block's tile number, in the order blocks start (not blockIdx, which may run out of order).
__device__ __forceinline__ int take_ticket(uint32_t* ticket) {
  __shared__ int s_ticket;
  if (threadIdx.x == 0) s_ticket = static_cast<int>(atomicAdd(ticket, 1u));
  __syncthreads();
  return s_ticket;
}

// ---- stable LSD radix sort of (key, int32 value) pairs, 8 bits per pass (RADIX digits)
constexpr int WARPS = THREADS / 32;
// keys per thread in a pass: a block's fixed costs (look-back, scans, barriers) outweigh the loss
// of parallelism of fewer blocks. Measured on the H100 (docs/performance.md) at 300k Gaussians:
// depth sort 0.052 -> 0.047 ms (4 -> 16 keys per thread), tile sort of 1.6M entries 0.058 ->
// 0.055 ms (8 -> 16); at 1M Gaussians 0.108 -> 0.080 and 0.108 -> 0.101 ms.
constexpr int SORT_ITEMS = 16;
constexpr int SORT_TILE = THREADS * SORT_ITEMS;

int sort_passes(int bits) { return (bits + 7) / 8; }
int sort_tiles(int count) { return (count + SORT_TILE - 1) / SORT_TILE; }

// State of one sort, uint32 words, zero before it starts: per pass the digit histogram [RADIX]
// (added up by the kernel that writes the keys), a ticket, the look-back statuses [tiles][RADIX].
struct SortState {
  uint32_t* histogram;  // [passes][RADIX]
  uint32_t* tickets;    // [passes]
  uint32_t* statuses;   // [passes][tiles][RADIX]
};

int64_t sort_state_words(int count, int bits) {
  const int64_t passes = sort_passes(bits);
  return passes * RADIX + passes + passes * sort_tiles(count) * static_cast<int64_t>(RADIX);
}

SortState sort_state(uint32_t* words, int bits) {
  const int passes = sort_passes(bits);
  return {words, words + passes * RADIX, words + passes * RADIX + passes};
}

// One pass: keys_in/values_in -> keys_out/values_out, stably by the digit at bit `shift`. A block
// takes SORT_TILE consecutive keys, each warp a consecutive run of 32 * SORT_ITEMS of them, so that
// ranking in warp order, then item order, then lane order keeps the input order. The block puts its
// keys in digit order in shared memory, then writes each digit's run to its place in the output,
// consecutive threads to consecutive places.
template <typename Key>
__global__ void __launch_bounds__(THREADS)
sort_pass_kernel(int count, int shift, const Key* __restrict__ keys_in, const int32_t* __restrict__ values_in,
                 Key* __restrict__ keys_out, int32_t* __restrict__ values_out,
                 const uint32_t* __restrict__ histogram, uint32_t* ticket, uint32_t* statuses) {
  using BlockScan = cub::BlockScan<uint32_t, THREADS>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ uint32_t s_offsets[WARPS][RADIX];  // per warp and digit: count, then place in the block
  __shared__ uint32_t s_base[RADIX];            // output place of a digit's block place 0
  __shared__ Key s_keys[SORT_TILE];
  __shared__ int32_t s_values[SORT_TILE];
  const int tile = take_ticket(ticket);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int w = 0; w < WARPS; ++w) s_offsets[w][threadIdx.x] = 0;
  __syncthreads();

  const int first = tile * SORT_TILE + warp * 32 * SORT_ITEMS + lane;
  Key keys[SORT_ITEMS];
  int32_t values[SORT_ITEMS];
  uint32_t digits[SORT_ITEMS], ranks[SORT_ITEMS];
#pragma unroll
  for (int k = 0; k < SORT_ITEMS; ++k) {
    const int i = first + 32 * k;
    const bool valid = i < count;
    keys[k] = valid ? keys_in[i] : Key(0);
    values[k] = valid ? values_in[i] : 0;
    digits[k] = valid ? (static_cast<uint32_t>(keys[k]) >> shift) % RADIX : RADIX;
  }
  // rank within the warp: the lanes with the same digit, in lane order, after the earlier items
  const unsigned lanes_before = (1u << lane) - 1;
#pragma unroll
  for (int k = 0; k < SORT_ITEMS; ++k) {
    const unsigned peers = __match_any_sync(FULL, digits[k]);
    const int leader = __ffs(peers) - 1;
    uint32_t earlier = 0;
    if (lane == leader && digits[k] < RADIX) {
      earlier = s_offsets[warp][digits[k]];
      s_offsets[warp][digits[k]] = earlier + __popc(peers);
    }
    ranks[k] = __shfl_sync(FULL, earlier, leader) + __popc(peers & lanes_before);
    __syncwarp();
  }
  __syncthreads();

  // thread d, for digit d: the block's count (published at once for the blocks after), where the
  // digit starts in the block and in the output, and where each warp's keys of it start
  const int d = threadIdx.x;
  uint32_t in_block = 0;
  for (int w = 0; w < WARPS; ++w) in_block += s_offsets[w][d];
  const uint32_t before = look_back(statuses + d, RADIX, tile, in_block);
  uint32_t digit_start, block_start;
  BlockScan(scan_storage).ExclusiveSum(histogram[d], digit_start);
  __syncthreads();
  BlockScan(scan_storage).ExclusiveSum(in_block, block_start);
  s_base[d] = digit_start + before - block_start;  // modulo 2^32: the sum with a place is exact
  for (int w = 0, place = block_start; w < WARPS; ++w) {
    const uint32_t c = s_offsets[w][d];
    s_offsets[w][d] = place;
    place += c;
  }
  __syncthreads();

#pragma unroll
  for (int k = 0; k < SORT_ITEMS; ++k) {
    if (digits[k] < RADIX) {
      const uint32_t place = s_offsets[warp][digits[k]] + ranks[k];
      s_keys[place] = keys[k];
      s_values[place] = values[k];
    }
  }
  __syncthreads();
  const int in_tile = min(SORT_TILE, count - tile * SORT_TILE);
  for (int place = threadIdx.x; place < in_tile; place += THREADS) {
    const Key key = s_keys[place];
    const uint32_t at = s_base[(static_cast<uint32_t>(key) >> shift) % RADIX] + place;
    keys_out[at] = key;
    values_out[at] = s_values[place];
  }
}

// Sorts count pairs stably by the low `bits` bits of their keys; keys[0]/values[0] hold the input,
// keys[1]/values[1] the same room again. Returns the index (0 or 1) of the buffers that hold the
// result. state: sort_state_words(count, bits) words, zero but for the histograms of every pass's
// digits.
template <typename Key>
int radix_sort(int count, int bits, Key* keys[2], int32_t* values[2], uint32_t* state_words, cudaStream_t stream) {
  const int passes = sort_passes(bits);
  const SortState state = sort_state(state_words, bits);
  const int tiles = sort_tiles(count);
  int in = 0;
  for (int p = 0; p < passes; ++p, in ^= 1) {
    sort_pass_kernel<Key><<<tiles, THREADS, 0, stream>>>(
        count, 8 * p, keys[in], values[in], keys[in ^ 1], values[in ^ 1], state.histogram + p * RADIX,
        state.tickets + p, state.statuses + static_cast<int64_t>(p) * tiles * RADIX);
    check_launch("sort pass");
  }
  return in;
}

// ---- listing the tile entries

// One block per 256 consecutive Gaussians in depth order: the block's prefix sum of their tile
// counts (a block scan, then the look-back for the blocks before), then each Gaussian's entries
// (tile key, Gaussian) for the tiles it can blend in (tile_hit, within the rectangle of its
// radius), with the digits of the keys counted into the tile sort's histograms.
template <typename Key>
__global__ void __launch_bounds__(THREADS)
list_entries_kernel(int n, Camera cam, const int32_t* __restrict__ order, const int32_t* __restrict__ tiles_touched,
                    const float2* __restrict__ xy, const float4* __restrict__ conic_opacity,
                    const int32_t* __restrict__ radii, uint32_t* ticket, uint32_t* statuses,
                    Key* __restrict__ tile_keys, int32_t* __restrict__ ids, int passes, uint32_t* histogram) {
  using BlockScan = cub::BlockScan<uint32_t, THREADS>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ uint32_t s_before;
  __shared__ uint32_t s_hist[DEPTH_PASSES][RADIX];  // a 32-bit key has at most DEPTH_PASSES digits
  for (int k = threadIdx.x; k < DEPTH_PASSES * RADIX; k += THREADS) s_hist[k / RADIX][k % RADIX] = 0;
  const int tile = take_ticket(ticket);
  const int j = tile * THREADS + threadIdx.x;
  const int g = j < n ? order[j] : 0;
  const uint32_t touched = j < n ? static_cast<uint32_t>(tiles_touched[g]) : 0u;
  uint32_t offset, block_total;
  BlockScan(scan_storage).ExclusiveSum(touched, offset, block_total);
  if (threadIdx.x == 0) s_before = look_back(statuses, 1, tile, block_total);
  __syncthreads();

  // digit counts, one shared add per run of equal digits (a Gaussian's tiles share high digits)
  uint32_t run_digit[DEPTH_PASSES] = {}, run_length[DEPTH_PASSES] = {};
  auto count_digits = [&](uint32_t key) {
#pragma unroll
    for (int p = 0; p < DEPTH_PASSES; ++p) {
      const uint32_t digit = (key >> (8 * p)) % RADIX;
      if (p < passes && run_length[p] > 0 && digit != run_digit[p]) {
        atomicAdd(&s_hist[p][run_digit[p]], run_length[p]);
        run_length[p] = 0;
      }
      run_digit[p] = digit;
      run_length[p] += p < passes;
    }
  };
  if (touched > 0) {
    int k = static_cast<int>(s_before + offset);
    const int end = k + static_cast<int>(touched);
    int x0, y0, x1, y1;
    const float2 p = xy[g];
    tile_rect(p.x, p.y, static_cast<float>(radii[g]), cam.grid_x, cam.grid_y, x0, y0, x1, y1);
    const Footprint f = make_footprint(p, conic_opacity[g], x0, y0, x1, y1);
    for (int ty = f.y0; ty < f.y1; ++ty)
      for (int tx = f.x0; tx < f.x1; ++tx)
        if (k < end && tile_hit(f, tx, ty, cam.width, cam.height)) {
          const uint32_t key = static_cast<uint32_t>(ty * cam.grid_x + tx);
          tile_keys[k] = static_cast<Key>(key);
          ids[k++] = g;
          count_digits(key);
        }
    // the projection counted with the same arithmetic, so k == end; were it ever short, the rest
    // gets a key past the last tile, which sorts last and belongs to no tile's range
    for (; k < end; ++k) {
      const uint32_t key = static_cast<uint32_t>(cam.grid_x * cam.grid_y);
      tile_keys[k] = static_cast<Key>(key);
      ids[k] = g;
      count_digits(key);
    }
  }
#pragma unroll
  for (int p = 0; p < DEPTH_PASSES; ++p)
    if (run_length[p] > 0) atomicAdd(&s_hist[p][run_digit[p]], run_length[p]);
  __syncthreads();
  for (int k = threadIdx.x; k < passes * RADIX; k += THREADS)
    if (s_hist[k / RADIX][k % RADIX] > 0) atomicAdd(histogram + k, s_hist[k / RADIX][k % RADIX]);
}

// Each tile's [start, end) in the sorted keys: where tile t's keys start is the first place with a
// key >= t, found by one warp in a 32-way search (about 5 dependent loads for a million entries,
// not 20); a tile's end is the next tile's start. No zeroing pass, and keys past the last tile
// (see list_entries_kernel) fall in no range.
template <typename Key>
__global__ void ranges_kernel(int m, int num_tiles, const Key* __restrict__ keys, int2* __restrict__ ranges) {
  const int t = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (t > num_tiles) return;
  int lo = 0, hi = m;  // the place is in [lo, hi]
  while (lo < hi) {
    const int step = (hi - lo + 31) / 32;
    const int probe = lo + lane * step;
    const unsigned below = __ballot_sync(FULL, probe < hi && static_cast<int>(keys[probe]) < t);
    const int k = __popc(below);  // keys are sorted: the first k probes are below t
    if (k == 0) break;
    const int last_below = lo + (k - 1) * step;
    hi = min(hi, last_below + step);
    lo = last_below + 1;
  }
  if (lane == 0) {
    if (t < num_tiles) ranges[t].x = lo;
    if (t > 0) ranges[t - 1].y = lo;
  }
}

template <typename T>
T* as(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// The work buffer, int32 words: rows [5, n] (tiles_touched, depth keys, order, then two rows of room
// for the depth sort), then, zeroed: the entry count (int64, at an even word), the listing's ticket
// and look-back statuses (one per block of THREADS Gaussians), the depth sort's state.
struct WorkParts {
  int64_t entry_count, ticket, statuses, depth_sort, end;
};

WorkParts work_parts(int64_t n) {
  WorkParts w;
  w.entry_count = (5 * n + 1) / 2 * 2;
  w.ticket = w.entry_count + 2;
  w.statuses = w.ticket + 1;
  w.depth_sort = w.statuses + (n + THREADS - 1) / THREADS;
  w.end = w.depth_sort + sort_state_words(static_cast<int>(n), 32);
  return w;
}

struct Event {  // a CUDA event that is destroyed on every way out
  cudaEvent_t event;
  Event() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming)); }
  ~Event() { cudaEventDestroy(event); }
};

// Steps 2 to 4 of bin_gaussians for tile keys of type Key (uint16_t or uint32_t).
template <typename Key>
void list_and_sort(int n, int m, const Camera& cam, const int32_t* by_depth, const at::Tensor& xy,
                   const at::Tensor& conic_opacity, const at::Tensor& radii, at::Tensor& work,
                   at::Tensor& point_ids, at::Tensor& ranges, cudaStream_t stream) {
  const int num_tiles = cam.grid_x * cam.grid_y;
  int bits = 1;
  while ((int64_t(1) << bits) <= num_tiles) ++bits;  // room for the key num_tiles too
  // 2. the entries, Gaussians in depth order: keys [2, m] (the second half is the sort's other
  // buffer), then the tile sort's state
  const int64_t key_words = (2 * sizeof(Key) * static_cast<int64_t>(m) + 3) / 4;
  const int64_t state_words = sort_state_words(m, bits);
  at::Tensor entries = at::empty({key_words + state_words}, radii.options());
  uint32_t* state = as<uint32_t>(entries) + key_words;
  at::Tensor ids = at::empty({m}, radii.options());
  if (m > 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(state, 0, sizeof(uint32_t) * state_words, stream));
    int32_t* rows = as<int32_t>(work);
    const WorkParts parts = work_parts(n);
    list_entries_kernel<Key><<<(n + THREADS - 1) / THREADS, THREADS, 0, stream>>>(
        n, cam, by_depth, rows, as<float2>(xy), as<float4>(conic_opacity), as<int32_t>(radii),
        reinterpret_cast<uint32_t*>(rows + parts.ticket), reinterpret_cast<uint32_t*>(rows + parts.statuses),
        as<Key>(entries), as<int32_t>(ids), sort_passes(bits), sort_state(state, bits).histogram);
    check_launch("list_entries");
  }
  work.reset();  // done with: free it before the entries' sort buffers peak

  // 3. a stable sort of the entries by tile, on the bits the tile index needs
  point_ids = at::empty({m}, radii.options());
  const Key* sorted_keys = as<Key>(entries);
  if (m > 0) {
    Key* keys[2] = {as<Key>(entries), as<Key>(entries) + m};
    int32_t* values[2] = {as<int32_t>(ids), as<int32_t>(point_ids)};
    const int out = radix_sort<Key>(m, bits, keys, values, state, stream);
    if (out == 0) point_ids = ids;
    sorted_keys = keys[out];
  }

  // 4. each tile's [start, end)
  ranges_kernel<Key><<<((num_tiles + 1) * 32 + THREADS - 1) / THREADS, THREADS, 0, stream>>>(
      m, num_tiles, sorted_keys, as<int2>(ranges));
  check_launch("ranges");
}

}  // namespace

at::Tensor binning_work(int64_t n, const at::Tensor& like, cudaStream_t stream) {
  TORCH_CHECK(n < (int64_t(1) << 30), "rasterizer: ", n, " Gaussians, more than 2^30; render fewer");
  const WorkParts parts = work_parts(n);
  at::Tensor work = at::empty({parts.end}, like.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(work.data_ptr<int32_t>() + parts.entry_count, 0,
                                 sizeof(int32_t) * (parts.end - parts.entry_count), stream));
  return work;
}

WorkPointers work_pointers(const at::Tensor& work, int64_t n) {
  int32_t* rows = as<int32_t>(work);
  const WorkParts parts = work_parts(n);
  return {rows, reinterpret_cast<uint32_t*>(rows + n), rows + 2 * n, reinterpret_cast<int64_t*>(rows + parts.entry_count),
          sort_state(reinterpret_cast<uint32_t*>(rows + parts.depth_sort), 32).histogram};
}

void bin_gaussians(int n, const Camera& cam, const at::Tensor& xy, const at::Tensor& conic_opacity,
                   const at::Tensor& radii, at::Tensor work, at::Tensor& point_ids, at::Tensor& ranges) {
  const int num_tiles = cam.grid_x * cam.grid_y;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ranges = at::empty({num_tiles, 2}, radii.options());
  int32_t* rows = as<int32_t>(work);
  const WorkParts parts = work_parts(n);

  // the entry count, on its way to the host while the GPU sorts by depth
  const at::Tensor count_host = at::empty({1}, radii.options().dtype(at::kLong).device(at::kCPU).pinned_memory(true));
  C10_CUDA_CHECK(cudaMemcpyAsync(count_host.data_ptr(), rows + parts.entry_count, sizeof(int64_t),
                                 cudaMemcpyDeviceToHost, stream));
  const Event counted;
  C10_CUDA_CHECK(cudaEventRecord(counted.event, stream));

  // 1. Gaussians by depth (stable: equal depths keep index order), rows 1 and 3 the keys, 2 and 4
  // the Gaussian indices; the projection counted the digits
  const int32_t* by_depth = rows + 2 * n;
  if (n > 0) {
    uint32_t* keys[2] = {reinterpret_cast<uint32_t*>(rows + n), reinterpret_cast<uint32_t*>(rows + 3 * n)};
    int32_t* order[2] = {rows + 2 * n, rows + 4 * n};
    const int out = radix_sort<uint32_t>(n, 32, keys, order,
                                                      reinterpret_cast<uint32_t*>(rows + parts.depth_sort), stream);
    by_depth = order[out];
  }

  C10_CUDA_CHECK(cudaEventSynchronize(counted.event));  // the one host synchronisation of a render
  const int64_t total = *count_host.data_ptr<int64_t>();
  TORCH_CHECK(total < (int64_t(1) << 30), "rasterizer: ", total,
              " (tile, Gaussian) pairs, more than 2^30; render fewer or smaller Gaussians");
  const int m = static_cast<int>(total);
  // 2-4: the entries listed, sorted by tile, and each tile's range
  if (num_tiles < 0xFFFF)
    list_and_sort<uint16_t>(n, m, cam, by_depth, xy, conic_opacity, radii, work, point_ids, ranges, stream);
  else
    list_and_sort<uint32_t>(n, m, cam, by_depth, xy, conic_opacity, radii, work, point_ids, ranges, stream);
}

}  // namespace dgr
