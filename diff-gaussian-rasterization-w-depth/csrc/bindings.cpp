// Python bindings: forward() and backward() of the rasterizer, called by _cuda.py's autograd
// Function. Tensors are checked (float32, CUDA, contiguous), outputs allocated through PyTorch's
// caching allocator, kernels launched on the current stream.
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "rasterizer.h"

namespace dgr {

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "rasterizer kernel ", what, " failed: ", cudaGetErrorString(err));
}

namespace {

using OptTensor = std::optional<at::Tensor>;

void check_input(const at::Tensor& t, const char* name, int64_t n, int64_t width) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  if (n >= 0) TORCH_CHECK(t.dim() == 2 && t.size(0) == n && (width < 0 || t.size(1) == width),
                          name, " has shape ", t.sizes(), ", expected [", n, ", ", width, "]");
}

const float* ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// float4 loads need 16-byte alignment, which a contiguous view into a larger tensor may lack
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

// A [..., 4, 4] matrix (leading dimensions of size 1), read in place with its strides.
Matrix4 matrix4(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat, name, " must be a float32 CUDA tensor");
  TORCH_CHECK(t.dim() >= 2 && t.numel() == 16 && t.size(-1) == 4 && t.size(-2) == 4, name, " has shape ", t.sizes(),
              ", expected [4, 4]");
  return Matrix4{t.data_ptr<float>(), t.stride(-2), t.stride(-1)};
}

Camera make_camera(const at::Tensor& view, const at::Tensor& proj, double tanfovx, double tanfovy,
                   int64_t height, int64_t width) {
  TORCH_CHECK(height > 0 && width > 0, "image size must be positive");
  Camera cam;
  cam.view = matrix4(view, "viewmatrix");
  cam.proj = matrix4(proj, "projmatrix");
  // the reference computes these in double and PyTorch rounds them to float where used
  cam.focal_x = static_cast<float>(width / (2.0 * tanfovx));
  cam.focal_y = static_cast<float>(height / (2.0 * tanfovy));
  cam.lim_x = static_cast<float>(1.3 * tanfovx);
  cam.lim_y = static_cast<float>(1.3 * tanfovy);
  cam.width = static_cast<int>(width);
  cam.height = static_cast<int>(height);
  cam.grid_x = static_cast<int>((width + TILE - 1) / TILE);
  cam.grid_y = static_cast<int>((height + TILE - 1) / TILE);
  return cam;
}

// zeros by a memset (a cheaper launch than at::zeros' fill kernel)
at::Tensor zeros(at::IntArrayRef shape, const at::TensorOptions& options, cudaStream_t stream) {
  at::Tensor t = at::empty(shape, options);
  C10_CUDA_CHECK(cudaMemsetAsync(t.data_ptr(), 0, t.nbytes(), stream));
  return t;
}

at::Tensor output(at::IntArrayRef shape, const at::TensorOptions& options, bool poison) {
  at::Tensor t = at::empty(shape, options);
  if (poison) t.fill_(options.dtype() == at::kFloat ? std::numeric_limits<float>::quiet_NaN() : -1.0);
  return t;
}

// Returns color [3, H, W], radii [N] int32, depth [1, H, W], features [C, H, W] (undefined without
// features) and what backward needs: xy [N, 2], depth of each Gaussian [N], conic_opacity [N, 4],
// point_ids [M], ranges [tiles, 2], final_T [H, W], n_contrib [H, W] int32, tile_last [tiles] int32.
// poison fills every output with NaN (int: -1) first, so a test can see that all are written.
std::vector<at::Tensor> forward(const at::Tensor& means3D, const at::Tensor& means2D, const at::Tensor& opacities,
                                const at::Tensor& colors, const OptTensor& features, const OptTensor& scales,
                                const OptTensor& rotations, const OptTensor& cov3D_precomp, const at::Tensor& bg,
                                double scale_modifier, const at::Tensor& viewmatrix, const at::Tensor& projmatrix,
                                double tanfovx, double tanfovy, int64_t height, int64_t width, bool poison) {
  const c10::cuda::CUDAGuard guard(means3D.device());
  const int64_t n = means3D.size(0);
  check_input(means3D, "means3D", n, 3);
  check_input(means2D, "means2D", n, 3);
  check_input(opacities, "opacities", n, 1);
  check_input(colors, "colors", n, 3);
  check_input(bg, "bg", -1, -1);
  TORCH_CHECK(bg.numel() == 3, "bg must have 3 values");
  TORCH_CHECK(cov3D_precomp.has_value() || (scales.has_value() && rotations.has_value()),
              "give scales and rotations, or cov3D_precomp");
  if (cov3D_precomp.has_value()) check_input(*cov3D_precomp, "cov3D_precomp", n, 6);
  else {
    check_input(*scales, "scales", n, 3);
    check_input(*rotations, "rotations", n, 4);
  }
  int channels = 0;
  if (features.has_value()) {
    check_input(*features, "legs_features", n, -1);
    channels = static_cast<int>(features->size(1));
    TORCH_CHECK(channels >= 1 && channels <= 512, "legs_features has ", channels, " channels; 1 to 512 are supported");
  }
  const at::Tensor rot = rotations.has_value() && !cov3D_precomp.has_value() ? aligned16(*rotations) : at::Tensor();
  const Camera cam = make_camera(viewmatrix, projmatrix, tanfovx, tanfovy, height, width);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = means3D.options();
  const auto i32 = f32.dtype(at::kInt);
  const int tiles = cam.grid_x * cam.grid_y;

  // per Gaussian, one allocation: conic and opacity [n, 4] (16-byte aligned first), xy [n, 2], depth [n]
  at::Tensor projected = at::empty({7 * n}, f32);
  at::Tensor conic_opacity = projected.narrow(0, 0, 4 * n).view({n, 4});
  at::Tensor xy = projected.narrow(0, 4 * n, 2 * n).view({n, 2}), depth = projected.narrow(0, 6 * n, n);
  at::Tensor radii = output({n}, i32, poison);
  at::Tensor work = binning_work(n, means3D, stream);
  project_forward(static_cast<int>(n), means3D.data_ptr<float>(), means2D.data_ptr<float>(), opacities.data_ptr<float>(),
                  scales.has_value() && !cov3D_precomp.has_value() ? scales->data_ptr<float>() : nullptr,
                  rot.defined() ? rot.data_ptr<float>() : nullptr, ptr(cov3D_precomp),
                  static_cast<float>(scale_modifier), cam, reinterpret_cast<float2*>(xy.data_ptr<float>()),
                  depth.data_ptr<float>(), reinterpret_cast<float4*>(conic_opacity.data_ptr<float>()),
                  radii.data_ptr<int32_t>(), work_pointers(work, n), stream);

  // the outputs first: allocating them overlaps with binning's wait for the tile count
  at::Tensor color = output({3, height, width}, f32, poison), out_depth = output({1, height, width}, f32, poison);
  at::Tensor final_T = output({height, width}, f32, poison);
  at::Tensor counts = output({height * width + tiles}, i32, poison);  // n_contrib per pixel, tile_last per tile
  at::Tensor n_contrib = counts.narrow(0, 0, height * width).view({height, width});
  at::Tensor tile_last = counts.narrow(0, height * width, tiles);
  at::Tensor feat;
  if (features.has_value()) feat = output({channels, height, width}, f32, poison);

  at::Tensor point_ids, ranges;
  bin_gaussians(static_cast<int>(n), cam, xy, conic_opacity, radii, std::move(work), point_ids, ranges);

  const auto* rng = reinterpret_cast<const int2*>(ranges.data_ptr<int32_t>());
  const auto* xy2 = reinterpret_cast<const float2*>(xy.data_ptr<float>());
  const auto* co4 = reinterpret_cast<const float4*>(conic_opacity.data_ptr<float>());
  render_forward(cam, rng, point_ids.data_ptr<int32_t>(), xy2, co4, colors.data_ptr<float>(), depth.data_ptr<float>(),
                 bg.data_ptr<float>(), color.data_ptr<float>(), out_depth.data_ptr<float>(), final_T.data_ptr<float>(),
                 n_contrib.data_ptr<int32_t>(), tile_last.data_ptr<int32_t>(), stream);
  if (features.has_value()) {
    render_features(cam, rng, point_ids.data_ptr<int32_t>(), xy2, co4, features->data_ptr<float>(), channels,
                    n_contrib.data_ptr<int32_t>(), tile_last.data_ptr<int32_t>(), feat.data_ptr<float>(), stream);
  }
  return {color, radii, out_depth, feat, xy, depth, conic_opacity, point_ids, ranges, final_T, n_contrib, tile_last};
}

// Gradients [means3D, means2D, opacities, colors, features, scales, rotations, cov3D_precomp], each
// undefined unless asked for: need_geometry (all geometry inputs), need_colors, need_features.
std::vector<at::Tensor> backward(const at::Tensor& means3D, const OptTensor& scales, const OptTensor& rotations,
                                 const OptTensor& cov3D_precomp, const at::Tensor& colors, const OptTensor& features,
                                 const at::Tensor& bg, double scale_modifier, const at::Tensor& viewmatrix,
                                 const at::Tensor& projmatrix, double tanfovx, double tanfovy, int64_t height,
                                 int64_t width, const at::Tensor& radii, const at::Tensor& xy, const at::Tensor& depth,
                                 const at::Tensor& conic_opacity, const at::Tensor& point_ids, const at::Tensor& ranges,
                                 const at::Tensor& final_T, const at::Tensor& n_contrib, const at::Tensor& tile_last,
                                 const OptTensor& grad_color, const OptTensor& grad_depth,
                                 const OptTensor& grad_features, bool need_geometry, bool need_colors,
                                 bool need_features, bool poison) {
  const c10::cuda::CUDAGuard guard(means3D.device());
  const int64_t n = means3D.size(0);
  const int channels = features.has_value() ? static_cast<int>(features->size(1)) : 0;
  auto image_grad = [&](const OptTensor& g, int64_t c) {
    if (!g.has_value()) return ImageGrad{nullptr, 0, 0, 0};
    TORCH_CHECK(g->is_cuda() && g->scalar_type() == at::kFloat && g->dim() == 3 && g->size(0) == c &&
                g->size(1) == height && g->size(2) == width, "image gradient has shape ", g->sizes());
    return ImageGrad{g->data_ptr<float>(), g->stride(0), g->stride(1), g->stride(2)};
  };
  const ImageGrad g_color = image_grad(grad_color, 3), g_depth = image_grad(grad_depth, 1);
  const ImageGrad g_features = image_grad(grad_features, channels);
  const Camera cam = make_camera(viewmatrix, projmatrix, tanfovx, tanfovy, height, width);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = means3D.options();
  const auto* rng = reinterpret_cast<const int2*>(ranges.data_ptr<int32_t>());
  const auto* xy2 = reinterpret_cast<const float2*>(xy.data_ptr<float>());
  const auto* co4 = reinterpret_cast<const float4*>(conic_opacity.data_ptr<float>());
  std::vector<at::Tensor> grads(8);

  if (need_features) {
    grads[4] = zeros({n, channels}, f32, stream);
    if (g_features.data != nullptr)
      render_backward_values(cam, rng, point_ids.data_ptr<int32_t>(), xy2, co4, n_contrib.data_ptr<int32_t>(),
                             tile_last.data_ptr<int32_t>(), g_features, channels, grads[4].data_ptr<float>(), stream);
  }

  if (!need_geometry) {
    if (need_colors) {
      grads[3] = zeros({n, 3}, f32, stream);
      if (g_color.data != nullptr)
        render_backward_values(cam, rng, point_ids.data_ptr<int32_t>(), xy2, co4, n_contrib.data_ptr<int32_t>(),
                               tile_last.data_ptr<int32_t>(), g_color, 3, grads[3].data_ptr<float>(), stream);
    }
    return grads;
  }

  // per-Gaussian sums of the blending gradients, then the chain rule through the projection
  at::Tensor raster_grads = zeros({RASTER_GRADS, n}, f32, stream);
  render_backward(cam, rng, point_ids.data_ptr<int32_t>(), xy2, co4, colors.data_ptr<float>(), depth.data_ptr<float>(),
                  bg.data_ptr<float>(), final_T.data_ptr<float>(), n_contrib.data_ptr<int32_t>(),
                  tile_last.data_ptr<int32_t>(), g_color, g_depth, ptr(features), g_features, channels,
                  static_cast<int>(n), raster_grads.data_ptr<float>(), stream);

  const bool precomp = cov3D_precomp.has_value();
  const at::Tensor rot = !precomp ? aligned16(*rotations) : at::Tensor();
  grads[0] = output({n, 3}, f32, poison);
  grads[1] = output({n, 3}, f32, poison);
  grads[2] = output({n, 1}, f32, poison);
  if (need_colors) grads[3] = output({n, 3}, f32, poison);
  if (precomp) grads[7] = output({n, 6}, f32, poison);
  else {
    grads[5] = output({n, 3}, f32, poison);
    grads[6] = output({n, 4}, f32, poison);
  }
  auto out_ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  const GeometryGrads gg{out_ptr(grads[0]), out_ptr(grads[1]), out_ptr(grads[2]), out_ptr(grads[3]),
                         out_ptr(grads[5]), out_ptr(grads[6]), out_ptr(grads[7])};
  project_backward(static_cast<int>(n), means3D.data_ptr<float>(), precomp ? nullptr : scales->data_ptr<float>(),
                   rot.defined() ? rot.data_ptr<float>() : nullptr, ptr(cov3D_precomp),
                   static_cast<float>(scale_modifier), cam, radii.data_ptr<int32_t>(), raster_grads.data_ptr<float>(),
                   gg, stream);
  return grads;
}

}  // namespace
}  // namespace dgr

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels of the Gaussian rasterizer (see _cuda.py)";
  m.def("forward", &dgr::forward, "render colour, depth and features; returns outputs and saved buffers");
  m.def("backward", &dgr::backward, "gradients of the inputs from the image gradients");
}
