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

The steps: project_gaussians (autograd), select_fragments (no gradient: which (pixel, Gaussian)
pairs blend, in which order), Blend (what they contribute; an autograd Function whose backward
is written out). docs/performance.md has its speed on CPU.
"""

import math
import warnings

import numpy as np
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
    return torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        -1,
    ).reshape(-1, 3, 3)


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
    J = torch.stack(
        [
            focal_x / z_safe,
            zeros,
            -focal_x * tx / (z_safe * z_safe),
            zeros,
            focal_y / z_safe,
            -focal_y * ty / (z_safe * z_safe),
        ],
        -1,
    ).reshape(-1, 2, 3)
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


def fragment_power(dx, dy, a, b, c):
    """Gaussian exponent of fragments: dx, dy = mean - pixel, (a, b, c) the conic. The one formula both
    the fragment selection and the blending use, so their float results agree bit for bit."""
    return -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy


def fragment_alpha(power, opacity):
    """alpha = min(0.99, opacity * exp(power)) -> (alpha, unclamped alpha, exp(power))."""
    e = torch.exp(power)
    alpha_raw = opacity * e
    return torch.clamp(alpha_raw, max=ALPHA_MAX), alpha_raw, e


def gather(values, index):
    """values[index] along dim 0; index_select is several times faster than indexing on CPU."""
    return values.index_select(0, index)


def stable_argsort(keys, num_keys):
    """Stable argsort of integer keys in [0, num_keys). On CPU numpy's radix sort on 16-bit digits
    (least significant first) is several times faster than torch.sort; elsewhere torch.sort."""
    if keys.device.type != "cpu":
        return torch.sort(keys, stable=True).indices
    keys = keys.numpy()
    order, shift = None, 0
    while order is None or (num_keys - 1) >> shift > 0:
        digit = (keys if order is None else keys[order]) >> shift
        step = np.argsort(digit.astype(np.uint16), kind="stable")  # astype keeps the low 16 bits
        order = step if order is None else order[step]
        shift += 16
    return torch.from_numpy(order)


def log_transmittance(log_keep, pixel, num_pixels):
    """log(1 - alpha) of fragments sorted by pixel [F] float64 -> log T before and after each
    fragment [F], fragments per pixel [num_pixels]. A segmented cumulative sum: one global cumsum,
    in float64 so that it keeps the precision of a per-pixel product, minus its value where the
    pixel's segment starts."""
    counts = torch.bincount(pixel, minlength=num_pixels)
    inclusive = torch.cumsum(log_keep, 0)
    if log_keep.shape[0] == 0:
        return log_keep, log_keep, counts
    first = (torch.cumsum(counts, 0) - counts).clamp(max=log_keep.shape[0] - 1)
    base = gather(inclusive, first) - gather(log_keep, first)
    log_t_after = inclusive - gather(base, pixel)
    return log_t_after - log_keep, log_t_after, counts


@torch.no_grad()
def select_fragments(xy, conic, opacities, depth, radii, rect, height, width):
    """The fragments that blend, in blending order: every (pixel, Gaussian) pair inside a tile the
    Gaussian covers with power <= 0 and alpha >= 1/255, sorted by pixel, front to back (view z, ties
    by Gaussian index), the ones past the transmittance stop removed. No gradients: these are the
    discrete decisions; Blend computes what the fragments contribute.

    Only pixels inside the ellipse where opacity * exp(power) could reach 1/255 (widened by 2%, far
    more than float32 rounding of the power moves that boundary) are tested; every other pixel of
    the covered tiles fails the alpha test anyway, so the set is that of testing every pixel.

    Returns ids [n] int64 (the rendered Gaussians front to back; a Gaussian's position here is its
    rank) and, per fragment, pixel [F] int32 (row * width + col), rank [F] int32, alpha [F].
    """
    device, dtype = xy.device, xy.dtype
    ids = torch.nonzero(radii > 0).squeeze(1)
    ids = gather(ids, torch.sort(gather(depth, ids), stable=True).indices)
    n = ids.shape[0]
    x, y = gather(xy[:, 0], ids), gather(xy[:, 1], ids)
    a, b, c = (gather(conic[:, i], ids) for i in range(3))
    op = gather(opacities[:, 0], ids)
    tiles = gather(rect, ids) * TILE
    # Pixel rows and, per row, columns of the level set q = [dx dy] conic [dx dy]^T <= s, where
    # alpha >= 1/255 needs q <= s = 2 log(255 opacity); computed in float64 with the margin.
    a64, b64, c64, x64, y64 = (v.double() for v in (a, b, c, x, y))
    s = 2.0 * torch.log(255.0 * op.double())
    s = torch.where(s >= 0, 1.02 * s + 0.02, s)
    det = a64 * c64 - b64 * b64
    # near-degenerate or indefinite conics (from cov3D_precomp): test every pixel of the tiles
    ellipse = (a64 > 0) & (c64 > 0) & (det > 1e-3 * a64 * c64)
    x_lo, y_lo = tiles[:, 0].double(), tiles[:, 1].double()
    x_hi = tiles[:, 2].clamp(max=width).double() - 1
    y_hi = tiles[:, 3].clamp(max=height).double() - 1
    half_h = torch.sqrt(s.clamp(min=0) * a64 / torch.where(ellipse, det, torch.ones_like(det)))
    row0 = torch.where(ellipse, torch.maximum(y_lo, torch.ceil(y64 - half_h)), y_lo)
    row1 = torch.where(ellipse, torch.minimum(y_hi, torch.floor(y64 + half_h)), y_hi)
    rows = torch.where(s >= 0, row1 - row0 + 1, torch.zeros_like(s)).clamp(min=0).long()

    # one span per (Gaussian, row), and its columns
    num_spans = int(rows.sum())
    span_rank = torch.repeat_interleave(torch.arange(n, device=device), rows, output_size=num_spans)
    span_first = torch.repeat_interleave(torch.cumsum(rows, 0) - rows, rows, output_size=num_spans)
    span_row = gather(row0, span_rank) + (torch.arange(num_spans, device=device) - span_first)
    dy = gather(y64, span_rank) - span_row
    a_s, b_s, s_s = gather(a64, span_rank), gather(b64, span_rank), gather(s, span_rank)
    root = torch.sqrt((a_s * s_s - gather(det, span_rank) * dy * dy).clamp(min=0))
    x_s, ell = gather(x64, span_rank), gather(ellipse, span_rank)
    x_lo_s, x_hi_s = gather(x_lo, span_rank), gather(x_hi, span_rank)
    col0 = torch.where(ell, torch.maximum(x_lo_s, torch.ceil(x_s - (-b_s * dy + root) / a_s)), x_lo_s)
    col1 = torch.where(ell, torch.minimum(x_hi_s, torch.floor(x_s - (-b_s * dy - root) / a_s)), x_hi_s)
    cols = (col1 - col0 + 1).clamp(min=0).long()

    # one candidate per pixel of a span; Gaussian-major, so front to back for any one pixel
    num_cand = int(cols.sum())
    cand_span = torch.repeat_interleave(
        torch.arange(num_spans, device=device, dtype=torch.int32), cols, output_size=num_cand
    )
    col_offset = (col0 - (torch.cumsum(cols, 0) - cols)).int()
    col = gather(col_offset, cand_span) + torch.arange(num_cand, device=device, dtype=torch.int32)
    row = gather(span_row.int(), cand_span)
    rank = gather(span_rank.int(), cand_span)
    power = fragment_power(
        gather(x, rank) - col.to(dtype),
        gather(y, rank) - row.to(dtype),
        gather(a, rank),
        gather(b, rank),
        gather(c, rank),
    )
    alpha = fragment_alpha(power, gather(op, rank))[0]
    live = torch.nonzero((power <= 0) & (alpha >= ALPHA_MIN)).squeeze(1)
    pixel, rank, alpha = gather(row * width + col, live), gather(rank, live), gather(alpha, live)
    num_pixels = height * width

    # transmittance stop: drop the fragments after which T would fall below 1e-4. Only pixels
    # whose total log T comes near log(1e-4) can stop; often none do, and the sort is all.
    log_keep = torch.log1p(-alpha).double()
    log_t_total = torch.zeros(num_pixels, dtype=log_keep.dtype, device=device).index_add_(0, pixel, log_keep)
    may_stop = bool((log_t_total < math.log(T_MIN) + 1e-6).any())
    order = stable_argsort(pixel, num_pixels)
    rank, alpha = gather(rank, order), gather(alpha, order)
    counts = torch.bincount(pixel, minlength=num_pixels)
    pixel = torch.repeat_interleave(
        torch.arange(num_pixels, device=device, dtype=torch.int32), counts, output_size=pixel.shape[0]
    )  # = gather(pixel, order), cheaper
    if may_stop:
        _, log_t_after, _ = log_transmittance(gather(log_keep, order), pixel, num_pixels)
        kept = torch.nonzero(log_t_after >= math.log(T_MIN)).squeeze(1)
        pixel, rank, alpha = gather(pixel, kept), gather(rank, kept), gather(alpha, kept)
    return ids, pixel, rank, alpha


def csr(rows, cols, values, shape):
    """A CSR matrix from entries sorted by row, with increasing columns within a row."""
    counts = torch.bincount(rows, minlength=shape[0])
    crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(cols.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


# Up to this many channels the backward splats channel by channel; beyond, sparse matrix products
# (on CPU, per channel is several times faster for the 4 to 7 channels of stage 1 and several
# times slower for the 132 of stage 5).
FEW_CHANNELS = 16


def splat_backward(grad_out, values, weight, pixel, rank, need_values, need_weight):
    """Backward of out = sum over fragments of weight * values[rank] at pixel: grad_out
    [num_pixels, C] -> (grad_values [n, C] or None, grad_weight [F] or None)."""
    n, num_channels = values.shape
    grad_values = grad_weight = None
    if num_channels <= FEW_CHANNELS:
        grad_t, values_t = grad_out.T, values.T
        if need_values:
            grad_values = torch.stack(
                [
                    torch.zeros_like(values_t[i]).index_add_(0, rank, weight * gather(grad_t[i], pixel))
                    for i in range(num_channels)
                ],
                1,
            )
        if need_weight:
            grad_weight = torch.zeros_like(weight)
            for i in range(num_channels):
                grad_weight += gather(grad_t[i], pixel) * gather(values_t[i], rank)
        return grad_values, grad_weight
    if need_values:
        by_gauss = stable_argsort(rank, n)
        grad_values = (
            csr(gather(rank, by_gauss), gather(pixel, by_gauss), gather(weight, by_gauss), (n, grad_out.shape[0]))
            @ grad_out
        )
    if need_weight:
        pattern = csr(pixel, rank, torch.zeros_like(weight), (grad_out.shape[0], n))
        grad_weight = torch.sparse.sampled_addmm(pattern, grad_out, values.T.contiguous(), beta=0.0).values()
    return grad_values, grad_weight


class Blend(torch.autograd.Function):
    """What selected fragments contribute, with the backward written out (it passes over the
    fragments a few times, where autograd of the forward would store and revisit every
    intermediate).

    Inputs per Gaussian in rank order (select_fragments' ids): x, y [n] pixel coordinates of the
    mean, a, b, c [n] conic, opacity [n], values [n, C]; per fragment in blending order (from
    select_fragments, which computed alpha from these same inputs): alpha, pixel, rank [F]; the
    image width and number of pixels. Returns the sum over fragments of w * values
    [num_pixels, C] with w = alpha * T, and the final transmittance [num_pixels]. The backward
    recomputes what alpha depends on.
    """

    @staticmethod
    def forward(ctx, x, y, a, b, c, opacity, values, alpha, pixel, rank, width, num_pixels):
        log_keep = torch.log1p(-alpha).double()
        log_t_before, _, counts = log_transmittance(log_keep, pixel, num_pixels)
        trans = torch.exp(log_t_before).to(alpha.dtype)
        weight = alpha * trans
        log_t_final = torch.zeros(num_pixels, dtype=log_keep.dtype, device=log_keep.device)
        t_final = torch.exp(log_t_final.index_add_(0, pixel, log_keep)).to(alpha.dtype)
        out = csr(pixel, rank, weight, (num_pixels, x.shape[0])) @ values
        ctx.save_for_backward(x, y, a, b, c, opacity, values, alpha, pixel, rank, counts, trans, weight, t_final)
        ctx.width = width
        return out, t_final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_t_final):
        x, y, a, b, c, opacity, values, alpha, pixel, rank, counts, trans, weight, t_final = ctx.saved_tensors
        need_geometry = any(ctx.needs_input_grad[:6])
        grad_values, grad_w = splat_backward(
            grad_out.contiguous(), values, weight, pixel, rank, ctx.needs_input_grad[6], need_geometry
        )
        grads = [None] * 6 + [grad_values] + [None] * 5
        if pixel.shape[0] == 0:  # nothing drawn
            grads[:6] = [
                torch.zeros_like(v) if need else None for v, need in zip((x, y, a, b, c, opacity), ctx.needs_input_grad)
            ]
        if not need_geometry or pixel.shape[0] == 0:
            return tuple(grads)
        # dL/dalpha_i = T_i dL/dw_i - (sum over the later fragments j of the pixel of w_j dL/dw_j
        #               + T_final dL/dT_final) / (1 - alpha_i); the suffix sum in float64
        inclusive = torch.cumsum((weight * grad_w).double(), 0)
        last = gather(inclusive, (torch.cumsum(counts, 0) - 1).clamp(min=0))
        behind = (gather(last, pixel) - inclusive).to(weight.dtype) + gather(t_final * grad_t_final, pixel)
        grad_alpha = trans * grad_w - behind / (1 - alpha)
        a, b, c = gather(a, rank), gather(b, rank), gather(c, rank)
        dx = gather(x, rank) - (pixel % ctx.width).to(x.dtype)
        dy = gather(y, rank) - torch.div(pixel, ctx.width, rounding_mode="floor").to(x.dtype)
        _, alpha_raw, e = fragment_alpha(fragment_power(dx, dy, a, b, c), gather(opacity, rank))
        grad_alpha = torch.where(alpha_raw <= ALPHA_MAX, grad_alpha, torch.zeros_like(grad_alpha))
        grad_power = grad_alpha * alpha_raw
        per_fragment = (
            grad_power * (-a * dx - b * dy),  # x
            grad_power * (-c * dy - b * dx),  # y
            grad_power * (-0.5 * dx * dx),  # a
            grad_power * (-dx * dy),  # b
            grad_power * (-0.5 * dy * dy),  # c
            grad_alpha * e,
        )  # opacity
        n = values.shape[0]
        for i, g in enumerate(per_fragment):
            if ctx.needs_input_grad[i]:
                grads[i] = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, rank, g)
        return tuple(grads)


def rasterize(
    means3D,
    means2D,
    opacities,
    colors,
    features,
    scales,
    rotations,
    cov3D_precomp,
    bg,
    scale_modifier,
    viewmatrix,
    projmatrix,
    tanfovx,
    tanfovy,
    height,
    width,
):
    """Render colours, depth and (optionally) features.

    means3D [N, 3], means2D [N, 3], opacities [N, 1], colors [N, 3], features [N, C] or None,
    scales [N, 3] + rotations [N, 4] (w, x, y, z) or cov3D_precomp [N, 6]; bg [3];
    viewmatrix, projmatrix 4x4 (transposed; any leading dimensions of size 1). Returns
    color [3, H, W], radii [N] int32, depth [1, H, W], features [C, H, W] or None.
    """
    viewmatrix, projmatrix = viewmatrix.reshape(4, 4), projmatrix.reshape(4, 4)
    if cov3D_precomp is not None:
        cov3D = unpack_cov3d(cov3D_precomp)
    else:
        cov3D = covariance_3d(scales, rotations, scale_modifier)
    xy, z, conic, radii, rect = project_gaussians(
        means3D, means2D, cov3D, viewmatrix, projmatrix, tanfovx, tanfovy, height, width
    )
    ids, pixel, rank, alpha = select_fragments(xy, conic, opacities, z, radii, rect, height, width)

    values = [colors, z[:, None]] + ([features] if features is not None else [])
    values = gather(torch.cat(values, 1), ids)
    per_gauss = [gather(v, ids) for v in (xy[:, 0], xy[:, 1], conic[:, 0], conic[:, 1], conic[:, 2], opacities[:, 0])]
    out, t_final = Blend.apply(*per_gauss, values, alpha, pixel, rank, width, height * width)
    out = out.T
    color = (out[:3] + t_final[None, :] * bg[:, None]).reshape(3, height, width)
    depth = out[3:4].reshape(1, height, width)
    feat = out[4:].reshape(-1, height, width) if features is not None else None
    return color, radii, depth, feat
