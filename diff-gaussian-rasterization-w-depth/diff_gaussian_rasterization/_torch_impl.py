"""Pure-PyTorch reference rasterizer: the specification the CUDA kernels are held to.

Same function as the CUDA path, differentiable through autograd with respect to every input.
Conventions are those of 3D Gaussian Splatting (Kerbl et al. 2023) as used by Dynamic 3D Gaussians:

- ``viewmatrix`` is the world-to-view 4x4 transposed (row vectors: ``p_view = [p, 1] @ viewmatrix``),
  ``projmatrix`` the full projection transposed the same way; OpenCV axes (+z forward, +y down).
- A Gaussian is culled when its view-space z <= 0.2.
- EWA splatting: ``cov2D = J W cov3D W^T J^T + 0.3 I`` with x/z and y/z clamped to 1.3 tan(fov/2).
- Radius = ceil(3 sqrt(largest eigenvalue)), the screen rectangle is counted in 16x16 tiles and a
  Gaussian only touches pixels of the tiles its rectangle covers.
- Pixel-index coordinates: the projected mean is ``((ndc + 1) * size - 1) / 2``; pixel (col, row)
  is evaluated at (col, row).
- ``alpha = min(0.99, opacity * exp(power))``; fragments with power > 0 or alpha < 1/255 are
  skipped; front-to-back in view-z order; a fragment is dropped (and the pixel finished) when the
  transmittance after it would fall below 1e-4.
- ``image = sum(w_i c_i) + T_final * bg``, ``depth = sum(w_i z_i)`` with ``w_i = alpha_i T_i``.
- ``means2D`` is a zero tensor whose gradient is the gradient with respect to the projected mean
  in NDC units (x, y; the third component gets none), as densification expects.
"""
import math

import torch

TILE = 16
NEAR_Z = 0.2
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4
DILATION = 0.3


def quat_to_rotmat(q):
    """q [N, 4] (w, x, y, z), any norm -> R [N, 3, 3]."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(-1, 3, 3)


def covariance_3d(scales, rotations, scale_modifier=1.0):
    """scales [N, 3], rotations [N, 4] (w, x, y, z) -> cov3D [N, 3, 3] = R S S^T R^T."""
    M = quat_to_rotmat(rotations) * (scales * scale_modifier)[:, None, :]
    return M @ M.transpose(1, 2)


def unpack_cov3d(cov6):
    """cov6 [N, 6] (xx, xy, xz, yy, yz, zz) -> [N, 3, 3] symmetric."""
    xx, xy, xz, yy, yz, zz = cov6.unbind(-1)
    return torch.stack([xx, xy, xz, xy, yy, yz, xz, yz, zz], -1).reshape(-1, 3, 3)


def ndc_to_pixel(v, size):
    return ((v + 1.0) * size - 1.0) * 0.5


def project_gaussians(means3D, means2D, cov3D, viewmatrix, projmatrix, tanfovx, tanfovy, height, width):
    """Project Gaussians to the screen.

    means3D [N, 3] world; means2D [N, 3] zeros (gradient sink, NDC units); cov3D [N, 3, 3] world;
    viewmatrix, projmatrix [4, 4] transposed. Returns
    xy [N, 2] pixel-index coordinates, depth [N] view z, conic [N, 3] (a, b, c of the inverse 2D
    covariance), radii [N] int32 (0 = not rendered), rect [N, 4] int64 tile rectangle
    (x0, y0, x1, y1), half-open.
    """
    ones = torch.ones_like(means3D[:, :1])
    p_hom = torch.cat([means3D, ones], 1)
    p_view = p_hom @ viewmatrix
    p_proj = p_hom @ projmatrix
    p_ndc = p_proj[:, :2] / (p_proj[:, 3:4] + 1e-7) + means2D[:, :2]
    xy = torch.stack([ndc_to_pixel(p_ndc[:, 0], width), ndc_to_pixel(p_ndc[:, 1], height)], -1)
    z = p_view[:, 2]
    visible = z > NEAR_Z
    z_safe = torch.where(visible, z, torch.ones_like(z))

    focal_x = width / (2.0 * tanfovx)
    focal_y = height / (2.0 * tanfovy)
    tx = (p_view[:, 0] / z_safe).clamp(-1.3 * tanfovx, 1.3 * tanfovx) * z_safe
    ty = (p_view[:, 1] / z_safe).clamp(-1.3 * tanfovy, 1.3 * tanfovy) * z_safe
    zeros = torch.zeros_like(z_safe)
    J = torch.stack([
        focal_x / z_safe, zeros, -focal_x * tx / (z_safe * z_safe),
        zeros, focal_y / z_safe, -focal_y * ty / (z_safe * z_safe),
    ], -1).reshape(-1, 2, 3)
    R = viewmatrix[:3, :3].T  # world-to-view rotation
    M = J @ R
    cov2D = M @ cov3D @ M.transpose(1, 2)
    a = cov2D[:, 0, 0] + DILATION
    b = cov2D[:, 0, 1]
    c = cov2D[:, 1, 1] + DILATION
    det = a * c - b * b
    visible = visible & (det != 0)
    det_safe = torch.where(visible, det, torch.ones_like(det))
    conic = torch.stack([c / det_safe, -b / det_safe, a / det_safe], -1)

    with torch.no_grad():
        mid = 0.5 * (a + c)
        lam = mid + torch.sqrt(torch.clamp(mid * mid - det, min=0.1))
        radius = torch.ceil(3.0 * torch.sqrt(lam.clamp(min=0)))
        grid_x = (width + TILE - 1) // TILE
        grid_y = (height + TILE - 1) // TILE
        px, py = xy[:, 0].float(), xy[:, 1].float()
        r = radius.float()
        # C-style truncation toward zero, then clamp to the grid: the original's getRect
        x0 = torch.trunc((px - r) / TILE).clamp(0, grid_x)
        y0 = torch.trunc((py - r) / TILE).clamp(0, grid_y)
        x1 = torch.trunc((px + r + TILE - 1) / TILE).clamp(0, grid_x)
        y1 = torch.trunc((py + r + TILE - 1) / TILE).clamp(0, grid_y)
        rect = torch.stack([x0, y0, x1, y1], -1).long()
        visible = visible & ((x1 - x0) * (y1 - y0) > 0) & torch.isfinite(px) & torch.isfinite(py)
        radii = torch.where(visible, radius, torch.zeros_like(radius)).to(torch.int32)
    return xy, z, conic, radii, rect


def tile_fragments(xy, conic, radii, rect, height, width):
    """Every (pixel, Gaussian) pair inside a covered tile, before any alpha test.

    Returns pixel [F] int64 (row * width + col), gauss [F] int64, dx [F], dy [F] (mean - pixel).
    """
    device = xy.device
    ids = torch.nonzero(radii > 0).squeeze(1)
    x0, y0, x1, y1 = rect[ids].unbind(-1)
    tiles_w = x1 - x0
    counts = tiles_w * (y1 - y0)
    pair_gauss = torch.repeat_interleave(ids, counts)
    local = torch.arange(int(counts.sum()), device=device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts)
    tw = torch.repeat_interleave(tiles_w, counts)
    tile_x = torch.repeat_interleave(x0, counts) + local % tw
    tile_y = torch.repeat_interleave(y0, counts) + local // tw
    offs = torch.arange(TILE, device=device)
    col = (tile_x[:, None, None] * TILE + offs[None, None, :]).expand(-1, TILE, TILE)
    row = (tile_y[:, None, None] * TILE + offs[None, :, None]).expand(-1, TILE, TILE)
    gauss = pair_gauss[:, None, None].expand(-1, TILE, TILE)
    inside = (col < width) & (row < height)
    col, row, gauss = col[inside], row[inside], gauss[inside]
    dx = xy[gauss, 0] - col.to(xy.dtype)
    dy = xy[gauss, 1] - row.to(xy.dtype)
    return row * width + col, gauss, dx, dy


def composite_weights(pixel, gauss, alpha, depth, num_pixels):
    """Front-to-back blending weights of fragments.

    pixel, gauss [F] int64; alpha [F] (already thresholded); depth [N] view z for the sort.
    Returns pixel, gauss, weight [F'] (alpha * transmittance, fragments past the 1e-4 stop
    removed) and final transmittance [num_pixels].
    """
    order = torch.sort(depth.detach()[gauss], stable=True).indices
    order = order[torch.sort(pixel[order], stable=True).indices]
    pixel, gauss, alpha = pixel[order], gauss[order], alpha[order]
    # Segmented cumulative sum of log(1 - alpha), in float64 so that one long global cumsum
    # keeps the precision of a per-pixel product.
    log_keep = torch.log1p(-alpha).double()
    inclusive = torch.cumsum(log_keep, 0)
    _, counts = torch.unique_consecutive(pixel, return_counts=True)
    seg_start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    base = inclusive[seg_start] - log_keep[seg_start]
    log_t_after = inclusive - base
    log_t_before = log_t_after - log_keep
    kept = log_t_after.detach() >= math.log(T_MIN)
    pixel, gauss, alpha = pixel[kept], gauss[kept], alpha[kept]
    weight = alpha * torch.exp(log_t_before[kept]).to(alpha.dtype)
    log_t_final = torch.zeros(num_pixels, dtype=log_keep.dtype, device=alpha.device)
    log_t_final = log_t_final.index_add(0, pixel, log_keep[kept])
    return pixel, gauss, weight, torch.exp(log_t_final).to(alpha.dtype)


def splat(pixel, gauss, weight, values, num_pixels):
    """Sum of weight * values[gauss] per pixel: [num_pixels, C], as a sparse-dense product so the
    memory is O(fragments + pixels * C), not O(fragments * C)."""
    if values.shape[1] <= 4:
        out = torch.zeros(num_pixels, values.shape[1], dtype=values.dtype, device=values.device)
        return out.index_add(0, pixel, weight[:, None] * values[gauss])
    S = torch.sparse_coo_tensor(torch.stack([pixel, gauss]), weight, (num_pixels, values.shape[0]))
    return torch.sparse.mm(S, values)


def rasterize(means3D, means2D, opacities, colors, features, scales, rotations, cov3D_precomp,
              bg, scale_modifier, viewmatrix, projmatrix, tanfovx, tanfovy, height, width):
    """Render colours, depth and (optionally) features.

    means3D [N, 3], means2D [N, 3], opacities [N, 1], colors [N, 3], features [N, C] or None,
    scales [N, 3] + rotations [N, 4] (w, x, y, z) or cov3D_precomp [N, 6]; bg [3];
    viewmatrix, projmatrix [4, 4] (transposed). Returns
    color [3, H, W], radii [N] int32, depth [1, H, W], features [C, H, W] or None.
    """
    if cov3D_precomp is not None:
        cov3D = unpack_cov3d(cov3D_precomp)
    else:
        cov3D = covariance_3d(scales, rotations, scale_modifier)
    xy, z, conic, radii, rect = project_gaussians(
        means3D, means2D, cov3D, viewmatrix, projmatrix, tanfovx, tanfovy, height, width)
    pixel, gauss, dx, dy = tile_fragments(xy, conic, radii, rect, height, width)
    power = -0.5 * (conic[gauss, 0] * dx * dx + conic[gauss, 2] * dy * dy) - conic[gauss, 1] * dx * dy
    alpha = torch.clamp(opacities[gauss, 0] * torch.exp(power), max=ALPHA_MAX)
    live = (power.detach() <= 0) & (alpha.detach() >= ALPHA_MIN)
    num_pixels = height * width
    pixel, gauss, weight, t_final = composite_weights(
        pixel[live], gauss[live], alpha[live], z, num_pixels)

    values = torch.cat([colors, z[:, None]], 1)
    out = splat(pixel, gauss, weight, values, num_pixels)
    color = out[:, :3] + t_final[:, None] * bg[None, :]
    color = color.T.reshape(3, height, width)
    depth = out[:, 3].reshape(1, height, width)
    feat = None
    if features is not None:
        feat = splat(pixel, gauss, weight, features, num_pixels).T.reshape(-1, height, width)
    return color, radii, depth, feat
