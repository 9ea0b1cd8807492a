"""CUDA path of the rasterizer: the kernels of ../csrc behind the function of _torch_impl.rasterize.

This file is shared, through a symbolic link, by diff_gaussian_rasterization and
diff_gaussian_rasterization_feat; each package builds its own ``_C`` extension from the same csrc/.
Without the extension or without a GPU, ``available()`` is False and _api takes the PyTorch path.
"""

import torch

try:
    from . import _C
except ImportError:  # built without CUDA (no toolkit or no GPU at install time)
    _C = None

# Tests set this: every output buffer is filled with NaN (integers with -1) before the kernels run,
# so that an element a kernel forgets to write shows up.
poison_outputs = False

GEOMETRY_INPUTS = (0, 1, 2, 5, 6, 7)  # means3D, means2D, opacities, scales, rotations, cov3D_precomp


_available = None


def available():
    """True when the extension is built and a CUDA device is visible (asked once per process)."""
    global _available
    if _available is None:
        _available = _C is not None and torch.cuda.is_available()
    return _available


def supports(args):
    """Whether the kernels take these rasterize() arguments: float32 tensors on one CUDA device."""
    device = args[0].device
    return all(t.dtype == torch.float32 and t.device == device for t in args if isinstance(t, torch.Tensor))


def _forward(
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
    """The inputs made contiguous (the 4x4 matrices are read with their strides, as they come), and
    _C.forward's outputs: color, radii, depth, features, then what backward needs."""
    inputs = [
        None if t is None else t.contiguous()
        for t in (means3D, means2D, opacities, colors, features, scales, rotations, cov3D_precomp, bg)
    ] + [viewmatrix, projmatrix]
    return inputs, _C.forward(*inputs[:9], scale_modifier, *inputs[9:], tanfovx, tanfovy, height, width, poison_outputs)


class _Rasterize(torch.autograd.Function):
    """Render and differentiate; the arguments and outputs of rasterize() below.

    Backward computes what ctx.needs_input_grad asks for. When no geometry input (means3D, means2D,
    opacities, scales, rotations, cov3D_precomp) needs a gradient, as in 4-LEGS training on frozen
    geometry, it runs only the feature (and colour) kernel, W^T dL/dimage, and skips the rest.
    """

    @staticmethod
    def forward(
        ctx,
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
        inputs, out = _forward(
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
        )
        (
            means3D,
            means2D,
            opacities,
            colors,
            features,
            scales,
            rotations,
            cov3D_precomp,
            bg,
            viewmatrix,
            projmatrix,
        ) = inputs
        color, radii, depth, feat = out[:4]
        ctx.mark_non_differentiable(radii)
        ctx.set_materialize_grads(False)
        ctx.camera = (scale_modifier, tanfovx, tanfovy, height, width)
        ctx.save_for_backward(
            means3D, scales, rotations, cov3D_precomp, colors, features, bg, viewmatrix, projmatrix, radii, *out[4:]
        )
        return color, radii, depth, feat

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_color, grad_radii, grad_depth, grad_feat):
        (
            means3D,
            scales,
            rotations,
            cov3D_precomp,
            colors,
            features,
            bg,
            viewmatrix,
            projmatrix,
            radii,
            xy,
            depth,
            conic_opacity,
            point_ids,
            ranges,
            final_T,
            n_contrib,
            tile_last,
        ) = ctx.saved_tensors
        scale_modifier, tanfovx, tanfovy, height, width = ctx.camera
        needs = ctx.needs_input_grad
        need_geometry = any(needs[i] for i in GEOMETRY_INPUTS)
        grads = _C.backward(
            means3D,
            scales,
            rotations,
            cov3D_precomp,
            colors,
            features,
            bg,
            scale_modifier,
            viewmatrix,
            projmatrix,
            tanfovx,
            tanfovy,
            height,
            width,
            radii,
            xy,
            depth,
            conic_opacity,
            point_ids,
            ranges,
            final_T,
            n_contrib,
            tile_last,
            grad_color,
            grad_depth,
            grad_feat,  # any strides: kernels read them as they are
            need_geometry,
            needs[3],
            needs[4],
            poison_outputs,
        )
        grads = [g if needs[i] else None for i, g in enumerate(grads)]
        grad_bg = None
        if needs[8]:  # color = ... + T_final * bg
            grad_bg = torch.zeros_like(bg) if grad_color is None else (grad_color * final_T[None]).sum(dim=(1, 2))
        return (*grads, grad_bg) + (None,) * 7


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
    """Render colours, depth and (optionally) features with the CUDA kernels.

    means3D [N, 3], means2D [N, 3] (zeros; its gradient is the screen-space NDC gradient),
    opacities [N, 1], colors [N, 3], features [N, C] (C in 1..512) or None, scales [N, 3] +
    rotations [N, 4] (w, x, y, z) or cov3D_precomp [N, 6]; bg [3]; viewmatrix, projmatrix [4, 4]
    (transposed; any leading dimensions of size 1, any strides); all float32 on one CUDA device.
    Returns color [3, H, W], radii [N] int32, depth [1, H, W], features [C, H, W] or None: the
    function of _torch_impl.rasterize.
    """
    args = (
        means3D,
        means2D,
        opacities,
        colors,
        features,
        scales,
        rotations,
        cov3D_precomp,
        bg,
        float(scale_modifier),
        viewmatrix,
        projmatrix,
        float(tanfovx),
        float(tanfovy),
        int(height),
        int(width),
    )
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
        return _Rasterize.apply(*args)
    # nothing to differentiate (e.g. under torch.no_grad): no autograd node, the same kernels
    return tuple(_forward(*args)[1][:4])
