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

// One camera and image. view/proj point to the transposed 4x4 matrices on the device (row-major,
// row vectors: p_view = [p, 1] @ view). The float constants are rounded from the double values
// the reference computes in Python, so both paths multiply by the same float.
struct Camera {
  const float* view;
  const float* proj;
  float focal_x, focal_y;  // width / (2 tanfovx), height / (2 tanfovy)
  float lim_x, lim_y;      // 1.3 tanfovx, 1.3 tanfovy: the clamp of x/z, y/z in the Jacobian
  int width, height, grid_x, grid_y;
};

#if defined(__CUDACC__)  // device helpers, for the .cu files

// Tile rectangle [x0, x1) x [y0, y1) covered by a Gaussian at pixel (px, py) with radius r, in
// the reference's float operations (truncation toward zero, then clamp; NaN stays NaN and so
// gives an empty rectangle). Returns false when the rectangle is empty or not finite.
__device__ __forceinline__ float clamp_nan(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);  // NaN compares false both ways and passes through
}

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

#endif  // __CUDACC__

// ---- projection.cu
void project_forward(int n, const float* means3D, const float* means2D, const float* opacities,
                     const float* scales, const float* rotations, const float* cov3D_precomp,
                     float scale_modifier, const Camera& cam, float2* xy, float* depth,
                     float4* conic_opacity, int32_t* radii, int32_t* tiles_touched,
                     uint32_t* depth_keys, int32_t* order, cudaStream_t stream);

struct GeometryGrads {  // outputs of project_backward; null where not wanted
  float* means3D;       // [N, 3]
  float* means2D;       // [N, 3]
  float* scales;        // [N, 3]
  float* rotations;     // [N, 4]
  float* cov3D_precomp; // [N, 6]
};

void project_backward(int n, const float* means3D, const float* scales, const float* rotations,
                      const float* cov3D_precomp, float scale_modifier, const Camera& cam,
                      const int32_t* radii, const float* grad_xy, const float* grad_conic,
                      const float* grad_depth, GeometryGrads out, cudaStream_t stream);

// ---- binning.cu
// Gaussians of each tile, front to back: point_ids [M] int32 (Gaussian index per tile entry) and
// ranges [tiles, 2] int32 (start, end) into it.
void bin_gaussians(int n, const Camera& cam, const at::Tensor& xy, const at::Tensor& radii,
                   const at::Tensor& tiles_touched, const at::Tensor& depth_keys,
                   const at::Tensor& order, at::Tensor& point_ids, at::Tensor& ranges);

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
struct RasterGrads {  // per-Gaussian accumulators (zero on entry), see render_backward
  float* xy;       // [N, 2] pixel units
  float* conic;    // [N, 3]
  float* opacity;  // [N]
  float* color;    // [N, 3]
  float* depth;    // [N] the composited value z
};

void render_backward(const Camera& cam, const int2* ranges, const int32_t* point_ids,
                     const float2* xy, const float4* conic_opacity, const float* colors,
                     const float* depth, const float* bg, const float* final_T,
                     const int32_t* n_contrib, const int32_t* tile_last, const float* grad_color,
                     const float* grad_depth, const float* features, const float* grad_features,
                     int channels, RasterGrads out, cudaStream_t stream);

void render_backward_values(const Camera& cam, const int2* ranges, const int32_t* point_ids,
                            const float2* xy, const float4* conic_opacity, const int32_t* n_contrib,
                            const int32_t* tile_last, const float* grad_image, int channels,
                            float* grad_values, cudaStream_t stream);

void check_launch(const char* what);

}  // namespace dgr
