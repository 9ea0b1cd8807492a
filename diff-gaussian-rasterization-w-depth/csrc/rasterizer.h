// Shared constants, the camera passed to kernels, the per-fragment arithmetic every kernel uses, and
// the launchers of each kernel family (projection.cu, binning.cu, rasterize_forward.cu,
// rasterize_backward.cu). The specification is diff_gaussian_rasterization/_torch_impl.py.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace at {
class Tensor;  // binning.cu and bindings.cpp include ATen; the kernels need not
}

namespace dgr {

constexpr int TILE = 16;
constexpr int BLOCK = TILE * TILE;  // one thread per pixel of a tile
constexpr float NEAR_Z = 0.2f;
constexpr float ALPHA_MIN = 1.0f / 255.0f;
constexpr float ALPHA_MAX = 0.99f;
constexpr float T_MIN = 1e-4f;
constexpr float DILATION = 0.3f;

// A 4x4 matrix on the device as the caller's tensor holds it (any strides: no copy per render).
struct Matrix4 {
  const float* data;
  int64_t row_stride, col_stride;
#if defined(__CUDACC__)
  __device__ float at(int r, int c) const { return __ldg(data + r * row_stride + c * col_stride); }
#endif
};

// One camera and image. view/proj are the transposed 4x4 matrices (row vectors: p_view = [p, 1] @
// view). The float constants are rounded from the double values the reference computes in
// Python, so both paths multiply by the same float.
struct Camera {
  Matrix4 view, proj;
  float focal_x, focal_y;  // width / (2 tanfovx), height / (2 tanfovy)
  float lim_x, lim_y;      // 1.3 tanfovx, 1.3 tanfovy: the clamp of x/z, y/z in the Jacobian
  int width, height, grid_x, grid_y;
};

#if defined(__CUDACC__)  // device helpers, for the .cu files

// torch.clamp's semantics: NaN compares false both ways and passes through
__device__ __forceinline__ float clamp_nan(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Tile rectangle [x0, x1) x [y0, y1) covered by a Gaussian at pixel (px, py) with radius r, in
// the reference's float operations (truncation toward zero, then clamp; NaN stays NaN and so
// gives an empty rectangle). Returns false when the rectangle is empty or not finite.
__device__ __forceinline__ bool tile_rect(float px, float py, float r, int grid_x, int grid_y,
                                          int& x0, int& y0, int& x1, int& y1) {
  const float gx = static_cast<float>(grid_x), gy = static_cast<float>(grid_y);
  const float t = static_cast<float>(TILE);
  const float fx0 = clamp_nan(truncf(__fdiv_rn(__fsub_rn(px, r), t)), 0.f, gx);
  const float fy0 = clamp_nan(truncf(__fdiv_rn(__fsub_rn(py, r), t)), 0.f, gy);
  const float fx1 = clamp_nan(truncf(__fdiv_rn(__fsub_rn(__fadd_rn(__fadd_rn(px, r), t), 1.f), t)), 0.f, gx);
  const float fy1 = clamp_nan(truncf(__fdiv_rn(__fsub_rn(__fadd_rn(__fadd_rn(py, r), t), 1.f), t)), 0.f, gy);
  const bool ok = __fmul_rn(fx1 - fx0, fy1 - fy0) > 0.f && isfinite(px) && isfinite(py);
  x0 = ok ? static_cast<int>(fx0) : 0;
  y0 = ok ? static_cast<int>(fy0) : 0;
  x1 = ok ? static_cast<int>(fx1) : 0;
  y1 = ok ? static_cast<int>(fy1) : 0;
  return ok;
}

// Where a Gaussian can blend at all. alpha >= 1/255 needs q(d) = a dx^2 + 2 b dx dy + c dy^2 =
// -2 power <= s = 2 ln(255 opacity), an ellipse usually well inside the 3-sigma square the radius
// gives; tiles of the rectangle that the ellipse misses would only add Gaussians that blend nowhere
// in them (about 40% of the tile entries of the benchmark scene), so binning leaves them out.
// s is widened by 1% + 0.01, far more than float rounding of the power moves the boundary, so the
// fragments that blend are exactly the reference's. Every operation is an _rn intrinsic: the
// projection counts the tiles and the binning lists them with this same code, and the two must
// agree bit for bit.
struct Footprint {
  float mx, my;           // mean in pixels
  float a, b, c;          // conic
  float inv_a, inv_c;
  float s;                // widened 2 ln(255 opacity); NaN or negative: blends nowhere
  bool ellipse;           // conic positive definite; otherwise every tile of the rectangle is kept
  int x0, y0, x1, y1;     // tiles to test: the radius' rectangle clipped to the ellipse's bounding box
};

__device__ __forceinline__ Footprint make_footprint(float2 mean, float4 co, int x0, int y0, int x1, int y1) {
  Footprint f;
  f.mx = mean.x;
  f.my = mean.y;
  f.a = co.x;
  f.b = co.y;
  f.c = co.z;
  f.inv_a = __frcp_rn(co.x);
  f.inv_c = __frcp_rn(co.z);
  f.s = __fadd_rn(__fmul_rn(__fmul_rn(2.f, logf(__fmul_rn(255.f, co.w))), 1.01f), 0.01f);
  const float det = __fsub_rn(__fmul_rn(co.x, co.z), __fmul_rn(co.y, co.y));
  f.ellipse = co.x > 0.f && co.z > 0.f && det > 0.f;
  f.x0 = x0; f.y0 = y0; f.x1 = x1; f.y1 = y1;
  if (f.ellipse && f.s >= 0.f) {
    // half extents sqrt(s c / det), sqrt(s a / det), one pixel more for rounding
    const float inv_det = __frcp_rn(det);
    const float hx = __fadd_rn(__fsqrt_rn(__fmul_rn(__fmul_rn(f.s, co.z), inv_det)), 1.f);
    const float hy = __fadd_rn(__fsqrt_rn(__fmul_rn(__fmul_rn(f.s, co.x), inv_det)), 1.f);
    // tile of a pixel coordinate, clamped to the rectangle first so that the cast stays in range
    auto tile_of = [](float v, int lo, int hi) {
      return static_cast<int>(fminf(fmaxf(floorf(__fdiv_rn(v, static_cast<float>(TILE))), lo - 1.f), hi + 1.f));
    };
    f.x0 = max(x0, tile_of(__fsub_rn(mean.x, hx), x0, x1));
    f.x1 = min(x1, tile_of(__fadd_rn(mean.x, hx), x0, x1) + 1);
    f.y0 = max(y0, tile_of(__fsub_rn(mean.y, hy), y0, y1));
    f.y1 = min(y1, tile_of(__fadd_rn(mean.y, hy), y0, y1) + 1);
  }
  return f;
}

// min over t in [lo, hi] of a u^2 + 2 b u t + c t^2 (c > 0, inv_c = 1 / c), u fixed: one edge of a
// rectangle
__device__ __forceinline__ float edge_min(float a, float b, float c, float inv_c, float u, float lo, float hi) {
  const float t = fminf(fmaxf(-__fmul_rn(__fmul_rn(b, u), inv_c), lo), hi);
  return __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(a, u), u), __fmul_rn(2.f, __fmul_rn(__fmul_rn(b, u), t))),
                   __fmul_rn(__fmul_rn(c, t), t));
}

// Whether the ellipse q <= s meets the pixel centres of tile (tx, ty) inside the image.
__device__ __forceinline__ bool tile_hit(const Footprint& f, int tx, int ty, int width, int height) {
  if (!(f.s >= 0.f)) return false;
  if (!f.ellipse) return true;
  const float x0 = __fsub_rn(static_cast<float>(tx * TILE), f.mx);
  const float x1 = __fsub_rn(static_cast<float>(min(tx * TILE + TILE - 1, width - 1)), f.mx);
  const float y0 = __fsub_rn(static_cast<float>(ty * TILE), f.my);
  const float y1 = __fsub_rn(static_cast<float>(min(ty * TILE + TILE - 1, height - 1)), f.my);
  if (x0 <= 0.f && x1 >= 0.f && y0 <= 0.f && y1 >= 0.f) return true;  // the mean is in the tile
  // a convex q is smallest on the boundary of a rectangle that does not hold its minimum
  const float q = fminf(fminf(edge_min(f.a, f.b, f.c, f.inv_c, x0, y0, y1), edge_min(f.a, f.b, f.c, f.inv_c, x1, y0, y1)),
                        fminf(edge_min(f.c, f.b, f.a, f.inv_a, y0, x0, x1), edge_min(f.c, f.b, f.a, f.inv_a, y1, x0, x1)));
  return q <= f.s;
}

// A fragment: the Gaussian (mean xy in pixels, co = conic a, b, c and opacity) at pixel (col, row).
// Rounded step by step like the reference (no fused multiply-adds), and the one definition every
// kernel uses, so forward, feature and backward passes agree bit for bit on which fragments blend.
struct Fragment {
  float dx, dy;       // mean - pixel
  float e;            // exp(power)
  float alpha_raw;    // opacity * exp(power)
  float alpha;        // min(0.99, alpha_raw)
};

__device__ __forceinline__ bool eval_fragment(float2 mean, float4 co, float col, float row, Fragment& f) {
  f.dx = __fsub_rn(mean.x, col);
  f.dy = __fsub_rn(mean.y, row);
  const float q = __fadd_rn(__fmul_rn(__fmul_rn(co.x, f.dx), f.dx), __fmul_rn(__fmul_rn(co.z, f.dy), f.dy));
  const float power = __fsub_rn(__fmul_rn(-0.5f, q), __fmul_rn(__fmul_rn(co.y, f.dx), f.dy));
  f.e = __expf(power);
  f.alpha_raw = __fmul_rn(co.w, f.e);
  f.alpha = fminf(ALPHA_MAX, f.alpha_raw);
  return power <= 0.f && f.alpha >= ALPHA_MIN;
}

// Transmittance after a fragment; shared so every pass walks the same T.
__device__ __forceinline__ float next_transmittance(float T, float alpha) {
  return __fmul_rn(T, __fsub_rn(1.f, alpha));
}

// Where a thread of the passes after the colour forward (feature forward, both backwards) starts:
// its pixel of the block's tile (one block per tile, one thread per pixel) and, of the tile's
// entries in point_ids, where they start, how many any pixel of the tile blends (tile_last) and
// how many this pixel blends (n_contrib; both written by the colour forward).
struct TilePixel {
  int px, py, pix;         // column, row and index in an [H, W] image
  bool inside;             // false for the threads of a border tile that lie beyond the image
  float col, row;          // px, py as eval_fragment takes them
  int start, count, mine;  // first entry, entries walked by the tile, by this pixel
};

__device__ __forceinline__ TilePixel tile_pixel(const Camera& cam, const int2* __restrict__ ranges,
                                                const int32_t* __restrict__ n_contrib,
                                                const int32_t* __restrict__ tile_last) {
  const int tile = blockIdx.x;
  TilePixel p;
  p.px = (tile % cam.grid_x) * TILE + threadIdx.x % TILE;
  p.py = (tile / cam.grid_x) * TILE + threadIdx.x / TILE;
  p.inside = p.px < cam.width && p.py < cam.height;
  p.pix = p.py * cam.width + p.px;
  p.col = static_cast<float>(p.px);
  p.row = static_cast<float>(p.py);
  p.start = ranges[tile].x;
  p.count = tile_last[tile];
  p.mine = p.inside ? n_contrib[p.pix] : 0;
  return p;
}

#endif  // __CUDACC__

// ---- projection.cu
// Besides the projected Gaussians, the inputs of binning (see WorkPointers): each Gaussian's tile
// count, depth key and index, the total tile count and the depth keys' digit histograms.
struct WorkPointers {
  int32_t* tiles_touched;     // [N]
  uint32_t* depth_keys;       // [N] float bits of the view depth; 0xFFFFFFFF for hidden Gaussians
  int32_t* order;             // [N] 0, 1, ..., N - 1
  int64_t* entry_count;       // sum of tiles_touched (zero on entry)
  uint32_t* depth_histogram;  // [DEPTH_PASSES][RADIX] digit counts of depth_keys (zero on entry)
};

void project_forward(int n, const float* means3D, const float* means2D, const float* opacities,
                     const float* scales, const float* rotations, const float* cov3D_precomp,
                     float scale_modifier, const Camera& cam, float2* xy, float* depth,
                     float4* conic_opacity, int32_t* radii, WorkPointers work, cudaStream_t stream);

// Per-Gaussian sums of the blending gradients (render_backward), [RASTER_GRADS, N], value-major:
// screen position in pixels, conic, the composited depth value, opacity, colour. (Value-major keeps
// the atomic adds of one Gaussian's ten values in ten different memory sectors.)
enum RasterGrad { G_X, G_Y, G_CONIC_A, G_CONIC_B, G_CONIC_C, G_DEPTH, G_OPACITY, G_R, G_G, G_B, RASTER_GRADS };

struct GeometryGrads {  // outputs of project_backward; null where not wanted
  float* means3D;       // [N, 3]
  float* means2D;       // [N, 3]
  float* opacities;     // [N, 1]
  float* colors;        // [N, 3]
  float* scales;        // [N, 3]
  float* rotations;     // [N, 4]
  float* cov3D_precomp; // [N, 6]
};

void project_backward(int n, const float* means3D, const float* scales, const float* rotations,
                      const float* cov3D_precomp, float scale_modifier, const Camera& cam,
                      const int32_t* radii, const float* raster_grads, GeometryGrads out, cudaStream_t stream);

// ---- binning.cu
// Binning sorts with 8-bit digits: RADIX bins per pass, DEPTH_PASSES for the 32-bit depth keys.
constexpr int RADIX = 256;
constexpr int DEPTH_PASSES = 4;

// The forward pass's work buffer for N Gaussians (int32): allocated before the projection with the
// parts that must start at zero zeroed (one memset), and where project_forward writes in it.
at::Tensor binning_work(int64_t n, const at::Tensor& like, cudaStream_t stream);
WorkPointers work_pointers(const at::Tensor& work, int64_t n);

// Gaussians of each tile, front to back: point_ids [M] int32 (Gaussian index per tile entry) and
// ranges [tiles, 2] int32 (start, end) into it. work (above, after project_forward) is taken over
// and freed early (pass it with std::move).
void bin_gaussians(int n, const Camera& cam, const at::Tensor& xy, const at::Tensor& conic_opacity,
                   const at::Tensor& radii, at::Tensor work, at::Tensor& point_ids, at::Tensor& ranges);

// ---- rasterize_forward.cu
void render_forward(const Camera& cam, const int2* ranges, const int32_t* point_ids,
                    const float2* xy, const float4* conic_opacity, const float* colors,
                    const float* depth, const float* bg, float* out_color, float* out_depth,
                    float* final_T, int32_t* n_contrib, int32_t* tile_last, cudaStream_t stream);

void render_features(const Camera& cam, const int2* ranges, const int32_t* point_ids,
                     const float2* xy, const float4* conic_opacity, const float* features, int channels,
                     const int32_t* n_contrib, const int32_t* tile_last, float* out_features,
                     cudaStream_t stream);

// ---- rasterize_backward.cu
// The gradient of an output image [C, H, W] as autograd hands it over, any strides (the gradient of
// a sum is one value broadcast, stride 0): element (c, y, x) at data[c * sc + y * sy + x * sx].
// data null: no gradient (zero).
struct ImageGrad {
  const float* data;
  int64_t sc, sy, sx;
  __host__ __device__ float at(int c, int y, int x) const { return data[c * sc + y * sy + x * sx]; }
};

// raster_grads [RASTER_GRADS, N] must be zero on entry.
void render_backward(const Camera& cam, const int2* ranges, const int32_t* point_ids,
                     const float2* xy, const float4* conic_opacity, const float* colors,
                     const float* depth, const float* bg, const float* final_T,
                     const int32_t* n_contrib, const int32_t* tile_last, ImageGrad grad_color,
                     ImageGrad grad_depth, const float* features, ImageGrad grad_features,
                     int channels, int n_gauss, float* raster_grads, cudaStream_t stream);

void render_backward_values(const Camera& cam, const int2* ranges, const int32_t* point_ids,
                            const float2* xy, const float4* conic_opacity, const int32_t* n_contrib,
                            const int32_t* tile_last, ImageGrad grad_image, int channels,
                            float* grad_values, cudaStream_t stream);

void check_launch(const char* what);

}  // namespace dgr
