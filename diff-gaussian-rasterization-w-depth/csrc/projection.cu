// Projection of Gaussians to the screen (EWA splatting) and its backward pass: one thread per Gaussian.
//
// The forward pass rounds every step as the PyTorch reference does on the GPU (explicit _rn
// intrinsics, so the compiler fuses nothing; matrix products summed in the order cuBLAS sums them),
// because the radius is a ceil() and the tile rectangle a trunc(): a different last bit would
// change which tiles a Gaussian touches. The backward pass has no such cliff and uses plain floats.
#include "rasterizer.h"

namespace dgr {
namespace {

constexpr int THREADS = 256;

// Inner product of length 3 and 4 in cuBLAS's order for these tiny products: the first product
// rounded, then one fused multiply-add per further term.
__device__ __forceinline__ float dot3(float a0, float b0, float a1, float b1, float a2, float b2) {
  return __fmaf_rn(a2, b2, __fmaf_rn(a1, b1, __fmul_rn(a0, b0)));
}

__device__ __forceinline__ float dot4(float a0, float b0, float a1, float b1, float a2, float b2,
                                      float a3, float b3) {
  return __fmaf_rn(a3, b3, dot3(a0, b0, a1, b1, a2, b2));
}

// Rotation matrix of a unit quaternion (w, x, y, z), element by element as the reference.
__device__ __forceinline__ void quat_to_rotmat(float w, float x, float y, float z, float R[3][3]) {
  R[0][0] = __fsub_rn(1.f, 2.f * __fadd_rn(__fmul_rn(y, y), __fmul_rn(z, z)));
  R[0][1] = 2.f * __fsub_rn(__fmul_rn(x, y), __fmul_rn(w, z));
  R[0][2] = 2.f * __fadd_rn(__fmul_rn(x, z), __fmul_rn(w, y));
  R[1][0] = 2.f * __fadd_rn(__fmul_rn(x, y), __fmul_rn(w, z));
  R[1][1] = __fsub_rn(1.f, 2.f * __fadd_rn(__fmul_rn(x, x), __fmul_rn(z, z)));
  R[1][2] = 2.f * __fsub_rn(__fmul_rn(y, z), __fmul_rn(w, x));
  R[2][0] = 2.f * __fsub_rn(__fmul_rn(x, z), __fmul_rn(w, y));
  R[2][1] = 2.f * __fadd_rn(__fmul_rn(y, z), __fmul_rn(w, x));
  R[2][2] = __fsub_rn(1.f, 2.f * __fadd_rn(__fmul_rn(x, x), __fmul_rn(y, y)));
}

// Quaternion norm as torch's reduction computes it for a row of four: one square per lane, then a
// warp shuffle with decreasing offsets, (w^2 + y^2) + (x^2 + z^2).
__device__ __forceinline__ float quat_norm(float w, float x, float y, float z) {
  return __fsqrt_rn(__fadd_rn(__fadd_rn(__fmul_rn(w, w), __fmul_rn(y, y)),
                              __fadd_rn(__fmul_rn(x, x), __fmul_rn(z, z))));
}

// World covariance [3][3] of Gaussian i from scales + rotations (w, x, y, z) or from
// cov3D_precomp (xx, xy, xz, yy, yz, zz).
__device__ __forceinline__ void covariance_3d(int i, const float* scales, const float* rotations,
                                              const float* cov6, float mod, float S[3][3]) {
  if (cov6 != nullptr) {
    const float* c = cov6 + 6 * i;
    S[0][0] = c[0]; S[0][1] = c[1]; S[0][2] = c[2];
    S[1][0] = c[1]; S[1][1] = c[3]; S[1][2] = c[4];
    S[2][0] = c[2]; S[2][1] = c[4]; S[2][2] = c[5];
    return;
  }
  const float4 q = reinterpret_cast<const float4*>(rotations)[i];
  const float nrm = quat_norm(q.x, q.y, q.z, q.w);
  float R[3][3];
  quat_to_rotmat(__fdiv_rn(q.x, nrm), __fdiv_rn(q.y, nrm), __fdiv_rn(q.z, nrm), __fdiv_rn(q.w, nrm), R);
  float Mp[3][3];
  for (int j = 0; j < 3; ++j) {
    const float s = __fmul_rn(scales[3 * i + j], mod);
    for (int k = 0; k < 3; ++k) Mp[k][j] = __fmul_rn(R[k][j], s);
  }
  for (int k = 0; k < 3; ++k)
    for (int l = 0; l < 3; ++l)
      S[k][l] = dot3(Mp[k][0], Mp[l][0], Mp[k][1], Mp[l][1], Mp[k][2], Mp[l][2]);
}

// Projects Gaussian i and returns the number of tiles it can blend in.
__device__ __forceinline__ int project_gaussian(
    int i, const float* __restrict__ means3D, const float* __restrict__ means2D, const float* __restrict__ opacities,
    const float* __restrict__ scales, const float* __restrict__ rotations, const float* __restrict__ cov6, float mod,
    const Camera& cam, float2* __restrict__ xy, float* __restrict__ depth, float4* __restrict__ conic_opacity,
    int32_t* __restrict__ radii, const WorkPointers& work, uint32_t& depth_key) {
  float V[4][4], P[4][4];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) {
      V[r][c] = cam.view.at(r, c);
      P[r][c] = cam.proj.at(r, c);
    }
  const float p0 = means3D[3 * i], p1 = means3D[3 * i + 1], p2 = means3D[3 * i + 2];
  float pv[3];
  for (int k = 0; k < 3; ++k) pv[k] = dot4(p0, V[0][k], p1, V[1][k], p2, V[2][k], 1.f, V[3][k]);
  const float pp0 = dot4(p0, P[0][0], p1, P[1][0], p2, P[2][0], 1.f, P[3][0]);
  const float pp1 = dot4(p0, P[0][1], p1, P[1][1], p2, P[2][1], 1.f, P[3][1]);
  const float pp3 = dot4(p0, P[0][3], p1, P[1][3], p2, P[2][3], 1.f, P[3][3]);
  const float w = __fadd_rn(pp3, 1e-7f);
  const float ndc_x = __fadd_rn(__fdiv_rn(pp0, w), means2D[3 * i]);
  const float ndc_y = __fadd_rn(__fdiv_rn(pp1, w), means2D[3 * i + 1]);
  const float px = __fmul_rn(__fsub_rn(__fmul_rn(__fadd_rn(ndc_x, 1.f), static_cast<float>(cam.width)), 1.f), 0.5f);
  const float py = __fmul_rn(__fsub_rn(__fmul_rn(__fadd_rn(ndc_y, 1.f), static_cast<float>(cam.height)), 1.f), 0.5f);
  const float z = pv[2];
  bool visible = z > NEAR_Z;
  const float zs = visible ? z : 1.f;

  // Jacobian of the perspective map, x/z and y/z clamped to 1.3 tan(fov / 2)
  const float rz = __frcp_rn(zs);
  const float J00 = __fmul_rn(rz, cam.focal_x), J11 = __fmul_rn(rz, cam.focal_y);
  const float tx = __fmul_rn(clamp_nan(__fdiv_rn(pv[0], zs), -cam.lim_x, cam.lim_x), zs);
  const float ty = __fmul_rn(clamp_nan(__fdiv_rn(pv[1], zs), -cam.lim_y, cam.lim_y), zs);
  const float z2 = __fmul_rn(zs, zs);
  const float J02 = __fdiv_rn(__fmul_rn(tx, -cam.focal_x), z2);
  const float J12 = __fdiv_rn(__fmul_rn(ty, -cam.focal_y), z2);
  // M = J R with R[k][j] = V[j][k]; J01 = J10 = 0 still take part in the sums, as in cuBLAS
  float M[2][3];
  for (int j = 0; j < 3; ++j) {
    M[0][j] = dot3(J00, V[j][0], 0.f, V[j][1], J02, V[j][2]);
    M[1][j] = dot3(0.f, V[j][0], J11, V[j][1], J12, V[j][2]);
  }
  float S[3][3];
  covariance_3d(i, scales, rotations, cov6, mod, S);
  float T[2][3];  // M S
  for (int r = 0; r < 2; ++r)
    for (int c = 0; c < 3; ++c) T[r][c] = dot3(M[r][0], S[0][c], M[r][1], S[1][c], M[r][2], S[2][c]);
  const float a = __fadd_rn(dot3(T[0][0], M[0][0], T[0][1], M[0][1], T[0][2], M[0][2]), DILATION);
  const float b = dot3(T[0][0], M[1][0], T[0][1], M[1][1], T[0][2], M[1][2]);
  const float c = __fadd_rn(dot3(T[1][0], M[1][0], T[1][1], M[1][1], T[1][2], M[1][2]), DILATION);
  const float det = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, b));
  visible = visible && det != 0.f;
  const float det_safe = visible ? det : 1.f;
  const float mid = __fmul_rn(0.5f, __fadd_rn(a, c));
  const float disc = __fsub_rn(__fmul_rn(mid, mid), det);
  const float lam = __fadd_rn(mid, __fsqrt_rn(disc < 0.1f ? 0.1f : disc));
  const float radius = ceilf(__fmul_rn(3.f, __fsqrt_rn(lam < 0.f ? 0.f : lam)));
  int x0, y0, x1, y1;
  visible = tile_rect(px, py, radius, cam.grid_x, cam.grid_y, x0, y0, x1, y1) && visible;

  const float2 mean = make_float2(px, py);
  const float4 co = make_float4(__fdiv_rn(c, det_safe), __fdiv_rn(-b, det_safe), __fdiv_rn(a, det_safe), opacities[i]);
  int touched = 0;
  if (visible) {
    const Footprint f = make_footprint(mean, co, x0, y0, x1, y1);
    for (int ty = f.y0; ty < f.y1; ++ty)
      for (int tx = f.x0; tx < f.x1; ++tx) touched += tile_hit(f, tx, ty, cam.width, cam.height);
  }
  xy[i] = mean;
  depth[i] = z;
  conic_opacity[i] = co;
  radii[i] = visible ? static_cast<int32_t>(radius) : 0;
  work.tiles_touched[i] = touched;
  // view z > 0.2 > 0, so its bits order like the floats; hidden Gaussians sort last
  depth_key = visible ? __float_as_uint(z) : 0xFFFFFFFFu;
  work.depth_keys[i] = depth_key;
  work.order[i] = i;
  return touched;
}

// One thread per Gaussian. Per block, the tile counts are summed into work.entry_count and the
// depth keys' digits counted into work.depth_histogram (for binning's sort), one atomic add per
// block and nonzero value.
__global__ void __launch_bounds__(THREADS)
project_forward_kernel(int n, const float* __restrict__ means3D, const float* __restrict__ means2D,
                       const float* __restrict__ opacities, const float* __restrict__ scales,
                       const float* __restrict__ rotations, const float* __restrict__ cov6,
                       float mod, Camera cam, float2* __restrict__ xy, float* __restrict__ depth,
                       float4* __restrict__ conic_opacity, int32_t* __restrict__ radii, WorkPointers work) {
  __shared__ int block_count;
  __shared__ uint32_t s_hist[DEPTH_PASSES][RADIX];
  for (int k = threadIdx.x; k < DEPTH_PASSES * RADIX; k += THREADS) s_hist[k / RADIX][k % RADIX] = 0;
  if (threadIdx.x == 0) block_count = 0;
  __syncthreads();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  uint32_t key = 0;
  const int touched = i < n ? project_gaussian(i, means3D, means2D, opacities, scales, rotations, cov6, mod, cam, xy,
                                               depth, conic_opacity, radii, work, key)
                            : 0;
  const int lane = threadIdx.x % 32;
  const int warp_count = __reduce_add_sync(0xFFFFFFFFu, touched);
  if (lane == 0 && warp_count > 0) atomicAdd(&block_count, warp_count);
  for (int p = 0; p < DEPTH_PASSES; ++p) {  // one shared add per distinct digit of a warp
    const uint32_t digit = i < n ? (key >> (8 * p)) % RADIX : RADIX;
    const unsigned peers = __match_any_sync(0xFFFFFFFFu, digit);
    if (digit < RADIX && lane == __ffs(peers) - 1) atomicAdd(&s_hist[p][digit], __popc(peers));
  }
  __syncthreads();
  for (int k = threadIdx.x; k < DEPTH_PASSES * RADIX; k += THREADS)
    if (s_hist[k / RADIX][k % RADIX] > 0) atomicAdd(work.depth_histogram + k, s_hist[k / RADIX][k % RADIX]);
  if (threadIdx.x == 0 && block_count > 0)
    atomicAdd(reinterpret_cast<unsigned long long*>(work.entry_count), static_cast<unsigned long long>(block_count));
}

__global__ void __launch_bounds__(THREADS)
project_backward_kernel(int n, const float* __restrict__ means3D, const float* __restrict__ scales,
                        const float* __restrict__ rotations, const float* __restrict__ cov6, float mod,
                        Camera cam, const int32_t* __restrict__ radii, const float* __restrict__ raster_grads,
                        GeometryGrads out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float rg[RASTER_GRADS];
  for (int k = 0; k < RASTER_GRADS; ++k) rg[k] = raster_grads[static_cast<int64_t>(k) * n + i];
  if (out.opacities) out.opacities[i] = rg[G_OPACITY];
  if (out.colors)
    for (int k = 0; k < 3; ++k) out.colors[3 * i + k] = rg[G_R + k];
  if (radii[i] <= 0) {  // never rendered: no gradient (every output element is still written)
    for (int k = 0; k < 3; ++k) {
      if (out.means3D) out.means3D[3 * i + k] = 0.f;
      if (out.means2D) out.means2D[3 * i + k] = 0.f;
      if (out.scales) out.scales[3 * i + k] = 0.f;
    }
    if (out.rotations) reinterpret_cast<float4*>(out.rotations)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (out.cov3D_precomp)
      for (int k = 0; k < 6; ++k) out.cov3D_precomp[6 * i + k] = 0.f;
    return;
  }
  float V[4][4], P[4][4];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) {
      V[r][c] = cam.view.at(r, c);
      P[r][c] = cam.proj.at(r, c);
    }
  const float p[3] = {means3D[3 * i], means3D[3 * i + 1], means3D[3 * i + 2]};
  float pv[3], pp[4];
  for (int k = 0; k < 3; ++k) pv[k] = p[0] * V[0][k] + p[1] * V[1][k] + p[2] * V[2][k] + V[3][k];
  for (int k = 0; k < 4; ++k) pp[k] = p[0] * P[0][k] + p[1] * P[1][k] + p[2] * P[2][k] + P[3][k];

  // screen position: xy = ((ndc + 1) size - 1) / 2, ndc = pp.xy / (pp.w + 1e-7) + means2D.xy
  const float g_ndc_x = rg[G_X] * 0.5f * cam.width;
  const float g_ndc_y = rg[G_Y] * 0.5f * cam.height;
  if (out.means2D) {
    out.means2D[3 * i] = g_ndc_x;
    out.means2D[3 * i + 1] = g_ndc_y;
    out.means2D[3 * i + 2] = 0.f;
  }
  const float inv_w = 1.f / (pp[3] + 1e-7f);
  float g_pp[4] = {g_ndc_x * inv_w, g_ndc_y * inv_w, 0.f,
                   -(g_ndc_x * pp[0] + g_ndc_y * pp[1]) * inv_w * inv_w};

  // Jacobian (visible, so z > 0.2)
  const float z = pv[2], rz = 1.f / z, rz2 = rz * rz, rz3 = rz2 * rz;
  const float ux = pv[0] * rz, uy = pv[1] * rz;
  const bool free_x = ux >= -cam.lim_x && ux <= cam.lim_x, free_y = uy >= -cam.lim_y && uy <= cam.lim_y;
  const float tx = (free_x ? ux : fminf(fmaxf(ux, -cam.lim_x), cam.lim_x)) * z;
  const float ty = (free_y ? uy : fminf(fmaxf(uy, -cam.lim_y), cam.lim_y)) * z;
  const float J00 = cam.focal_x * rz, J11 = cam.focal_y * rz;
  const float J02 = -cam.focal_x * tx * rz2, J12 = -cam.focal_y * ty * rz2;
  float M[2][3];
  for (int j = 0; j < 3; ++j) {
    M[0][j] = J00 * V[j][0] + J02 * V[j][2];
    M[1][j] = J11 * V[j][1] + J12 * V[j][2];
  }
  float S[3][3];
  covariance_3d(i, scales, rotations, cov6, mod, S);
  float SM[2][3];  // S M_r^T for each row r of M
  for (int r = 0; r < 2; ++r)
    for (int k = 0; k < 3; ++k) SM[r][k] = S[k][0] * M[r][0] + S[k][1] * M[r][1] + S[k][2] * M[r][2];
  const float a = M[0][0] * SM[0][0] + M[0][1] * SM[0][1] + M[0][2] * SM[0][2] + DILATION;
  const float b = M[0][0] * SM[1][0] + M[0][1] * SM[1][1] + M[0][2] * SM[1][2];
  const float c = M[1][0] * SM[1][0] + M[1][1] * SM[1][1] + M[1][2] * SM[1][2] + DILATION;

  // conic = (c, -b, a) / det with det = a c - b^2
  const float det = a * c - b * b, inv_det2 = 1.f / (det * det);
  const float gc0 = rg[G_CONIC_A], gc1 = rg[G_CONIC_B], gc2 = rg[G_CONIC_C];
  const float ga = (-c * c * gc0 + b * c * gc1 - b * b * gc2) * inv_det2;
  const float gb = (2.f * b * c * gc0 - (a * c + b * b) * gc1 + 2.f * a * b * gc2) * inv_det2;
  const float gcc = (-b * b * gc0 + a * b * gc1 - a * a * gc2) * inv_det2;

  // cov2D = M S M^T with a = [0,0], b = [0,1], c = [1,1]: gradients of M and of S
  float gM[2][3];
  for (int k = 0; k < 3; ++k) {
    gM[0][k] = 2.f * ga * SM[0][k] + gb * SM[1][k];
    gM[1][k] = 2.f * gcc * SM[1][k] + gb * SM[0][k];
  }
  // M = J R: dL/dJ_ik = sum_j dL/dM_ij V[j][k]
  float gJ00 = 0.f, gJ02 = 0.f, gJ11 = 0.f, gJ12 = 0.f;
  for (int j = 0; j < 3; ++j) {
    gJ00 += gM[0][j] * V[j][0];
    gJ02 += gM[0][j] * V[j][2];
    gJ11 += gM[1][j] * V[j][1];
    gJ12 += gM[1][j] * V[j][2];
  }
  float g_view[3] = {0.f, 0.f, rg[G_DEPTH]};
  g_view[2] += -cam.focal_x * rz2 * gJ00 - cam.focal_y * rz2 * gJ11
               + 2.f * cam.focal_x * tx * rz3 * gJ02 + 2.f * cam.focal_y * ty * rz3 * gJ12;
  const float g_tx = -cam.focal_x * rz2 * gJ02, g_ty = -cam.focal_y * rz2 * gJ12;
  // t = clamp(u / z) z: inside the clamp dt/du = 1 (dt/dz cancels), outside dt/dz = the bound
  if (free_x) g_view[0] += g_tx; else g_view[2] += g_tx * (ux > 0.f ? cam.lim_x : -cam.lim_x);
  if (free_y) g_view[1] += g_ty; else g_view[2] += g_ty * (uy > 0.f ? cam.lim_y : -cam.lim_y);

  if (out.means3D)
    for (int j = 0; j < 3; ++j)
      out.means3D[3 * i + j] =
          g_view[0] * V[j][0] + g_view[1] * V[j][1] + g_view[2] * V[j][2] +
          g_pp[0] * P[j][0] + g_pp[1] * P[j][1] + g_pp[3] * P[j][3];

  // dL/dS_kl = ga M0k M0l + gb M0k M1l + gc M1k M1l (b reads the [0, 1] entry only)
  float G[3][3];
  for (int k = 0; k < 3; ++k)
    for (int l = 0; l < 3; ++l)
      G[k][l] = ga * M[0][k] * M[0][l] + gb * M[0][k] * M[1][l] + gcc * M[1][k] * M[1][l];
  if (out.cov3D_precomp) {
    float* g6 = out.cov3D_precomp + 6 * i;
    g6[0] = G[0][0]; g6[1] = G[0][1] + G[1][0]; g6[2] = G[0][2] + G[2][0];
    g6[3] = G[1][1]; g6[4] = G[1][2] + G[2][1]; g6[5] = G[2][2];
  }
  if (out.scales == nullptr && out.rotations == nullptr) return;

  // S = M' M'^T with M' = R(q / |q|) diag(s mod): dL/dM' = (G + G^T) M'
  const float4 q = reinterpret_cast<const float4*>(rotations)[i];
  const float inv_n = rsqrtf(q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w);
  const float qw = q.x * inv_n, qx = q.y * inv_n, qy = q.z * inv_n, qz = q.w * inv_n;
  float R[3][3];
  R[0][0] = 1.f - 2.f * (qy * qy + qz * qz); R[0][1] = 2.f * (qx * qy - qw * qz); R[0][2] = 2.f * (qx * qz + qw * qy);
  R[1][0] = 2.f * (qx * qy + qw * qz); R[1][1] = 1.f - 2.f * (qx * qx + qz * qz); R[1][2] = 2.f * (qy * qz - qw * qx);
  R[2][0] = 2.f * (qx * qz - qw * qy); R[2][1] = 2.f * (qy * qz + qw * qx); R[2][2] = 1.f - 2.f * (qx * qx + qy * qy);
  float s[3], Mp[3][3];
  for (int j = 0; j < 3; ++j) {
    s[j] = scales[3 * i + j] * mod;
    for (int k = 0; k < 3; ++k) Mp[k][j] = R[k][j] * s[j];
  }
  float gR[3][3], gs[3] = {0.f, 0.f, 0.f};
  for (int k = 0; k < 3; ++k)
    for (int j = 0; j < 3; ++j) {
      float gMp = 0.f;
      for (int l = 0; l < 3; ++l) gMp += (G[k][l] + G[l][k]) * Mp[l][j];
      gs[j] += gMp * R[k][j];
      gR[k][j] = gMp * s[j];
    }
  if (out.scales)
    for (int j = 0; j < 3; ++j) out.scales[3 * i + j] = gs[j] * mod;
  if (out.rotations) {
    const float gw = 2.f * (-qz * gR[0][1] + qy * gR[0][2] + qz * gR[1][0] - qx * gR[1][2] - qy * gR[2][0] + qx * gR[2][1]);
    const float gx = 2.f * (qy * gR[0][1] + qz * gR[0][2] + qy * gR[1][0] - 2.f * qx * gR[1][1] - qw * gR[1][2]
                            + qz * gR[2][0] + qw * gR[2][1] - 2.f * qx * gR[2][2]);
    const float gy = 2.f * (-2.f * qy * gR[0][0] + qx * gR[0][1] + qw * gR[0][2] + qx * gR[1][0] + qz * gR[1][2]
                            - qw * gR[2][0] + qz * gR[2][1] - 2.f * qy * gR[2][2]);
    const float gz = 2.f * (-2.f * qz * gR[0][0] - qw * gR[0][1] + qx * gR[0][2] + qw * gR[1][0] - 2.f * qz * gR[1][1]
                            + qy * gR[1][2] + qx * gR[2][0] + qy * gR[2][1]);
    // through the normalisation q / |q|
    const float dot = qw * gw + qx * gx + qy * gy + qz * gz;
    reinterpret_cast<float4*>(out.rotations)[i] =
        make_float4((gw - qw * dot) * inv_n, (gx - qx * dot) * inv_n, (gy - qy * dot) * inv_n, (gz - qz * dot) * inv_n);
  }
}

}  // namespace

void project_forward(int n, const float* means3D, const float* means2D, const float* opacities,
                     const float* scales, const float* rotations, const float* cov3D_precomp,
                     float scale_modifier, const Camera& cam, float2* xy, float* depth,
                     float4* conic_opacity, int32_t* radii, WorkPointers work, cudaStream_t stream) {
  if (n == 0) return;
  project_forward_kernel<<<(n + THREADS - 1) / THREADS, THREADS, 0, stream>>>(
      n, means3D, means2D, opacities, scales, rotations, cov3D_precomp, scale_modifier, cam, xy, depth,
      conic_opacity, radii, work);
  check_launch("project_forward");
}

void project_backward(int n, const float* means3D, const float* scales, const float* rotations,
                      const float* cov3D_precomp, float scale_modifier, const Camera& cam,
                      const int32_t* radii, const float* raster_grads, GeometryGrads out, cudaStream_t stream) {
  if (n == 0) return;
  project_backward_kernel<<<(n + THREADS - 1) / THREADS, THREADS, 0, stream>>>(
      n, means3D, scales, rotations, cov3D_precomp, scale_modifier, cam, radii, raster_grads, out);
  check_launch("project_backward");
}

}  // namespace dgr
