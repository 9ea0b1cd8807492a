// Backward blending, two kernels.
//
// render_backward (geometry): per tile, back to front, one thread per pixel. From the final
// transmittance each pixel recovers T before every fragment (T / (1 - alpha)) and keeps the sum of
// w * (dL/dout . value) over the fragments behind, which gives dL/dalpha; then the gradients of the
// fragment's colour, depth, opacity, conic and screen position. A warp sums them over its 32 pixels
// (transposed: 16 shuffles for the 10 values) before ten lanes add them with one atomic each, and
// skips Gaussians none of its pixels blends.
//
// render_backward_values (colour or features alone, e.g. frozen geometry): dL/dvalues of a tile is
// W^T G, W [pixels, Gaussians] the blending weights, G [pixels, C] the image gradient. Per batch of
// 32 Gaussians the pixels write their weights (front to back, as the forward pass) to shared memory,
// then the block multiplies: each thread 2 Gaussians x 4 channels summed over the 256 pixels, then
// one atomic add per (Gaussian, channel, tile), float4-wide on Hopper, rather than one per pixel.
// A block takes 64 channels of one tile; wider C is a grid of chunks.
#include "rasterizer.h"

namespace dgr {
namespace {

constexpr unsigned FULL = 0xFFFFFFFFu;

// float4 atomic adds: Hopper and later, in the CUDA headers since 12.x
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && (__CUDACC_VER_MAJOR__ > 12 || __CUDACC_VER_MINOR__ >= 8)
#define VECTOR_ATOMICS 1
#else
#define VECTOR_ATOMICS 0
#endif

// One step of warp_sum_transposed: a lane keeps HALF of its values (the upper or lower half, by its
// lane bit OFFSET) and adds in its partner's copy of them. Template constants, so that v stays in
// registers (a run-time index, even in a loop the compiler half unrolls, puts it in local memory).
template <int HALF, int OFFSET>
__device__ __forceinline__ void trade_halves(float (&v)[16], int lane) {
  const bool upper = lane & OFFSET;
#pragma unroll
  for (int i = 0; i < HALF; ++i) {
    const float give = upper ? v[i] : v[i + HALF];
    const float keep = upper ? v[i + HALF] : v[i];
    v[i] = keep + __shfl_xor_sync(FULL, give, OFFSET);
  }
}

// Sums 16 values over the warp with 16 shuffles instead of 5 per value: at each halving step a
// lane keeps one half of its values and trades the other half with its partner. Afterwards lanes
// 2k and 2k+1 hold the sum of value k.
__device__ __forceinline__ float warp_sum_transposed(float (&v)[16], int lane) {
  trade_halves<8, 16>(v, lane);
  trade_halves<4, 8>(v, lane);
  trade_halves<2, 4>(v, lane);
  trade_halves<1, 2>(v, lane);
  return v[0] + __shfl_xor_sync(FULL, v[0], 1);
}

// FEATURES: 0 none; SMALL_FEATURES (channels <= 4, as Dynamic 3DGS's segmentation): the pixel's
// feature gradient held in registers and the batch's features in shared memory beside its colours;
// ANY_FEATURES: both read from global memory per fragment.
constexpr int SMALL_FEATURES = 1, ANY_FEATURES = 2;

template <int FEATURES>
__global__ void __launch_bounds__(BLOCK)
render_backward_kernel(Camera cam, const int2* __restrict__ ranges, const int32_t* __restrict__ point_ids,
                       const float2* __restrict__ xy, const float4* __restrict__ conic_opacity,
                       const float* __restrict__ colors, const float* __restrict__ depth,
                       const float* __restrict__ bg, const float* __restrict__ final_T,
                       const int32_t* __restrict__ n_contrib, const int32_t* __restrict__ tile_last,
                       ImageGrad grad_color, ImageGrad grad_depth, const float* __restrict__ features,
                       ImageGrad grad_features,
                       int channels, int n_gauss, float* __restrict__ raster_grads) {
  __shared__ int s_id[BLOCK];
  __shared__ float2 s_xy[BLOCK];
  __shared__ float4 s_co[BLOCK];
  __shared__ float4 s_val[BLOCK];
  __shared__ float4 s_feat[FEATURES == SMALL_FEATURES ? BLOCK : 1];
  const auto [px, py, pix, inside, col, row, start, count, mine] = tile_pixel(cam, ranges, n_contrib, tile_last);
  const int lane = threadIdx.x % 32;

  float T = inside ? final_T[pix] : 1.f;
  float gc[3] = {0.f, 0.f, 0.f}, gd = 0.f;
  if (inside && grad_color.data != nullptr)
    for (int k = 0; k < 3; ++k) gc[k] = grad_color.at(k, py, px);
  if (inside && grad_depth.data != nullptr) gd = grad_depth.at(0, py, px);
  float gf[4] = {0.f, 0.f, 0.f, 0.f};  // SMALL_FEATURES: this pixel's feature gradient
  if (FEATURES == SMALL_FEATURES && inside)
    for (int c = 0; c < channels; ++c) gf[c] = grad_features.at(c, py, px);
  // color = sum w c + T_final bg: the background's share of every dL/dalpha
  const float behind_bg = T * (bg[0] * gc[0] + bg[1] * gc[1] + bg[2] * gc[2]);
  float behind = 0.f;  // sum over blended fragments behind this one of w * (dL/dout . value)

  for (int end = count; end > 0; end -= BLOCK) {
    const int first = max(0, end - BLOCK);
    __syncthreads();
    const int k = first + threadIdx.x;
    if (k < end) {
      const int id = point_ids[start + k];
      s_id[threadIdx.x] = id;
      s_xy[threadIdx.x] = xy[id];
      s_co[threadIdx.x] = conic_opacity[id];
      s_val[threadIdx.x] = make_float4(colors[3 * id], colors[3 * id + 1], colors[3 * id + 2], depth[id]);
      if (FEATURES == SMALL_FEATURES) {
        float fv[4] = {0.f, 0.f, 0.f, 0.f};
        for (int c = 0; c < channels; ++c) fv[c] = features[static_cast<int64_t>(id) * channels + c];
        s_feat[threadIdx.x] = make_float4(fv[0], fv[1], fv[2], fv[3]);
      }
    }
    __syncthreads();
    for (int j = end - first - 1; j >= 0; --j) {
      Fragment f;
      const bool on = first + j < mine && eval_fragment(s_xy[j], s_co[j], col, row, f);
      if (!__any_sync(FULL, on)) continue;
      float v[16];  // RasterGrad order, padded to 16 for the reduction
#pragma unroll
      for (int q = 0; q < 16; ++q) v[q] = 0.f;
      if (on) {
        const float keep = __fsub_rn(1.f, f.alpha);
        T = T / keep;  // transmittance in front of this fragment
        const float w = f.alpha * T;
        const float4 val = s_val[j];
        float dot = val.x * gc[0] + val.y * gc[1] + val.z * gc[2] + val.w * gd;
        if (FEATURES == SMALL_FEATURES) {
          const float4 fv = s_feat[j];
          dot += fv.x * gf[0] + fv.y * gf[1] + fv.z * gf[2] + fv.w * gf[3];
        } else if (FEATURES == ANY_FEATURES) {
          const float* fv = features + static_cast<int64_t>(s_id[j]) * channels;
          for (int c = 0; c < channels; ++c) dot += __ldg(fv + c) * grad_features.at(c, py, px);
        }
        const float g_alpha = T * dot - (behind + behind_bg) / keep;
        behind += w * dot;
        v[G_R] = w * gc[0];
        v[G_G] = w * gc[1];
        v[G_B] = w * gc[2];
        v[G_DEPTH] = w * gd;
        if (f.alpha_raw <= ALPHA_MAX) {  // past the clamp alpha is constant
          const float4 co = s_co[j];
          const float g_power = g_alpha * f.alpha_raw;
          v[G_OPACITY] = g_alpha * f.e;
          v[G_X] = g_power * (-co.x * f.dx - co.y * f.dy);
          v[G_Y] = g_power * (-co.z * f.dy - co.y * f.dx);
          v[G_CONIC_A] = g_power * (-0.5f * f.dx * f.dx);
          v[G_CONIC_B] = g_power * (-f.dx * f.dy);
          v[G_CONIC_C] = g_power * (-0.5f * f.dy * f.dy);
        }
      }
      const float sum = warp_sum_transposed(v, lane);
      const int which = lane >> 1;  // lanes 0, 2, ..., 18 add the ten sums at once
      if ((lane & 1) == 0 && which < RASTER_GRADS)
        atomicAdd(raster_grads + static_cast<int64_t>(which) * n_gauss + s_id[j], sum);
    }
  }
}

// render_backward_values: batch, channel chunk and the padded shared-memory rows
constexpr int KB = 32;
constexpr int CHB = 64;
static_assert(KB == 32 && CHB == 64 && BLOCK == 256, "the product's thread mapping assumes 16 x 16 groups");
constexpr int W_ROW = KB + 4;   // +4 floats: 8 consecutive pixels' 16-byte stores hit distinct banks
constexpr int G_ROW = CHB + 4;
constexpr size_t VALUES_SMEM = sizeof(float) * BLOCK * (W_ROW + G_ROW) + KB * (sizeof(float4) + sizeof(float2) + sizeof(int));

__global__ void __launch_bounds__(BLOCK)
render_backward_values_kernel(Camera cam, const int2* __restrict__ ranges, const int32_t* __restrict__ point_ids,
                              const float2* __restrict__ xy, const float4* __restrict__ conic_opacity,
                              const int32_t* __restrict__ n_contrib, const int32_t* __restrict__ tile_last,
                              ImageGrad grad_image, int channels, float* __restrict__ grad_values) {
  extern __shared__ float4 smem[];
  float* s_g = reinterpret_cast<float*>(smem);  // [BLOCK][G_ROW] image gradient of the tile's pixels
  float* s_w = s_g + BLOCK * G_ROW;              // [BLOCK][W_ROW] weights of the batch
  float4* s_co = reinterpret_cast<float4*>(s_w + BLOCK * W_ROW);
  float2* s_xy = reinterpret_cast<float2*>(s_co + KB);
  int* s_id = reinterpret_cast<int*>(s_xy + KB);

  const int c0 = blockIdx.y * CHB;
  const auto [px, py, pix, inside, col, row, start, count, mine] = tile_pixel(cam, ranges, n_contrib, tile_last);

  for (int c = 0; c < CHB; c += 4) {
    float g[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) g[q] = inside && c0 + c + q < channels ? grad_image.at(c0 + c + q, py, px) : 0.f;
    *reinterpret_cast<float4*>(s_g + threadIdx.x * G_ROW + c) = make_float4(g[0], g[1], g[2], g[3]);
  }

  // this thread's share of the product: Gaussians 2kg, 2kg+1 and channels 4cg..4cg+3; a warp takes
  // 8 kg x 4 cg, so per pixel it reads 64 contiguous bytes of weights and of gradients (one
  // shared-memory wavefront each) for 8 multiply-adds per thread
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int kg = lane % 8 + 8 * (warp % 2), cg = lane / 8 + 4 * (warp / 2);
#if VECTOR_ATOMICS
  const bool vec4 = channels % 4 == 0 && reinterpret_cast<uintptr_t>(grad_values) % 16 == 0;
#endif
  float T = 1.f;
  for (int base = 0; base < count; base += KB) {
    __syncthreads();  // the previous product is done with s_w and s_id
    const int n_here = min(KB, count - base);
    if (threadIdx.x < n_here) {
      const int id = point_ids[start + base + threadIdx.x];
      s_id[threadIdx.x] = id;
      s_xy[threadIdx.x] = xy[id];
      s_co[threadIdx.x] = conic_opacity[id];
    }
    __syncthreads();
    float* w_row = s_w + threadIdx.x * W_ROW;
    for (int j = 0; j < KB; j += 4) {
      float w[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        w[q] = 0.f;
        Fragment f;
        if (j + q < n_here && base + j + q < mine && eval_fragment(s_xy[j + q], s_co[j + q], col, row, f)) {
          w[q] = f.alpha * T;
          T = next_transmittance(T, f.alpha);
        }
      }
      *reinterpret_cast<float4*>(w_row + j) = make_float4(w[0], w[1], w[2], w[3]);
    }
    __syncthreads();
    float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll 4
    for (int p = 0; p < BLOCK; ++p) {
      const float2 w2 = *reinterpret_cast<const float2*>(s_w + p * W_ROW + 2 * kg);
      const float4 g4 = *reinterpret_cast<const float4*>(s_g + p * G_ROW + 4 * cg);
      acc[0][0] += w2.x * g4.x; acc[0][1] += w2.x * g4.y; acc[0][2] += w2.x * g4.z; acc[0][3] += w2.x * g4.w;
      acc[1][0] += w2.y * g4.x; acc[1][1] += w2.y * g4.y; acc[1][2] += w2.y * g4.z; acc[1][3] += w2.y * g4.w;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (2 * kg + i >= n_here) continue;
      float* dst = grad_values + static_cast<int64_t>(s_id[2 * kg + i]) * channels + c0 + 4 * cg;
#if VECTOR_ATOMICS
      if (vec4 && c0 + 4 * cg < channels) {  // one 16-byte atomic add for the four channels
        if (acc[i][0] != 0.f || acc[i][1] != 0.f || acc[i][2] != 0.f || acc[i][3] != 0.f)
          atomicAdd(reinterpret_cast<float4*>(dst), make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
        continue;
      }
#endif
#pragma unroll
      for (int q = 0; q < 4; ++q)
        if (c0 + 4 * cg + q < channels && acc[i][q] != 0.f) atomicAdd(dst + q, acc[i][q]);
    }
  }
}

}  // namespace

void render_backward(const Camera& cam, const int2* ranges, const int32_t* point_ids, const float2* xy,
                     const float4* conic_opacity, const float* colors, const float* depth, const float* bg,
                     const float* final_T, const int32_t* n_contrib, const int32_t* tile_last,
                     ImageGrad grad_color, ImageGrad grad_depth, const float* features,
                     ImageGrad grad_features, int channels, int n_gauss, float* raster_grads,
                     cudaStream_t stream) {
  const int tiles = cam.grid_x * cam.grid_y;
  if (features != nullptr && grad_features.data != nullptr && channels <= 4)
    render_backward_kernel<SMALL_FEATURES><<<tiles, BLOCK, 0, stream>>>(
        cam, ranges, point_ids, xy, conic_opacity, colors, depth, bg, final_T, n_contrib, tile_last, grad_color,
        grad_depth, features, grad_features, channels, n_gauss, raster_grads);
  else if (features != nullptr && grad_features.data != nullptr)
    render_backward_kernel<ANY_FEATURES><<<tiles, BLOCK, 0, stream>>>(
        cam, ranges, point_ids, xy, conic_opacity, colors, depth, bg, final_T, n_contrib, tile_last, grad_color,
        grad_depth, features, grad_features, channels, n_gauss, raster_grads);
  else
    render_backward_kernel<0><<<tiles, BLOCK, 0, stream>>>(
        cam, ranges, point_ids, xy, conic_opacity, colors, depth, bg, final_T, n_contrib, tile_last, grad_color,
        grad_depth, nullptr, ImageGrad{nullptr, 0, 0, 0}, 0, n_gauss, raster_grads);
  check_launch("render_backward");
}

void render_backward_values(const Camera& cam, const int2* ranges, const int32_t* point_ids, const float2* xy,
                            const float4* conic_opacity, const int32_t* n_contrib, const int32_t* tile_last,
                            ImageGrad grad_image, int channels, float* grad_values, cudaStream_t stream) {
  // above 48 KB of shared memory a kernel must opt in (per device, so on every call)
  cudaFuncSetAttribute(render_backward_values_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       static_cast<int>(VALUES_SMEM));
  const dim3 grid(cam.grid_x * cam.grid_y, (channels + CHB - 1) / CHB);
  render_backward_values_kernel<<<grid, BLOCK, VALUES_SMEM, stream>>>(
      cam, ranges, point_ids, xy, conic_opacity, n_contrib, tile_last, grad_image, channels, grad_values);
  check_launch("render_backward_values");
}

}  // namespace dgr
