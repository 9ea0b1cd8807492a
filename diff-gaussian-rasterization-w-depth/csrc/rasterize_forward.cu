// Forward blending: one block per 16x16 tile, one thread per pixel, the tile's Gaussians streamed
// front to back through shared memory in batches of 256.
//
// render_forward blends colour and depth, stops a pixel when its transmittance would fall below
// 1e-4, and records per pixel the final T and how many of the tile's Gaussians it walked
// (n_contrib: its last blended Gaussian + 1), per tile the largest such count. The feature pass
// then needs no transmittance test of its own: it blends exactly the first n_contrib Gaussians of
// each pixel, CH channels per block (a grid of tiles x channel chunks, so C is a runtime value).
#include "rasterizer.h"

namespace dgr {
namespace {

__global__ void __launch_bounds__(BLOCK)
render_forward_kernel(Camera cam, const int2* __restrict__ ranges, const int32_t* __restrict__ point_ids,
                      const float2* __restrict__ xy, const float4* __restrict__ conic_opacity,
                      const float* __restrict__ colors, const float* __restrict__ depth,
                      const float* __restrict__ bg, float* __restrict__ out_color,
                      float* __restrict__ out_depth, float* __restrict__ final_T,
                      int32_t* __restrict__ n_contrib, int32_t* __restrict__ tile_last) {
  __shared__ float2 s_xy[BLOCK];
  __shared__ float4 s_co[BLOCK];
  __shared__ float4 s_val[BLOCK];  // r, g, b, view z
  __shared__ int s_last;
  const int tile = blockIdx.x;
  const int px = (tile % cam.grid_x) * TILE + threadIdx.x % TILE;
  const int py = (tile / cam.grid_x) * TILE + threadIdx.x / TILE;
  const bool inside = px < cam.width && py < cam.height;
  const int2 range = ranges[tile];
  const int count = range.y - range.x;
  const float col = static_cast<float>(px), row = static_cast<float>(py);
  if (threadIdx.x == 0) s_last = 0;

  bool done = !inside;
  float T = 1.f, r = 0.f, g = 0.f, b = 0.f, d = 0.f;
  int last = 0;
  for (int base = 0; base < count; base += BLOCK) {
    if (__syncthreads_count(done) == BLOCK) break;  // also keeps the last batch until all are done
    const int k = base + threadIdx.x;
    if (k < count) {
      const int id = point_ids[range.x + k];
      s_xy[threadIdx.x] = xy[id];
      s_co[threadIdx.x] = conic_opacity[id];
      s_val[threadIdx.x] = make_float4(colors[3 * id], colors[3 * id + 1], colors[3 * id + 2], depth[id]);
    }
    __syncthreads();
    const int batch = min(BLOCK, count - base);
    for (int j = 0; !done && j < batch; ++j) {
      Fragment f;
      if (!eval_fragment(s_xy[j], s_co[j], col, row, f)) continue;
      const float next_T = next_transmittance(T, f.alpha);
      if (next_T < T_MIN) {
        done = true;
        break;
      }
      const float w = f.alpha * T;
      const float4 v = s_val[j];
      r += w * v.x;
      g += w * v.y;
      b += w * v.z;
      d += w * v.w;
      T = next_T;
      last = base + j + 1;
    }
  }
  if (inside) {
    const int hw = cam.width * cam.height, pix = py * cam.width + px;
    out_color[pix] = r + T * bg[0];
    out_color[hw + pix] = g + T * bg[1];
    out_color[2 * hw + pix] = b + T * bg[2];
    out_depth[pix] = d;
    final_T[pix] = T;
    n_contrib[pix] = last;
  }
  __syncthreads();
  atomicMax(&s_last, last);
  __syncthreads();
  if (threadIdx.x == 0) tile_last[tile] = s_last;
}

template <int CH>
__global__ void __launch_bounds__(BLOCK)
render_features_kernel(Camera cam, const int2* __restrict__ ranges, const int32_t* __restrict__ point_ids,
                       const float2* __restrict__ xy, const float4* __restrict__ conic_opacity,
                       const float* __restrict__ features, int channels, const int32_t* __restrict__ n_contrib,
                       const int32_t* __restrict__ tile_last, float* __restrict__ out) {
  constexpr int ROW = CH + 4;  // padded so that 8 consecutive rows hit distinct banks (16-byte stores)
  __shared__ float2 s_xy[BLOCK];
  __shared__ float4 s_co[BLOCK];
  __shared__ __align__(16) float s_f[BLOCK * ROW];
  const int c0 = blockIdx.y * CH;
  const auto [px, py, pix, inside, col, row, start, count, mine] = tile_pixel(cam, ranges, n_contrib, tile_last);
  const bool vec4 = (channels % 4) == 0 && (reinterpret_cast<uintptr_t>(features) % 16) == 0;

  float T = 1.f;
  float acc[CH];
#pragma unroll
  for (int c = 0; c < CH; ++c) acc[c] = 0.f;
  for (int base = 0; base < count; base += BLOCK) {
    __syncthreads();
    const int k = base + threadIdx.x;
    if (k < count) {
      const int id = point_ids[start + k];
      s_xy[threadIdx.x] = xy[id];
      s_co[threadIdx.x] = conic_opacity[id];
      const float* src = features + static_cast<int64_t>(id) * channels + c0;
      float* dst = s_f + threadIdx.x * ROW;
      if (vec4) {
#pragma unroll
        for (int c = 0; c < CH; c += 4)
          *reinterpret_cast<float4*>(dst + c) = c0 + c < channels ? __ldg(reinterpret_cast<const float4*>(src + c))
                                                                  : make_float4(0.f, 0.f, 0.f, 0.f);
      } else {
#pragma unroll
        for (int c = 0; c < CH; ++c) dst[c] = c0 + c < channels ? __ldg(src + c) : 0.f;
      }
    }
    __syncthreads();
    const int stop = min(BLOCK, mine - base);
    for (int j = 0; j < stop; ++j) {
      Fragment f;
      if (!eval_fragment(s_xy[j], s_co[j], col, row, f)) continue;
      const float w = f.alpha * T;
      const float4* fv = reinterpret_cast<const float4*>(s_f + j * ROW);
#pragma unroll
      for (int c = 0; c < CH / 4; ++c) {
        const float4 v = fv[c];
        acc[4 * c] += w * v.x;
        acc[4 * c + 1] += w * v.y;
        acc[4 * c + 2] += w * v.z;
        acc[4 * c + 3] += w * v.w;
      }
      T = next_transmittance(T, f.alpha);
    }
  }
  if (!inside) return;
  const int64_t hw = static_cast<int64_t>(cam.width) * cam.height;
#pragma unroll
  for (int c = 0; c < CH; ++c)
    if (c0 + c < channels) out[(c0 + c) * hw + pix] = acc[c];
}

template <int CH>
void launch_features(const Camera& cam, const int2* ranges, const int32_t* point_ids, const float2* xy,
                     const float4* conic_opacity, const float* features, int channels,
                     const int32_t* n_contrib, const int32_t* tile_last, float* out, cudaStream_t stream) {
  const dim3 grid(cam.grid_x * cam.grid_y, (channels + CH - 1) / CH);
  render_features_kernel<CH><<<grid, BLOCK, 0, stream>>>(cam, ranges, point_ids, xy, conic_opacity, features,
                                                         channels, n_contrib, tile_last, out);
  check_launch("render_features");
}

}  // namespace

void render_forward(const Camera& cam, const int2* ranges, const int32_t* point_ids, const float2* xy,
                    const float4* conic_opacity, const float* colors, const float* depth, const float* bg,
                    float* out_color, float* out_depth, float* final_T, int32_t* n_contrib,
                    int32_t* tile_last, cudaStream_t stream) {
  render_forward_kernel<<<cam.grid_x * cam.grid_y, BLOCK, 0, stream>>>(
      cam, ranges, point_ids, xy, conic_opacity, colors, depth, bg, out_color, out_depth, final_T, n_contrib,
      tile_last);
  check_launch("render_forward");
}

void render_features(const Camera& cam, const int2* ranges, const int32_t* point_ids, const float2* xy,
                     const float4* conic_opacity, const float* features, int channels,
                     const int32_t* n_contrib, const int32_t* tile_last, float* out_features,
                     cudaStream_t stream) {
  // narrow chunks for a few channels, 32 otherwise (32 accumulators per thread, 4 blocks per SM)
  if (channels <= 8)
    launch_features<8>(cam, ranges, point_ids, xy, conic_opacity, features, channels, n_contrib, tile_last,
                       out_features, stream);
  else
    launch_features<32>(cam, ranges, point_ids, xy, conic_opacity, features, channels, n_contrib, tile_last,
                        out_features, stream);
}

}  // namespace dgr
